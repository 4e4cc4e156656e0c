"""Dataset loaders: one ``--data`` spec string in, a :class:`Dataset` out.

Specs (also listed in ``recsys.cli.DATA_HELP``):

* ``synthetic`` or ``synthetic:users=2000,items=1500,ratings=100000,countries=6,seed=0``
  (any subset of the keys) runs :func:`trainer.synthetic.generate`.
* ``movielens-100k:<dir>``: ``u.data`` (tab-separated user, item, rating,
  timestamp), ``u.item`` (``|``-separated id, title, release date, video date,
  URL, then one 0/1 flag per genre), ``u.user`` (id, age, gender, occupation,
  ZIP) and ``u.genre`` (name, index). The year comes from the release date
  (else from the title); the "country" is the ZIP's region
  (:mod:`trainer.regions`). The "unknown" genre is kept.
* ``movielens-latest-small:<dir>``: ``ratings.csv`` (userId, movieId, rating,
  timestamp; half stars 0.5-5) and ``movies.csv`` (movieId, title, genres with
  ``|`` between them). No demographics: every user is in
  :data:`DEFAULT_COUNTRY`; the year is parsed from a title ending in ``(1995)``;
  ``(no genres listed)`` means no genre. Users are numbered in order of first
  appearance in ``ratings.csv``; genres are sorted by name.
* ``csv:<dir>``: the project's own format, as :func:`trainer.synthetic.write_csv`
  writes it: the latest-small layout plus an optional ``users.csv`` (userId,
  age, gender, occupation, country; empty cells mean unknown) and an optional
  ``genres.txt`` (the genre vocabulary in column order, one per line). Ratings
  may be half stars; ``rating_min`` is 0.5 only when some rating is below 1.

Ratings keep file order (``Dataset.split`` depends on it). Anything wrong with
a file raises :class:`~trainer.dataset.DataError` naming the file and the
first bad line (1-based, header included): a missing file, a wrong column
count, a non-numeric field, a rating out of range, an id not defined in the
users or items file, a duplicate id or (user, item) pair, or no data at all.
Checks are vectorised over columns, so 100K ratings load in a fraction of a
second.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.dtypes import StringDType

from trainer.dataset import DataError, Dataset
from trainer.regions import region_for_postal_code

DEFAULT_COUNTRY = "unknown"
ML100K_FILES = ("u.data", "u.item", "u.user", "u.genre")
NO_GENRES = "(no genres listed)"
SPEC_KINDS = ("synthetic", "movielens-100k", "movielens-latest-small", "csv")
_SYNTHETIC_KEYS = {
    "users": "n_users",
    "items": "n_items",
    "ratings": "n_ratings",
    "countries": "n_countries",
    "seed": "seed",
}
_STR = StringDType()


def load_dataset(spec: str) -> Dataset:
    """Loads the dataset a ``--data`` spec names.

    Args:
        spec: ``synthetic[:key=value,...]``, ``movielens-100k:<dir>``,
            ``movielens-latest-small:<dir>`` or ``csv:<dir>`` (see the module
            docstring).

    Returns:
        The dataset, with ``source`` set to the spec (directories resolved).

    Raises:
        DataError: An unknown spec, or a missing or malformed file (the
            message names the file and line).
    """
    kind, _, arg = spec.strip().partition(":")
    if kind == "synthetic":
        return _load_synthetic(arg)
    if kind not in SPEC_KINDS:
        raise DataError(
            f"unknown dataset spec {spec!r}: expected 'synthetic[:users=..,items=..,ratings=..,"
            "countries=..,seed=..]', 'movielens-100k:<dir>', 'movielens-latest-small:<dir>' "
            "or 'csv:<dir>'"
        )
    if not arg:
        raise DataError(f"dataset spec {spec!r} needs a directory: '{kind}:<dir>'")
    directory = Path(arg).expanduser()
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory (from dataset spec {spec!r})")
    if kind == "movielens-100k":
        return load_movielens_100k(directory)
    if kind == "movielens-latest-small":
        return load_movielens_latest_small(directory)
    return load_csv(directory)


def _load_synthetic(arg: str) -> Dataset:
    from trainer import synthetic  # keeps numpy-only imports light for the file loaders

    kwargs: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in arg.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in _SYNTHETIC_KEYS:
            raise DataError(
                f"synthetic dataset spec: bad entry {part!r}; expected key=value with key one "
                f"of {', '.join(_SYNTHETIC_KEYS)}"
            )
        try:
            kwargs[_SYNTHETIC_KEYS[key]] = int(value.strip().replace("_", ""))
        except ValueError:
            raise DataError(f"synthetic dataset spec: {key}={value!r} is not an integer") from None
    try:
        return synthetic.generate(**kwargs)
    except ValueError as exc:
        raise DataError(f"synthetic dataset spec: {exc}") from None


# --- reading files ----------------------------------------------------------------------


@dataclass
class _Table:
    """Rows of one file, with the 1-based line number each row started on."""

    path: Path
    rows: list[list[str]]
    lines: Sequence[int]  # a range when every row is one line

    def error(self, row: int, message: str) -> DataError:
        """A DataError for data row ``row`` (0-based)."""
        return DataError(f"{self.path}, line {self.lines[row]}: {message}")

    def column(self, k: int) -> list[str]:
        return [r[k] for r in self.rows]


def _read(
    path: Path,
    *,
    delimiter: str = ",",
    header: Sequence[str] | None = None,
    encoding: str = "utf-8",
    quoting: int = csv.QUOTE_MINIMAL,
) -> _Table:
    """Reads a delimited file, checking the header (if any) and skipping blank lines."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding=encoding, newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting, strict=True)
            rows: list[list[str]] = list(reader)
            lines: Sequence[int] = range(1, len(rows) + 1)
            if reader.line_num != len(rows) or not all(rows):
                # Blank lines or quoted newlines: track where each row starts (slower).
                f.seek(0)
                reader = csv.reader(f, delimiter=delimiter, quoting=quoting, strict=True)
                rows, lines = [], []
                start = 1
                for row in reader:
                    if row:
                        rows.append(row)
                        lines.append(start)
                    start = reader.line_num + 1
    except UnicodeDecodeError as exc:
        line = _line_of_byte(path, exc, encoding)
        raise DataError(f"{path}, line {line}: not {encoding} text") from None
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: {exc}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    table = _Table(path, rows, lines)
    if header is not None:
        if not rows:
            raise DataError(f"{path}: empty file (expected a header {','.join(header)})")
        got = [c.strip().lstrip("\ufeff") for c in rows[0]]
        if got != list(header):
            raise DataError(
                f"{path}, line {lines[0]}: expected the header {','.join(header)}, "
                f"got {','.join(rows[0])}"
            )
        table = _Table(path, rows[1:], lines[1:])
    return table


