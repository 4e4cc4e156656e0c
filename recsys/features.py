"""User and item feature construction, shared by the trainer and both services.

There is exactly one implementation of each feature vector:
:func:`user_feature_matrix` and :func:`item_feature_matrix`. The trainer calls
them on whole arrays; the services call them (through
:func:`user_feature_vector`) on aggregates read back from Redis. A test proves
both paths give identical vectors for the same user.

Users are described by *running aggregates* (counts and rating sums, overall
and per genre) rather than raw ratings, so ``RecordInteraction`` can update
them with a few ``HINCRBY`` calls and the next request sees the change without
retraining.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np

from recsys.checks import FieldError
from recsys.errors import shown

# Pseudo-counts of the shrinkage priors: a user with one 5-star Comedy rating
# should not look like a certain Comedy lover, nor an item with two ratings
# like a classic.
USER_PRIOR = 2.0
ITEM_PRIOR = 5.0

# The country bucket the trainer's loaders give a user the data names none
# for; serving encodes a request without a country the same way.
UNKNOWN_COUNTRY = "unknown"


@dataclass(frozen=True)
class FeatureSpec:
    """Vocabularies and constants that fix feature names and order.

    Stored in every version's ``manifest.json``; serving rebuilds it from there.
    """

    genres: tuple[str, ...]
    countries: tuple[str, ...]
    genders: tuple[str, ...] = ()
    occupations: tuple[str, ...] = ()
    rating_min: float = 1.0
    rating_max: float = 5.0
    global_mean: float = 3.5
    default_year: float = 2000.0
    # A user's age when unknown: the median of the training users'. 0 (what
    # versions before it meant) when no user had one.
    default_age: float = 0.0

    def __post_init__(self) -> None:
        for name in ("genres", "countries", "genders", "occupations"):
            values = getattr(self, name)
            object.__setattr__(self, name, tuple(values))
            if len(set(values)) != len(values):
                raise ValueError(f"feature spec {name} has duplicate entries")
        if not self.genres:
            raise ValueError("feature spec needs at least one genre")

    @property
    def user_feature_names(self) -> list[str]:
        """Column names of :func:`user_feature_matrix`, in order."""
        return (
            ["log_watch_count", "mean_rating"]
            + [f"genre_mean:{g}" for g in self.genres]
            + [f"genre_share:{g}" for g in self.genres]
            + ["age", "age_missing"]
            + [f"gender:{g}" for g in self.genders]
            + [f"occupation:{o}" for o in self.occupations]
            + [f"country:{c}" for c in self.countries]
        )

    @property
    def item_feature_names(self) -> list[str]:
        """Column names of :func:`item_feature_matrix`, in order."""
        return [f"genre:{g}" for g in self.genres] + [
            "year",
            "year_missing",
            "mean_rating",
            "log_rating_count",
        ]

    @property
    def n_user_features(self) -> int:
        """Width of a user feature vector."""
        return len(self.user_feature_names)

    @property
    def n_item_features(self) -> int:
        """Width of an item feature vector."""
        return len(self.item_feature_names)

    def to_dict(self) -> dict:
        """JSON-ready form, including the derived feature names for readers."""
        d = asdict(self)
        d["user_feature_names"] = self.user_feature_names
        d["item_feature_names"] = self.item_feature_names
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> FeatureSpec:
        """Inverse of :meth:`to_dict`; checks the stored names still match."""
        keys = {
            "genres", "countries", "genders", "occupations",
            "rating_min", "rating_max", "global_mean", "default_year", "default_age",
        }  # fmt: skip
        spec = cls(**{k: d[k] for k in keys if k in d})
        for attr in ("user_feature_names", "item_feature_names"):
            if attr in d and list(d[attr]) != getattr(spec, attr):
                raise ValueError(f"feature spec {attr} do not match this code's feature layout")
        return spec


@dataclass
class UserProfile:
    """Demographics; every field may be unknown."""

    age: float | None = None
    gender: str | None = None
    occupation: str | None = None
    country: str | None = None


@dataclass
class UserAggregates:
    """Running sums over a user's interactions, overall and per genre."""

    watch_count: int
    rated_count: int
    rating_sum: float
    genre_watch: np.ndarray  # int64 [G]: interactions per genre
    genre_rated: np.ndarray  # int64 [G]: ratings per genre
    genre_sum: np.ndarray  # float64 [G]: rating sum per genre

    @classmethod
    def empty(cls, spec: FeatureSpec) -> UserAggregates:
        """Aggregates of a user with no interactions."""
        g = len(spec.genres)
        return cls(0, 0, 0.0, np.zeros(g, np.int64), np.zeros(g, np.int64), np.zeros(g))

    @classmethod
    def from_flat(cls, nums: np.ndarray, n_genres: int) -> UserAggregates:
        """From the flat float64 layout of :meth:`flat`."""
        g = n_genres
        return cls(
            watch_count=int(nums[0]),
            rated_count=int(nums[1]),
            rating_sum=float(nums[2]),
            genre_watch=nums[3 : 3 + g].astype(np.int64),
            genre_rated=nums[3 + g : 3 + 2 * g].astype(np.int64),
            genre_sum=nums[3 + 2 * g : 3 + 3 * g].astype(np.float64),
        )

    def flat(self) -> np.ndarray:
        """float64 [watch_count, rated_count, rating_sum, genre_watch, genre_rated, genre_sum]."""
        head = np.array([self.watch_count, self.rated_count, self.rating_sum], np.float64)
        return np.concatenate(
            [head, self.genre_watch, self.genre_rated, self.genre_sum], dtype=np.float64
        )

    def add(self, genre_mask: np.ndarray, rating: float | None) -> None:
        """Folds one interaction in (``rating`` None means watched, not rated)."""
        mask = np.asarray(genre_mask, dtype=bool)
        self.watch_count += 1
        self.genre_watch[mask] += 1
        if rating is not None:
            self.rated_count += 1
            self.rating_sum += float(rating)
            self.genre_rated[mask] += 1
            self.genre_sum[mask] += float(rating)


