"""Deterministic synthetic MovieLens-style data with latent tastes.

The generator exists so the whole system runs (and the trainer has something
learnable) without downloading anything. Everything is drawn from one
``numpy.random.default_rng(seed)`` in a fixed order, so the same arguments give
an identical :class:`~trainer.dataset.Dataset` (and ``Dataset.sha256()``).

The hidden model, in the order it is drawn:

* **Items** get one to three genres (common genres such as Drama and Comedy
  more often), a release year skewed towards recent decades, a home country,
  a Zipf-like popularity (a random rank ``r`` gives weight ``(r + 10) ** -a``),
  a bias loosely tied to popularity, and a latent vector: the normalised genre
  multi-hot plus Gaussian noise.
* **Users** get age, gender, occupation (tied to age) and country. Two or
  three preferred genres and one disliked genre are drawn with probabilities
  nudged by age and gender, which gives the mild demographic signal. The
  latent vector is ``+1`` on preferred genres, ``-0.6`` on the disliked one,
  plus noise; activity is log-normal and a bias is Gaussian.
* **Which items get rated**: users are drawn by activity; items come from the
  global popularity (or, a third of the time, from items whose home country is
  the user's); each pair is kept with probability ``sigmoid(2.5 * dot - 0.4)``
  so people mostly watch what they like. Duplicate pairs are dropped and the
  draw repeats until there are enough.
* **Rating** = ``clip(round(3.25 + b_user + b_item + (dot - 0.6) + 0.35 * home
  + noise), 1, 5)`` in whole (or half) stars, where ``home`` is 1 when the item's
  home country is the user's: items are better liked, not just more watched,
  at home, so top-per-country lists differ.

Memory and time are linear in users + items + ratings: a 1,000,000-item
catalogue with 50,000 users and 2,000,000 ratings is a few seconds.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.dtypes import StringDType

from trainer.dataset import DataError, Dataset

# MovieLens 100K genres (without "unknown") and roughly their frequency there.
DEFAULT_GENRES: tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
    "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_GENRE_FREQ = {
    "Action": 251, "Adventure": 135, "Animation": 42, "Children's": 122, "Comedy": 505,
    "Crime": 109, "Documentary": 50, "Drama": 725, "Fantasy": 22, "Film-Noir": 24,
    "Horror": 92, "Musical": 56, "Mystery": 61, "Romance": 247, "Sci-Fi": 101,
    "Thriller": 251, "War": 71, "Western": 27,
}  # fmt: skip
DEFAULT_COUNTRIES: tuple[str, ...] = (
    "us", "gb", "de", "fr", "br", "jp", "in", "ca", "es", "it", "mx", "kr",
)  # fmt: skip
OCCUPATIONS: tuple[str, ...] = (
    "student", "engineer", "programmer", "educator", "healthcare", "artist",
    "writer", "administrator", "executive", "retired", "other",
)  # fmt: skip
GENDERS: tuple[str, ...] = ("M", "F")

_STR = StringDType()  # variable-width strings: vectorised string building is fast
_TITLE_A = np.array(
    ["The Silent", "Last", "Broken", "Midnight", "Golden", "Lost", "Red", "Wild", "Little",
     "Dark", "Endless", "Hidden", "Crimson", "Frozen", "Burning", "Secret"],
    dtype=_STR,
)  # fmt: skip
_TITLE_B = np.array(
    ["River", "Summer", "Empire", "Garden", "Station", "Letter", "Horizon", "Harbor",
     "Kingdom", "Promise", "Machine", "Island", "Road", "Winter", "Orchestra", "Heist"],
    dtype=_STR,
)  # fmt: skip

_T0 = 1_420_070_400  # 2015-01-01 UTC
_T1 = 1_577_836_800  # 2020-01-01 UTC
_CHUNK = 1 << 20  # pairs per gather/dot chunk; bounds temporary memory


@dataclass
class SyntheticTruth:
    """The hidden variables behind a generated dataset (for tests and analysis)."""

    user_pref_genres: np.ndarray  # bool [n_users, G]: the user's preferred genres
    user_disliked_genre: np.ndarray  # int64 [n_users]: index of the disliked genre
    user_vectors: np.ndarray  # float32 [n_users, G]
    item_vectors: np.ndarray  # float32 [n_items, G]
    item_country: np.ndarray  # int64 [n_items]: index into the country list
    item_popularity: np.ndarray  # float64 [n_items]: selection weight
    user_bias: np.ndarray  # float32 [n_users]
    item_bias: np.ndarray  # float32 [n_items]
    countries: tuple[str, ...]


def spec_string(n_users: int, n_items: int, n_ratings: int, n_countries: int, seed: int) -> str:
    """The ``--data`` spec that reproduces a default-shaped synthetic dataset."""
    return (
        f"synthetic:users={n_users},items={n_items},ratings={n_ratings},"
        f"countries={n_countries},seed={seed}"
    )


def _genre_list(genres: Sequence[str] | int | None) -> tuple[str, ...]:
    if genres is None:
        return DEFAULT_GENRES
    if isinstance(genres, int):
        if genres < 1:
            raise ValueError("genres must be at least 1")
        extra = tuple(f"Genre{k + 1}" for k in range(len(DEFAULT_GENRES), genres))
        return (DEFAULT_GENRES + extra)[:genres]
    out = tuple(genres)
    if not out or len(set(out)) != len(out):
        raise ValueError("genres must be a non-empty list of distinct names")
    for g in out:
        if not g or "|" in g or "\n" in g or g != g.strip():
            raise ValueError(f"genre name {g!r} is empty, padded or contains '|' or a newline")
    return out


def _country_list(n_countries: int, countries: Sequence[str] | None) -> tuple[str, ...]:
    if countries is not None:
        out = tuple(countries)
        if not out or len(set(out)) != len(out):
            raise ValueError("countries must be a non-empty list of distinct names")
        return out
    if n_countries < 1:
        raise ValueError("countries must be at least 1")
    extra = tuple(f"x{k + 1:02d}" for k in range(len(DEFAULT_COUNTRIES), n_countries))
    return (DEFAULT_COUNTRIES + extra)[:n_countries]


def _sample_cdf(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    """Draws ``size`` indices from the (unnormalised) cumulative weights ``cdf``.

    Sorted queries keep ``searchsorted`` cache-friendly on a million-entry
    ``cdf`` (several times faster); shuffling the sorted draws afterwards gives
    back an i.i.d. sequence.
    """
    idx = np.searchsorted(cdf, np.sort(rng.random(size)) * cdf[-1], side="right")
    np.minimum(idx, cdf.shape[0] - 1, out=idx)
    rng.shuffle(idx)
    return idx


def _rowwise_dot(a: np.ndarray, ia: np.ndarray, b: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """``sum(a[ia] * b[ib], axis=1)`` in chunks, so temporaries stay small."""
    out = np.empty(ia.shape[0], np.float32)
    for s in range(0, ia.shape[0], _CHUNK):
        e = s + _CHUNK
        out[s:e] = np.einsum("ij,ij->i", a[ia[s:e]], b[ib[s:e]])
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def generate_with_truth(
    n_users: int = 2000,
    n_items: int = 1500,
    n_ratings: int = 100_000,
    n_countries: int = 6,
    seed: int = 0,
    *,
    genres: Sequence[str] | int | None = None,
    countries: Sequence[str] | None = None,
    years: tuple[int, int] = (1930, 2020),
    half_stars: bool = False,
    zipf_exponent: float = 1.0,
    noise: float = 0.6,
) -> tuple[Dataset, SyntheticTruth]:
    """Like :func:`generate`, and also returns the hidden variables."""
    if n_users < 1 or n_items < 1 or n_ratings < 1:
        raise ValueError("users, items and ratings must each be at least 1")
    if n_ratings > n_users * n_items:
        raise ValueError(
            f"ratings={n_ratings} is more than users x items = {n_users * n_items} "
            "(each user rates an item at most once)"
        )
    if years[0] > years[1]:
        raise ValueError(f"years {years} must be (first, last) with first <= last")
    genre_names = _genre_list(genres)
    country_names = _country_list(n_countries, countries)
    g, c = len(genre_names), len(country_names)
    rng = np.random.default_rng(seed)

    # --- vocabulary-level effects --------------------------------------------------
    freq = np.array([_GENRE_FREQ.get(x, 0) for x in genre_names], np.float64)
    fallback = 1.0 / np.arange(1, g + 1) ** 0.7  # names outside the MovieLens list
    freq = np.where(freq > 0, freq / max(freq.sum(), 1.0), fallback / fallback.sum() * 0.1)
    genre_p = freq / freq.sum()
    country_w = 0.65 ** np.arange(c)  # first country largest, like "us" in MovieLens
    age_effect = rng.normal(0.0, 0.5, g)  # per genre: pull of older users
    female_effect = rng.normal(0.0, 0.5, g)  # per genre: pull of female users

    # --- items ---------------------------------------------------------------------
    item_genres = np.zeros((n_items, g), np.uint8)
    rows = np.arange(n_items)
    item_genres[rows, _sample_cdf(rng, np.cumsum(genre_p), n_items)] = 1
    for share in (0.5, 0.2):  # second and third genres for some items
        extra = rng.random(n_items) < share
        item_genres[rows[extra], _sample_cdf(rng, np.cumsum(genre_p), int(extra.sum()))] = 1
    y0, y1 = years
    age_of_film = np.floor(rng.exponential(18.0, n_items))
    item_year = np.clip(y1 - age_of_film, y0, y1).astype(np.float64)
    item_country = _sample_cdf(rng, np.cumsum(country_w), n_items).astype(np.int64)
    rank = rng.permutation(n_items).astype(np.float64)
    item_pop = (rank + 10.0) ** -zipf_exponent
    log_pop = np.log(item_pop)
    pop_z = (log_pop - log_pop.mean()) / (log_pop.std() + 1e-9)
    item_bias = (rng.normal(0.0, 0.35, n_items) + 0.15 * pop_z).astype(np.float32)
    n_g = item_genres.sum(axis=1, keepdims=True).astype(np.float32)
    item_vec = item_genres.astype(np.float32) / np.sqrt(n_g)
    item_vec += 0.25 * rng.standard_normal((n_items, g), dtype=np.float32)

    # --- users ---------------------------------------------------------------------
    age = np.clip(np.round(13.0 + rng.gamma(3.0, 7.5, n_users)), 13, 85)
    female = rng.random(n_users) < 0.4
    age_z = (age - 35.0) / 12.0
    occ_logits = np.zeros((n_users, len(OCCUPATIONS)))
    occ_logits[:, OCCUPATIONS.index("student")] = 2.5 * (age < 25) - 1.5 * (age > 30)
    occ_logits[:, OCCUPATIONS.index("retired")] = 3.5 * (age > 62) - 4.0 * (age < 50)
    occupation_idx = np.argmax(occ_logits + rng.gumbel(size=occ_logits.shape), axis=1)
    user_country = _sample_cdf(rng, np.cumsum(country_w), n_users)

    # Preferred genres: Gumbel top-k over demographically nudged log-probabilities.
    logits = (
        np.log(genre_p)[None, :] * 0.5
        + age_z[:, None] * age_effect[None, :]
        + female[:, None] * female_effect[None, :]
    )
    keys = logits + rng.gumbel(size=(n_users, g))
    order = np.argsort(-keys, axis=1)
    n_pref = np.minimum(np.where(rng.random(n_users) < 0.5, 2, 3), max(g - 1, 1))
    pref = np.zeros((n_users, g), bool)
    for k in range(int(n_pref.max())):
        take = n_pref > k
        pref[np.arange(n_users)[take], order[take, k]] = True
    disliked = order[:, -1] if g > 1 else np.full(n_users, -1)
    user_vec = pref.astype(np.float32)
    if g > 1:
        user_vec[np.arange(n_users), disliked] = -0.6
    user_vec += 0.3 * rng.standard_normal((n_users, g), dtype=np.float32)
    user_bias = rng.normal(0.0, 0.35, n_users).astype(np.float32)
    activity = rng.lognormal(0.0, 1.0, n_users)

    # --- which (user, item) pairs get rated ---------------------------------------
    codes = _draw_pairs(
        rng,
        n_ratings=n_ratings,
        activity=activity,
        item_pop=item_pop,
        item_country=item_country,
        user_country=user_country,
        n_countries=c,
        user_vec=user_vec,
        item_vec=item_vec,
    )
    r_user = (codes // n_items).astype(np.int32)
    r_item = (codes % n_items).astype(np.int32)

    # --- ratings and timestamps -----------------------------------------------------
    dot = _rowwise_dot(user_vec, r_user, item_vec, r_item)
    home = (item_country[r_item] == user_country[r_user]).astype(np.float32)
    raw = (
        3.25
        + user_bias[r_user]
        + item_bias[r_item]
        + 1.0 * (dot - 0.6)  # rated pairs average a dot of about 0.6 (selection favours taste)
        + 0.35 * home
        + noise * rng.standard_normal(r_user.shape[0], dtype=np.float32)
    )
    stars = np.round(raw * 2.0) / 2.0 if half_stars else np.round(raw)
    rating = np.clip(stars, 1.0, 5.0).astype(np.float32)
    ts = rng.integers(_T0, _T1, r_user.shape[0], dtype=np.int64)
    # Films cannot be rated before their release year.
    ts = np.maximum(ts, _year_start(item_year[r_item]))
    sort = np.lexsort((ts, r_user))

    ids_u = np.arange(1, n_users + 1).astype(_STR)
    ids_i = np.arange(1, n_items + 1).astype(_STR)
    title_a = _TITLE_A[rng.integers(0, _TITLE_A.size, n_items)]
    title_b = _TITLE_B[rng.integers(0, _TITLE_B.size, n_items)]
    years_s = item_year.astype(np.int64).astype(_STR)
    # The id keeps titles unique; the year goes in the title, MovieLens style.
    title = title_a + " " + title_b + " #" + ids_i + " (" + years_s + ")"

    dataset = Dataset(
        name="synthetic",
        source=spec_string(n_users, n_items, n_ratings, c, seed),
        genres=list(genre_names),
        user_ids=ids_u.tolist(),
        user_age=age.astype(np.float64),
        user_gender=np.where(female, "F", "M").tolist(),
        user_occupation=np.asarray(OCCUPATIONS)[occupation_idx].tolist(),
        user_country=np.asarray(country_names)[user_country].tolist(),
        item_ids=ids_i.tolist(),
        item_title=title.tolist(),
        item_year=item_year,
        item_genres=item_genres,
        rating_user=r_user[sort],
        rating_item=r_item[sort],
        rating=rating[sort],
        timestamp=ts[sort],
        rating_min=1.0,
        rating_max=5.0,
    )
    truth = SyntheticTruth(
        user_pref_genres=pref,
        user_disliked_genre=disliked.astype(np.int64),
        user_vectors=user_vec,
        item_vectors=item_vec,
        item_country=item_country,
        item_popularity=item_pop,
        user_bias=user_bias,
        item_bias=item_bias,
        countries=country_names,
    )
    return dataset, truth


def generate(
    n_users: int = 2000,
    n_items: int = 1500,
    n_ratings: int = 100_000,
    n_countries: int = 6,
    seed: int = 0,
    **options: object,
) -> Dataset:
    """Generates a deterministic synthetic dataset with learnable tastes.

    Args:
        n_users: Number of users.
        n_items: Catalogue size (1,000,000 is fine).
        n_ratings: Exact number of distinct (user, item) ratings; at most
            ``n_users * n_items``.
        n_countries: How many of :data:`DEFAULT_COUNTRIES` to use (more are
            named ``x13``, ``x14``, ...); ignored when ``countries`` is given.
        seed: Seed of the single random generator; same arguments, same data.
        **options: Keyword options of :func:`generate_with_truth`: ``genres``
            (names, or how many of :data:`DEFAULT_GENRES`), ``countries``,
            ``years`` (first, last), ``half_stars``, ``zipf_exponent``, ``noise``.

    Returns:
        A :class:`~trainer.dataset.Dataset` named ``"synthetic"``; ratings are
        sorted by user, then timestamp.

    Raises:
        ValueError: A size or option is out of range.
    """
    return generate_with_truth(n_users, n_items, n_ratings, n_countries, seed, **options)[0]  # type: ignore[arg-type]


def _year_start(year: np.ndarray) -> np.ndarray:
    """Unix time of 1 January of each year (proleptic Gregorian, UTC)."""
    years = (year.astype(np.int64) - 1970).astype("datetime64[Y]")
    return years.astype("datetime64[s]").astype(np.int64)


def _draw_pairs(
    rng: np.random.Generator,
    *,
    n_ratings: int,
    activity: np.ndarray,
    item_pop: np.ndarray,
    item_country: np.ndarray,
    user_country: np.ndarray,
    n_countries: int,
    user_vec: np.ndarray,
    item_vec: np.ndarray,
) -> np.ndarray:
    """Distinct ``user * n_items + item`` codes, in draw order, exactly ``n_ratings``."""
    n_users, n_items = user_vec.shape[0], item_vec.shape[0]
    total = n_users * n_items
    user_cdf = np.cumsum(activity)
    pop_cdf = np.cumsum(item_pop)
    # Per-country popularity among that country's own films, stored as one
    # array sorted by country so memory stays O(n_items) for any n_countries.
    by_country = np.argsort(item_country, kind="stable")
    bounds = np.searchsorted(item_country[by_country], np.arange(n_countries + 1))
    home_cdf = np.cumsum(item_pop[by_country])

    kept = np.empty(0, np.int64)
    stalled = 0
    for round_ in range(16):
        need = n_ratings - kept.shape[0]
        if need <= 0 or stalled >= 2:
            break
        # About 45% of draws survive the taste filter; later rounds top up.
        m = int(min(need * 2.5 + 1024, 4 * n_ratings + 1024))
        users = _sample_cdf(rng, user_cdf, m)
        forced = np.zeros(m, bool)
        if round_ == 0 and n_ratings >= n_users and m >= n_users:
            # Everyone rates something: the first n_users draws are each user once.
            users[:n_users] = np.arange(n_users)
            forced[:n_users] = True
        items = _sample_cdf(rng, pop_cdf, m)
        at_home = np.flatnonzero(rng.random(m) < 1.0 / 3.0)
        home_country = user_country[users[at_home]]
        for k in range(n_countries):
            lo, hi = bounds[k], bounds[k + 1]
            sel = at_home[home_country == k]
            if hi <= lo or sel.size == 0:
                continue
            base = home_cdf[lo - 1] if lo > 0 else 0.0
            u = base + rng.random(sel.size) * (home_cdf[hi - 1] - base)
            pos = np.minimum(np.searchsorted(home_cdf, u, side="right"), hi - 1)
            items[sel] = by_country[np.maximum(pos, lo)]
        dot = _rowwise_dot(user_vec, users, item_vec, items)
        accept = forced | (rng.random(m) < _sigmoid(2.5 * dot - 0.4))
        new = users[accept].astype(np.int64) * n_items + items[accept]
        before = kept.shape[0]
        kept = _unique_in_order(np.concatenate([kept, new]))
        gained = kept.shape[0] - before
        stalled = stalled + 1 if gained < max(need // 50, 1) else 0

    need = n_ratings - kept.shape[0]
    if need > 0:
        # The popular, well-liked pairs are used up (a dense request): fill the
        # rest uniformly from the pairs not taken yet.
        if total <= 50_000_000:
            free = np.setdiff1d(np.arange(total, dtype=np.int64), kept, assume_unique=True)
            kept = np.concatenate([kept, rng.choice(free, need, replace=False)])
        else:
            while kept.shape[0] < n_ratings:
                extra = rng.integers(0, total, 2 * (n_ratings - kept.shape[0]) + 1024)
                kept = _unique_in_order(np.concatenate([kept, extra]))
    return kept[:n_ratings]


def _unique_in_order(codes: np.ndarray) -> np.ndarray:
    """Drops repeated values, keeping each value's first occurrence in place."""
    _, first = np.unique(codes, return_index=True)
    return codes[np.sort(first)]