def _line_of_byte(path: Path, exc: UnicodeDecodeError, encoding: str) -> int:
    """Line of the first byte that does not decode (the error's offset is per chunk)."""
    data = path.read_bytes()
    try:
        data.decode(encoding)
    except UnicodeDecodeError as full:
        return data[: full.start].count(b"\n") + 1
    return 1


def _check_columns(table: _Table, names: Sequence[str], *, at_least: bool = False) -> None:
    """Every row has ``len(names)`` columns (or more, when ``at_least``)."""
    n = len(names)
    lens = np.fromiter(map(len, table.rows), np.int64, len(table.rows))
    bad = np.flatnonzero(lens < n if at_least else lens != n)
    if bad.size:
        r = int(bad[0])
        raise table.error(
            r, f"expected {n}{' or more' if at_least else ''} columns ({', '.join(names)}), "
            f"got {lens[r]}"
        )  # fmt: skip


def _numbers(table: _Table, values: list[str], name: str, dtype: type) -> np.ndarray:
    """Parses a column as numbers; a bad value raises naming its line."""
    try:
        return np.array(values, dtype=dtype)
    except (ValueError, OverflowError):
        pass
    for r, v in enumerate(values):  # slow path only to find the culprit
        try:
            np.array([v], dtype=dtype)
        except (ValueError, OverflowError):
            kind = "an integer" if dtype is np.int64 else "a number"
            raise table.error(r, f"{name} {v!r} is not {kind}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _optional_numbers(table: _Table, values: list[str], name: str) -> np.ndarray:
    """Float column where an empty cell means unknown (NaN)."""
    arr = np.asarray(values, dtype=_STR)
    arr = np.strings.strip(arr)
    empty = arr == ""
    out = np.full(arr.shape[0], np.nan)
    if (~empty).any():
        idx = np.flatnonzero(~empty)
        out[idx] = _numbers(_Table(table.path, [], [table.lines[i] for i in idx]),
                            arr[idx].tolist(), name, np.float64)  # fmt: skip
    bad = np.flatnonzero(~empty & ~(np.isfinite(out) & (out >= 0)))
    if bad.size:
        raise table.error(int(bad[0]), f"{name} {values[bad[0]]!r} is not a non-negative number")
    return out


def _unique_ids(table: _Table, values: list[str], what: str) -> dict[str, int]:
    """``id -> row``; empty or duplicate ids raise naming the line."""
    arr = np.asarray(values, dtype=_STR)
    empty = np.flatnonzero(arr == "")
    if empty.size:
        raise table.error(int(empty[0]), f"empty {what}")
    index = {v: i for i, v in enumerate(values)}
    if len(index) != len(values):
        uniq, first = np.unique(arr, return_index=True)
        seen = np.zeros(len(values), bool)
        seen[first] = True
        r = int(np.flatnonzero(~seen)[0])
        f = int(first[np.searchsorted(uniq, arr[r])])
        raise table.error(r, f"duplicate {what} {values[r]!r} (first on line {table.lines[f]})")
    return index


def _map_ids(
    table: _Table, values: list[str], index: dict[str, int], what: str, where: str
) -> np.ndarray:
    """Maps id strings to rows of ``index``; an unknown id raises naming the line."""
    uniq, inverse = np.unique(np.asarray(values, dtype=_STR), return_inverse=True)
    codes = np.array([index.get(v, -1) for v in uniq.tolist()], dtype=np.int64)
    rows = codes[inverse]
    bad = np.flatnonzero(rows < 0)
    if bad.size:
        r = int(bad[0])
        raise table.error(r, f"unknown {what} {values[r]!r} (not in {where})")
    return rows.astype(np.int32)


def _first_seen_ids(values: list[str]) -> tuple[list[str], np.ndarray]:
    """Ids in order of first appearance, and each value's row in that order."""
    uniq, first, inverse = np.unique(
        np.asarray(values, dtype=_STR), return_index=True, return_inverse=True
    )
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    return uniq[order].tolist(), rank[inverse].astype(np.int32)


def _ratings(
    table: _Table,
    *,
    user_col: list[str],
    item_col: list[str],
    rating_col: list[str],
    ts_col: list[str],
    user_index: dict[str, int] | None,
    item_index: dict[str, int],
    users_where: str,
    items_where: str,
    rating_range: tuple[float, float],
) -> tuple[list[str] | None, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parses and checks rating columns: ``(new_user_ids, user, item, rating, timestamp)``.

    With ``user_index`` None, users are defined by the ratings themselves and
    their ids (in order of first appearance) are returned first.
    """
    if not table.rows:
        raise DataError(f"{table.path}: no ratings")
    if user_index is None:
        user_ids, users = _first_seen_ids(user_col)
    else:
        user_ids, users = None, _map_ids(table, user_col, user_index, "user id", users_where)
    items = _map_ids(table, item_col, item_index, "item id", items_where)
    rating = _numbers(table, rating_col, "rating", np.float64)
    lo, hi = rating_range
    bad = np.flatnonzero(~((rating >= lo) & (rating <= hi)))  # also catches NaN
    if bad.size:
        r = int(bad[0])
        raise table.error(r, f"rating {rating_col[r]!r} is outside {lo:g}..{hi:g}")
    ts = _numbers(table, ts_col, "timestamp", np.int64)
    n_items = max(len(item_index), 1)
    pair = users.astype(np.int64) * n_items + items
    order = np.argsort(pair, kind="stable")
    dup = np.flatnonzero(pair[order][1:] == pair[order][:-1])
    if dup.size:
        later = order[dup + 1]
        k = int(np.argmin(later))
        r, first = int(later[k]), int(order[dup[k]])
        raise table.error(
            r, f"duplicate rating of item {item_col[r]!r} by user {user_col[r]!r} "
            f"(first on line {table.lines[first]})"
        )  # fmt: skip
    return user_ids, users, items, rating.astype(np.float32), ts


def _year_from_titles(titles: list[str]) -> np.ndarray:
    """Release year from titles ending in ``(1995)``; NaN where there is none."""
    if not titles:
        return np.zeros(0)
    s = np.strings.rstrip(np.asarray(titles, dtype=_STR))
    tail = np.strings.slice(s, -6, None)
    digits = np.strings.slice(tail, 1, 5)
    ok = (
        (np.strings.str_len(tail) == 6)
        & np.strings.startswith(tail, "(")
        & np.strings.endswith(tail, ")")
        & np.strings.isdecimal(digits)
    )
    out = np.full(s.shape[0], np.nan)
    if ok.any():
        out[ok] = digits[ok].astype(np.float64)
    return out


def _genre_matrix(
    table: _Table, genre_col: list[str], vocabulary: list[str] | None
) -> tuple[list[str], np.ndarray]:
    """Multi-hot genres from ``A|B|C`` cells; work is per distinct cell, not per row."""
    uniq, inverse = np.unique(np.asarray(genre_col, dtype=_STR), return_inverse=True)
    combos = [
        [g.strip() for g in cell.split("|") if g.strip() and g.strip() != NO_GENRES]
        for cell in uniq.tolist()
    ]
    if vocabulary is None:
        vocabulary = sorted({g for c in combos for g in c})
        if not vocabulary:
            raise DataError(f"{table.path}: no item has a genre")
    index = {g: k for k, g in enumerate(vocabulary)}
    hot = np.zeros((len(combos), len(vocabulary)), np.uint8)
    for k, combo in enumerate(combos):
        for g in combo:
            col = index.get(g)
            if col is None:
                r = int(np.flatnonzero(inverse == k)[0])
                raise table.error(r, f"genre {g!r} is not in genres.txt")
            hot[k, col] = 1
    return vocabulary, hot[inverse]


# --- MovieLens 100K ---------------------------------------------------------------------


def load_movielens_100k(directory: str | Path) -> Dataset:
    """Loads MovieLens 100K (``u.data``, ``u.item``, ``u.user``, ``u.genre``).

    Args:
        directory: The unpacked ``ml-100k`` directory.

    Returns:
        943 users, 1682 items, 19 genres (with "unknown") and 100,000 ratings
        for the official release; countries are ZIP regions.

    Raises:
        DataError: A missing or malformed file, naming the file and line.
    """
    d = Path(directory)
    for name in ML100K_FILES:
        if not (d / name).is_file():
            raise DataError(
                f"{d / name}: file not found (MovieLens 100K needs {', '.join(ML100K_FILES)})"
            )
    # The official files are Latin-1 (a few titles have accents).
    read = dict(delimiter="|", encoding="latin-1", quoting=csv.QUOTE_NONE)

    gt = _read(d / "u.genre", **read)  # type: ignore[arg-type]
    _check_columns(gt, ("name", "index"))
    genre_pos = _numbers(gt, gt.column(1), "genre index", np.int64)
    bad = np.flatnonzero(genre_pos != np.arange(len(gt.rows)))
    if bad.size:
        raise gt.error(int(bad[0]), f"genre index {genre_pos[bad[0]]} should be {bad[0]}")
    genres = gt.column(0)
    if not genres:
        raise DataError(f"{gt.path}: no genres")
    _unique_ids(gt, genres, "genre")

    it = _read(d / "u.item", **read)  # type: ignore[arg-type]
    if not it.rows:
        raise DataError(f"{it.path}: no items")
    g = len(genres)
    _check_columns(it, ("id", "title", "release date", "video date", "URL", *genres))
    item_ids = it.column(0)
    item_index = _unique_ids(it, item_ids, "item id")
    flags = np.asarray([r[5:] for r in it.rows], dtype=_STR).reshape(len(it.rows), g)
    bad = np.argwhere((flags != "0") & (flags != "1"))
    if bad.size:
        r, k = (int(x) for x in bad[0])
        raise it.error(r, f"genre flag {genres[k]!r} is {flags[r, k]!r}, expected 0 or 1")
    item_genres = (flags == "1").astype(np.uint8)
    titles = it.column(1)
    release = np.strings.strip(np.asarray(it.column(2), dtype=_STR))
    year = np.full(len(titles), np.nan)
    has = release != ""
    tail = np.strings.slice(release, -4, None)
    # "01-Jan-1995", though a few have a one-digit day ("4-Feb-1971").
    well_formed = (np.strings.slice(release, -5, -4) == "-") & np.strings.isdecimal(tail)
    bad = np.flatnonzero(has & ~well_formed)
    if bad.size:
        r = int(bad[0])
        raise it.error(r, f"release date {it.rows[r][2]!r} is not like 01-Jan-1995")
    year[has] = tail[has].astype(np.float64)
    from_title = _year_from_titles(titles)
    year = np.where(np.isnan(year), from_title, year)

    ut = _read(d / "u.user", **read)  # type: ignore[arg-type]
    if not ut.rows:
        raise DataError(f"{ut.path}: no users")
    _check_columns(ut, ("id", "age", "gender", "occupation", "zip code"))
    user_ids = ut.column(0)
    user_index = _unique_ids(ut, user_ids, "user id")
    age = _optional_numbers(ut, ut.column(1), "age")
    gender = [x.strip() or None for x in ut.column(2)]
    occupation = [x.strip() or None for x in ut.column(3)]
    country = [region_for_postal_code(z) for z in ut.column(4)]

    rt = _read(d / "u.data", delimiter="\t", encoding="latin-1", quoting=csv.QUOTE_NONE)
    _check_columns(rt, ("user id", "item id", "rating", "timestamp"))
    _, users, items, rating, ts = _ratings(
        rt,
        user_col=rt.column(0),
        item_col=rt.column(1),
        rating_col=rt.column(2),
        ts_col=rt.column(3),
        user_index=user_index,
        item_index=item_index,
        users_where="u.user",
        items_where="u.item",
        rating_range=(1.0, 5.0),
    )
    return Dataset(
        name="movielens-100k",
        source=f"movielens-100k:{d.resolve()}",
        genres=genres,
        user_ids=user_ids,
        user_age=age,
        user_gender=gender,
        user_occupation=occupation,
        user_country=country,
        item_ids=item_ids,
        item_title=titles,
        item_year=year,
        item_genres=item_genres,
        rating_user=users,
        rating_item=items,
        rating=rating,
        timestamp=ts,
        rating_min=1.0,
        rating_max=5.0,
    )


# --- latest-small layout and the project's CSV format ---------------------------------

RATINGS_HEADER = ("userId", "movieId", "rating", "timestamp")
MOVIES_HEADER = ("movieId", "title", "genres")
USERS_HEADER = ("userId", "age", "gender", "occupation", "country")


def load_movielens_latest_small(directory: str | Path) -> Dataset:
    """Loads MovieLens latest-small (``ratings.csv`` and ``movies.csv``).

    Args:
        directory: The unpacked ``ml-latest-small`` directory.

    Returns:
        610 users, 9742 movies and 100,836 half-star ratings for the 2018
        release; no demographics, every user in :data:`DEFAULT_COUNTRY`.

    Raises:
        DataError: A missing or malformed file, naming the file and line.
    """
    return _load_latest_layout(Path(directory), "movielens-latest-small", extras=False)


def load_csv(directory: str | Path) -> Dataset:
    """Loads the project's CSV format (what ``recsys generate-data`` writes).

    Args:
        directory: Holds ``ratings.csv`` and ``movies.csv``, and optionally
            ``users.csv`` and ``genres.txt``.

    Returns:
        The dataset; with ``users.csv`` users come in its order and ratings
        must name only its users.

    Raises:
        DataError: A missing or malformed file, naming the file and line.
    """
    return _load_latest_layout(Path(directory), "csv", extras=True)


def _load_latest_layout(d: Path, name: str, *, extras: bool) -> Dataset:
    vocabulary = None
    if extras and (d / "genres.txt").is_file():
        gt = _read(d / "genres.txt", delimiter="\t", quoting=csv.QUOTE_NONE)
        _check_columns(gt, ("genre",))
        vocabulary = [g.strip() for g in gt.column(0)]
        if not vocabulary:
            raise DataError(f"{gt.path}: no genres")
        _unique_ids(gt, vocabulary, "genre")

    mt = _read(d / "movies.csv", header=MOVIES_HEADER)
    if not mt.rows:
        raise DataError(f"{mt.path}: no movies")
    _check_columns(mt, MOVIES_HEADER)
    item_ids = [x.strip() for x in mt.column(0)]
    item_index = _unique_ids(mt, item_ids, "movieId")
    titles = mt.column(1)
    genres, item_genres = _genre_matrix(mt, mt.column(2), vocabulary)

    user_index = None
    user_ids: list[str] | None = None
    age = gender = occupation = country = None
    if extras and (d / "users.csv").is_file():
        ut = _read(d / "users.csv", header=USERS_HEADER)
        if not ut.rows:
            raise DataError(f"{ut.path}: no users")
        _check_columns(ut, USERS_HEADER)
        user_ids = [x.strip() for x in ut.column(0)]
        user_index = _unique_ids(ut, user_ids, "userId")
        age = _optional_numbers(ut, ut.column(1), "age")
        gender = [x.strip() or None for x in ut.column(2)]
        occupation = [x.strip() or None for x in ut.column(3)]
        country = [x.strip() or DEFAULT_COUNTRY for x in ut.column(4)]

    rt = _read(d / "ratings.csv", header=RATINGS_HEADER)
    _check_columns(rt, RATINGS_HEADER)
    seen_ids, users, items, rating, ts = _ratings(
        rt,
        user_col=[x.strip() for x in rt.column(0)],
        item_col=[x.strip() for x in rt.column(1)],
        rating_col=rt.column(2),
        ts_col=rt.column(3),
        user_index=user_index,
        item_index=item_index,
        users_where="users.csv",
        items_where="movies.csv",
        rating_range=(0.5, 5.0),
    )
    if user_ids is None:
        assert seen_ids is not None
        user_ids = seen_ids
        n = len(user_ids)
        age = np.full(n, np.nan)
        gender = [None] * n
        occupation = [None] * n
        country = [DEFAULT_COUNTRY] * n
    # MovieLens latest uses half stars from 0.5; our own CSVs keep 1-5 unless they go below.
    half_scale = name != "csv" or float(rating.min()) < 1.0
    assert age is not None and gender is not None and occupation is not None
    assert country is not None
    return Dataset(
        name=name,
        source=f"{name}:{d.resolve()}",
        genres=genres,
        user_ids=user_ids,
        user_age=age,
        user_gender=gender,
        user_occupation=occupation,
        user_country=country,
        item_ids=item_ids,
        item_title=titles,
        item_year=_year_from_titles(titles),
        item_genres=item_genres,
        rating_user=users,
        rating_item=items,
        rating=rating,
        timestamp=ts,
        rating_min=0.5 if half_scale else 1.0,
        rating_max=5.0,
    )


def describe(dataset: Dataset) -> str:
    """One line summarising a dataset (for logs and the CLI)."""
    years = dataset.item_year[np.isfinite(dataset.item_year)]
    span = f"{int(years.min())}-{int(years.max())}" if years.size else "unknown years"
    mean = float(dataset.rating.mean()) if dataset.n_ratings else math.nan
    return (
        f"{dataset.name}: {dataset.n_users} users, {dataset.n_items} items, "
        f"{dataset.n_ratings} ratings (mean {mean:.2f}), {len(dataset.genres)} genres, "
        f"{len(set(dataset.user_country))} countries, {span}"
    )