def user_feature_matrix(
    spec: FeatureSpec,
    *,
    watch_count: np.ndarray,
    rated_count: np.ndarray,
    rating_sum: np.ndarray,
    genre_watch: np.ndarray,
    genre_rated: np.ndarray,
    genre_sum: np.ndarray,
    age: np.ndarray,
    gender: Sequence[str | None],
    occupation: Sequence[str | None],
    country: Sequence[str | None],
) -> np.ndarray:
    """Builds user feature vectors for ``n`` users at once.

    Args:
        spec: The version's feature spec.
        watch_count, rated_count, rating_sum: ``[n]`` overall aggregates.
        genre_watch, genre_rated, genre_sum: ``[n, G]`` per-genre aggregates.
        age: ``[n]`` ages, NaN where unknown.
        gender, occupation, country: ``n`` category names, None where unknown;
            names outside the spec's vocabulary encode as all zeros, except an
            unknown (None or empty) country, which takes the
            :data:`UNKNOWN_COUNTRY` column when the spec has one.

    Returns:
        float32 ``[n, spec.n_user_features]`` in ``spec.user_feature_names`` order.
    """
    watch_count = np.asarray(watch_count, np.float64)
    rated_count = np.asarray(rated_count, np.float64)
    rating_sum = np.asarray(rating_sum, np.float64)
    genre_watch = np.asarray(genre_watch, np.float64)
    genre_rated = np.asarray(genre_rated, np.float64)
    genre_sum = np.asarray(genre_sum, np.float64)
    age = np.asarray(age, np.float64)
    n = watch_count.shape[0]

    mean = (rating_sum + USER_PRIOR * spec.global_mean) / (rated_count + USER_PRIOR)
    genre_mean = (genre_sum + USER_PRIOR * mean[:, None]) / (genre_rated + USER_PRIOR)
    genre_share = genre_watch / np.maximum(watch_count, 1.0)[:, None]
    age_missing = ~np.isfinite(age) | (age <= 0)
    cols = [
        np.log1p(watch_count)[:, None],
        mean[:, None],
        genre_mean,
        genre_share,
        # Unknown: a typical age, not 0 (a far-out value the tower never saw
        # in training when every training user had an age).
        np.where(age_missing, spec.default_age, age)[:, None],
        age_missing.astype(np.float64)[:, None],
        _one_hot(gender, spec.genders, n),
        _one_hot(occupation, spec.occupations, n),
        # A user without a country trained in the data's bucket for one, when
        # it has that bucket: an all-zero block is a user no training row was.
        _one_hot(country, spec.countries, n, missing=UNKNOWN_COUNTRY),
    ]
    return np.concatenate(cols, axis=1).astype(np.float32)