# --- the project's on-disk CSV format --------------------------------------------------

RATINGS_CSV = "ratings.csv"
MOVIES_CSV = "movies.csv"
USERS_CSV = "users.csv"
GENRES_TXT = "genres.txt"
NO_GENRES = "(no genres listed)"


def write_csv(dataset: Dataset, out_dir: str | os.PathLike[str]) -> Path:
    """Writes ``dataset`` in the project's CSV format (what ``csv:<dir>`` loads).

    Files: ``ratings.csv`` (userId,movieId,rating,timestamp), ``movies.csv``
    (movieId,title,genres,year with ``|`` between genres, ``(no genres listed)``
    for none, an empty year for unknown), ``users.csv``
    (userId,age,gender,occupation,country; empty cells for unknown) and
    ``genres.txt`` (the genre vocabulary in order, one per line, so genres no
    film uses and the column order survive the round trip). Titles are written
    as they are: the year has its own column (a ``movies.csv`` without it,
    MovieLens style, takes the year from a title ending in ``(1995)``).

    Args:
        dataset: Any dataset (synthetic or loaded).
        out_dir: Directory to create or overwrite files in.

    Returns:
        The output directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for gname in dataset.genres:
        if "|" in gname or "\n" in gname or gname == NO_GENRES:
            raise ValueError(f"genre name {gname!r} cannot be written to movies.csv")
    (out / GENRES_TXT).write_text("".join(f"{x}\n" for x in dataset.genres), encoding="utf-8")

    ids_u = np.asarray(dataset.user_ids, dtype=_STR)
    ids_i = np.asarray(dataset.item_ids, dtype=_STR)
    # float64 -> string is numpy's shortest round-trip repr, so float32 ratings come back exact.
    line = (
        ids_u[dataset.rating_user] + ","
        + ids_i[dataset.rating_item] + ","
        + dataset.rating.astype(np.float64).astype(_STR) + ","
        + dataset.timestamp.astype(np.int64).astype(_STR)
    )  # fmt: skip
    if any("," in x or '"' in x for x in (*dataset.user_ids, *dataset.item_ids)):
        raise ValueError("user and item ids must not contain commas or quotes")
    with open(out / RATINGS_CSV, "w", encoding="utf-8", newline="") as f:
        f.write("userId,movieId,rating,timestamp\n")
        for s in range(0, line.shape[0], _CHUNK):
            f.write("\n".join(line[s : s + _CHUNK].tolist()))
            f.write("\n")

    genre_names = np.asarray(dataset.genres, dtype=object)
    with open(out / MOVIES_CSV, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["movieId", "title", "genres", "year"])
        for i, (iid, title) in enumerate(zip(dataset.item_ids, dataset.item_title, strict=True)):
            names = genre_names[dataset.item_genres[i].astype(bool)]
            w.writerow([iid, title, "|".join(names) if names.size else NO_GENRES,
                        _fmt_number(float(dataset.item_year[i]))])  # fmt: skip

    with open(out / USERS_CSV, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["userId", "age", "gender", "occupation", "country"])
        for u, uid in enumerate(dataset.user_ids):
            w.writerow([
                uid, _fmt_number(float(dataset.user_age[u])),
                dataset.user_gender[u] or "", dataset.user_occupation[u] or "",
                dataset.user_country[u],
            ])  # fmt: skip
    return out


def _fmt_number(x: float) -> str:
    if not math.isfinite(x):
        return ""
    return str(int(x)) if x.is_integer() else repr(x)


def cli_generate(args: argparse.Namespace, settings: object) -> int:
    """``recsys generate-data``: writes a synthetic dataset as CSV files."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise DataError(f"{args.out} is a file; generate-data writes a directory of CSV files")
    try:
        dataset = generate(
            n_users=args.users,
            n_items=args.items,
            n_ratings=args.ratings,
            n_countries=args.countries,
            seed=args.seed,
        )
    except ValueError as exc:
        raise DataError(str(exc)) from None
    out = write_csv(dataset, args.out)
    print(
        f"wrote {dataset.n_users} users, {dataset.n_items} items, {dataset.n_ratings} ratings "
        f"({len(dataset.genres)} genres, {len(set(dataset.user_country))} countries) to {out}\n"
        f"sha256 {dataset.sha256()}\n"
        f"train on it with: recsys train --data csv:{out}"
    )
    return 0
