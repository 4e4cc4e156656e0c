"""Request checks both services apply to the same fields (ids, a user's side features).

Each raises :class:`FieldError`, whose message starts with the field's name;
each service's edge turns it into ``INVALID_ARGUMENT`` with that message.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

from recsys.errors import shown

# A request's genre ratings are one entry per genre: a catalogue has tens.
# The bound keeps a 16 MiB map of junk from being walked and copied.
MAX_GENRE_RATINGS = 1000
OLDEST_AGE = 150


class FieldError(ValueError):
    """A request field that cannot be served; ``str()`` starts with the field name."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def check_source_names(
    names: Sequence[str], configured: Collection[str] | None, max_bytes: int
) -> None:
    """A request's ``sources``: each a valid id, and one of ``configured`` (None: unchecked).

    Ranking checks them against the shared config's retrieval section, so a
    request's validity does not depend on retrieval being up; retrieval
    against its own sources. The message is the same either way.
    """
    for i, name in enumerate(names):
        check_id(name, f"sources[{i}]", max_bytes)
        if configured is not None and name not in configured:
            raise FieldError(
                f"sources[{i}]",
                f"unknown source {shown(name)}; configured: {', '.join(configured)}",
            )


def check_id(value: str, field: str, max_bytes: int) -> None:
    """One id: non-empty, at most ``max_bytes`` UTF-8 bytes, no NUL."""
    if not value:
        raise FieldError(field, "must not be empty")
    check_text(value, field, max_bytes)


def check_text(value: str, field: str, max_bytes: int) -> None:
    """An optional string (may be empty): at most ``max_bytes`` UTF-8 bytes, no NUL."""
    n = len(value.encode("utf-8", "surrogatepass"))
    if n > max_bytes:
        raise FieldError(field, f"is {n} bytes long, at most {max_bytes} allowed")
    if "\x00" in value:
        raise FieldError(field, "contains a NUL character")


def check_features(
    field: str,
    *,
    age: float | None,
    gender: str | None,
    occupation: str | None,
    country: str | None,
    genre_ratings: Mapping[str, float],
    max_bytes: int,
) -> None:
    """A request's user side features (``UserContext.features``).

    The strings end up in answers' reasons and in per-version caches keyed
    on them, so an unbounded one would be held in memory until the next
    model swap: they get the same byte limit as ids.

    Args:
        field: The features' field path, e.g. ``user.features``.
        age: Age in years; None or 0 means not given.
        gender: Optional category.
        occupation: Optional category.
        country: Optional category.
        genre_ratings: Genre → the user's mean rating of it.
        max_bytes: The service's ``max_id_bytes``.

    Raises:
        FieldError: Naming the first bad field.
    """
    if age is not None and (age < 0 or age > OLDEST_AGE or not math.isfinite(age)):
        raise FieldError(f"{field}.age", f"{age:g} is not an age in years")
    for name, value in (("gender", gender), ("occupation", occupation), ("country", country)):
        if value:
            check_text(value, f"{field}.{name}", max_bytes)
    if len(genre_ratings) > MAX_GENRE_RATINGS:
        raise FieldError(
            f"{field}.genre_ratings",
            f"{len(genre_ratings)} entries, at most {MAX_GENRE_RATINGS} allowed",
        )
    for genre, r in genre_ratings.items():
        check_id(genre, f"{field}.genre_ratings key", max_bytes)
        if not math.isfinite(r):
            raise FieldError(f"{field}.genre_ratings[{genre}]", "is not a number")