def user_feature_rows(
    spec: FeatureSpec, profiles: Sequence[UserProfile], aggs: Sequence[UserAggregates]
) -> np.ndarray:
    """Feature vectors of several users: float32 ``[n, spec.n_user_features]``."""
    return user_feature_matrix(
        spec,
        watch_count=np.array([a.watch_count for a in aggs]),
        rated_count=np.array([a.rated_count for a in aggs]),
        rating_sum=np.array([a.rating_sum for a in aggs]),
        genre_watch=np.stack([a.genre_watch for a in aggs]),
        genre_rated=np.stack([a.genre_rated for a in aggs]),
        genre_sum=np.stack([a.genre_sum for a in aggs]),
        age=np.array([np.nan if p.age is None else p.age for p in profiles], np.float64),
        gender=[p.gender for p in profiles],
        occupation=[p.occupation for p in profiles],
        country=[p.country for p in profiles],
    )


def user_feature_vector(spec: FeatureSpec, profile: UserProfile, agg: UserAggregates) -> np.ndarray:
    """Feature vector of one user: float32 ``[spec.n_user_features]``."""
    return user_feature_rows(spec, [profile], [agg])[0]


def default_user_vector(spec: FeatureSpec) -> np.ndarray:
    """Features of a user nothing is known about (never an error for a new user)."""
    return user_feature_vector(spec, UserProfile(), UserAggregates.empty(spec))


def item_feature_matrix(
    spec: FeatureSpec,
    *,
    genre_matrix: np.ndarray,
    year: np.ndarray,
    rating_count: np.ndarray,
    rating_sum: np.ndarray,
) -> np.ndarray:
    """Builds item feature vectors.

    Args:
        spec: The version's feature spec.
        genre_matrix: ``[n, G]`` multi-hot genres (any integer or bool dtype).
        year: ``[n]`` release years, NaN or <= 0 where unknown.
        rating_count, rating_sum: ``[n]`` aggregates over the training split.

    Returns:
        float32 ``[n, spec.n_item_features]`` in ``spec.item_feature_names`` order.
    """
    year = np.asarray(year, np.float64)
    count = np.asarray(rating_count, np.float64)
    total = np.asarray(rating_sum, np.float64)
    missing = ~np.isfinite(year) | (year <= 0)
    mean = (total + ITEM_PRIOR * spec.global_mean) / (count + ITEM_PRIOR)
    return np.concatenate(
        [
            np.asarray(genre_matrix, np.float32),
            np.where(missing, spec.default_year, year)[:, None].astype(np.float32),
            missing[:, None].astype(np.float32),
            mean[:, None].astype(np.float32),
            np.log1p(count)[:, None].astype(np.float32),
        ],
        axis=1,
    )


def _one_hot(
    values: Sequence[str | None], vocab: Sequence[str], n: int, *, missing: str | None = None
) -> np.ndarray:
    """One-hot rows; a None or empty value takes ``missing``'s column when the vocabulary has it."""
    out = np.zeros((n, len(vocab)), np.float64)
    if not vocab:
        return out
    index = {v: i for i, v in enumerate(vocab)}
    for row, v in enumerate(values):
        col = index.get(v or missing)  # None (no value, no bucket) is no key
        if col is not None:
            out[row, col] = 1.0
    return out


def genre_mask(spec: FeatureSpec, genres: Sequence[str]) -> np.ndarray:
    """Boolean ``[G]`` mask of the given genre names (unknown names ignored)."""
    wanted = set(genres)
    return np.array([g in wanted for g in spec.genres], dtype=bool)


def top_genres(
    spec: FeatureSpec, agg: UserAggregates, n: int, *, stated: bool = False
) -> list[str]:
    """The user's ``n`` favourite genres: most watched, ties broken by mean rating.

    Args:
        spec: The version's feature spec.
        agg: The user's aggregates.
        n: How many genres at most.
        stated: The aggregates are a request's own ``genre_ratings`` (cold
            start, :func:`aggregates_from_genre_ratings`): every named genre
            then counts one watch, so a genre rated below the middle of the
            scale is left out (``{"Horror": 5, "Comedy": 1}`` gave Comedy half
            the genre lists). A history's low-rated genres stay: they were
            watched, and a harsh rater rates everything low.
    """
    if agg.watch_count == 0 or n <= 0:
        return []
    mean = (agg.genre_sum + USER_PRIOR * spec.global_mean) / (agg.genre_rated + USER_PRIOR)
    order = np.lexsort((-mean, -agg.genre_watch))
    keep = agg.genre_watch > 0
    if stated:
        raw = agg.genre_sum / np.maximum(agg.genre_rated, 1)
        keep &= (agg.genre_rated == 0) | (raw >= (spec.rating_min + spec.rating_max) / 2)
    return [spec.genres[i] for i in order if keep[i]][:n]


def check_genre_names(
    specs: Sequence[FeatureSpec], genre_ratings: Mapping[str, float], field: str
) -> None:
    """Refuses a cold-start genre no served model knows (both services call it).

    :func:`aggregates_from_genre_ratings` can only skip such a genre, so a
    caller writing ``comedy`` for ``Comedy`` got the answer for no stated
    taste at all, with nothing saying so. ``specs`` are every model served
    (all A/B tracks): whether a request is valid must not depend on an arm the
    caller cannot see, so a genre only another arm's model knows is skipped.

    Raises:
        FieldError: Names ``{field}.genre_ratings``, the genre, and the known genres.
    """
    if not genre_ratings:
        return
    names = list(dict.fromkeys(g for spec in specs for g in spec.genres))
    known = set(names)
    for genre in genre_ratings:
        if genre in known:
            continue
        near = next((g for g in names if g.casefold() == genre.casefold()), None)
        hint = f" (did you mean {near!r}?)" if near else ""
        listed = ", ".join(names[:30]) + (", …" if len(names) > 30 else "")
        raise FieldError(
            f"{field}.genre_ratings",
            f"unknown genre {shown(genre)}{hint}; the model's genres: {listed}",
        )


def aggregates_from_genre_ratings(
    spec: FeatureSpec, genre_ratings: Mapping[str, float]
) -> UserAggregates:
    """Cold-start aggregates from a request's ``genre -> mean rating`` map.

    Each named genre counts as one rated interaction at that rating, which is
    what the user would look like after rating one film of each genre.
    """
    agg = UserAggregates.empty(spec)
    index = {g: i for i, g in enumerate(spec.genres)}
    for g, r in genre_ratings.items():
        i = index.get(g)
        if i is None or not math.isfinite(r):
            continue
        r = min(max(float(r), spec.rating_min), spec.rating_max)
        agg.watch_count += 1
        agg.rated_count += 1
        agg.rating_sum += r
        agg.genre_watch[i] += 1
        agg.genre_rated[i] += 1
        agg.genre_sum[i] += r
    return agg


# --- Redis hash encoding of a user's state -------------------------------------

# UserProfile fields, in the order the Redis hash and the passed-on state write them.
PROFILE_FIELDS = ("age", "gender", "occupation", "country")


def encode_user_state(
    spec: FeatureSpec, profile: UserProfile, agg: UserAggregates
) -> dict[str, str]:
    """Flattens profile and aggregates into a Redis hash (string values only)."""
    out: dict[str, str] = {
        "n": str(agg.watch_count),
        "nr": str(agg.rated_count),
        "sum": repr(float(agg.rating_sum)),
    }
    for f in PROFILE_FIELDS:
        v = getattr(profile, f)
        if v is not None:
            out[f] = repr(float(v)) if f == "age" else str(v)
    for i, g in enumerate(spec.genres):
        if agg.genre_watch[i]:
            out[f"gw:{g}"] = str(int(agg.genre_watch[i]))
        if agg.genre_rated[i]:
            out[f"gr:{g}"] = str(int(agg.genre_rated[i]))
            out[f"gs:{g}"] = repr(float(agg.genre_sum[i]))
    return out


@lru_cache(maxsize=32)
def _state_number_keys(spec: FeatureSpec) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
    """Numeric hash fields in decode order, as bytes and as str keys."""
    names = [
        "n",
        "nr",
        "sum",
        *(f"gw:{g}" for g in spec.genres),
        *(f"gr:{g}" for g in spec.genres),
        *(f"gs:{g}" for g in spec.genres),
    ]
    return tuple(n.encode() for n in names), tuple(names)


# Largest magnitude a stored aggregate or age may have. A count or a rating
# sum past it is a corrupted hash, and a larger value (1e300 parses as
# finite) overflows float32 in the features: the tower answers NaN and every
# candidate scores NaN, unranked.
MAX_STATE_NUMBER = 1e15


def sane_state_numbers(nums: np.ndarray) -> bool:
    """True when every stored number is finite and within :data:`MAX_STATE_NUMBER`."""
    # NaN compares False, so one test also refuses "nan" and "inf".
    return bool((np.abs(nums) <= MAX_STATE_NUMBER).all())


def decode_user_state(
    spec: FeatureSpec, fields: Mapping[bytes | str, bytes | str]
) -> tuple[UserProfile, UserAggregates] | None:
    """Inverse of :func:`encode_user_state`; None for an empty hash (unknown user).

    Runs on every request of both services, so the numeric fields are read
    by a fixed key list and parsed in one numpy conversion instead of being
    decoded and converted one by one.
    """
    if not fields:
        return None
    as_bytes = isinstance(next(iter(fields)), bytes)
    byte_keys, str_keys = _state_number_keys(spec)
    get = fields.get
    if as_bytes:
        raw: list = [get(k, b"0") for k in byte_keys]
    else:
        raw = [get(k, "0") for k in str_keys]
    try:
        nums = np.array(raw).astype(np.float64)
    except ValueError as exc:
        raise ValueError(f"user state hash has a non-numeric aggregate: {exc}") from exc
    if not sane_state_numbers(nums):  # "nan"/"inf"/"1e300" parse, then poison every score
        raise ValueError(
            f"user state hash has a non-finite aggregate or one beyond {MAX_STATE_NUMBER:g}"
        )
    agg = UserAggregates.from_flat(nums, len(spec.genres))

    def text(key: str) -> str | None:
        v = get(key.encode() if as_bytes else key)  # type: ignore[call-overload]
        return None if v is None else _s(v)

    age = text("age")
    age_years = float(age) if age is not None else None
    if age_years is not None and not abs(age_years) <= MAX_STATE_NUMBER:
        raise ValueError(f"user state hash has a non-finite age or one beyond {MAX_STATE_NUMBER:g}")
    profile = UserProfile(
        age=age_years,
        gender=text("gender"),
        occupation=text("occupation"),
        country=text("country"),
    )
    return profile, agg


def interaction_increments(
    spec: FeatureSpec, item_genres: Sequence[str], rating: float | None
) -> tuple[dict[str, int], dict[str, float]]:
    """Hash increments for one interaction: (``HINCRBY`` fields, ``HINCRBYFLOAT`` fields).

    Mirrors :meth:`UserAggregates.add` so online updates and batch
    aggregation agree field for field.
    """
    known = [g for g in item_genres if g in set(spec.genres)]
    ints: dict[str, int] = {"n": 1}
    floats: dict[str, float] = {}
    for g in known:
        ints[f"gw:{g}"] = 1
    if rating is not None:
        ints["nr"] = 1
        floats["sum"] = float(rating)
        for g in known:
            ints[f"gr:{g}"] = 1
            floats[f"gs:{g}"] = float(rating)
    return ints, floats


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


# --- Target scaling ----------------------------------------------------------------


@dataclass(frozen=True)
class TargetScale:
    """Maps model outputs (dot products in [-1, 1]) back to the target scale."""

    objective: Literal["rating", "binary"] = "rating"
    rating_min: float = 1.0
    rating_max: float = 5.0
    like_threshold: float = 4.0
    logit_scale: float = 1.0
    logit_bias: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.rating_max > self.rating_min:
            raise ValueError(
                f"rating_max {self.rating_max} must exceed rating_min {self.rating_min}"
            )
        # Both services order candidates by the raw dot product; that order
        # is the order of the scores only while the map to scores increases.
        if self.objective == "binary" and not (
            math.isfinite(self.logit_scale) and self.logit_scale > 0
        ):
            raise ValueError(f"logit_scale {self.logit_scale} must be positive and finite")
        if not math.isfinite(self.logit_bias):
            raise ValueError(f"logit_bias {self.logit_bias} must be finite")

    def to_model(self, rating: np.ndarray) -> np.ndarray:
        """Training label: rating scaled to [-1, 1], or 1/0 liked for binary."""
        r = np.asarray(rating, np.float32)
        if self.objective == "binary":
            return (r >= self.like_threshold).astype(np.float32)
        span = self.rating_max - self.rating_min
        return (2.0 * (r - self.rating_min) / span - 1.0).astype(np.float32)

    def from_model(self, dot: np.ndarray) -> np.ndarray:
        """Dot product to stars (rating) or probability (binary)."""
        d = np.asarray(dot, np.float32)
        if self.objective == "binary":
            return (1.0 / (1.0 + np.exp(-(self.logit_scale * d + self.logit_bias)))).astype(
                np.float32
            )
        span = self.rating_max - self.rating_min
        return (self.rating_min + (d + 1.0) * 0.5 * span).astype(np.float32)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> TargetScale:
        """Inverse of :meth:`to_dict`."""
        return cls(**dict(d))
