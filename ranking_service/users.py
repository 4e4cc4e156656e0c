"""User features for one request: stored state, inline cold-start fields, or defaults."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from recsys.features import (
    FeatureSpec,
    UserAggregates,
    UserProfile,
    aggregates_from_genre_ratings,
    user_feature_vector,
)
from recsys.user_store import StoredUser, load_user

log = logging.getLogger("ranking_service.users")


@dataclass
class UserQuery:
    """Who a request is for, as the caller described them (validated)."""

    user_id: str = ""
    age: float | None = None
    gender: str | None = None
    occupation: str | None = None
    country: str | None = None
    genre_ratings: dict[str, float] = field(default_factory=dict)
    exclude_item_ids: list[str] = field(default_factory=list)
    variant: str = ""  # forced experiment variant; empty: bucketed by user id

    @property
    def has_inline(self) -> bool:
        """True when the request carries any cold-start feature."""
        return bool(
            self.genre_ratings
            or self.age is not None
            or self.gender
            or self.occupation
            or self.country
        )


_LOG_EVERY_S = 10.0
_last_log = [0.0, 0]  # monotonic time of the last warning, failures since


def _log_degraded(exc: Exception) -> None:
    # Redis down means every request fails the same way: one line per
    # interval (with a count) instead of one per request.
    _last_log[1] += 1
    now = time.monotonic()
    if now - _last_log[0] >= _LOG_EVERY_S:
        log.warning(
            "user reads failing, ranking with request/default features: %s (%d since last report)",
            exc,
            _last_log[1],
        )
        _last_log[0], _last_log[1] = now, 0


async def fetch_user(
    redis, spec: FeatureSpec, user_id: str, *, with_watched: bool
) -> tuple[StoredUser | None, bool]:
    """Reads a user's stored state in one round trip; ``(None, True)`` when Redis failed.

    Redis being down must not fail a request: the caller ranks with the
    request's inline features or the defaults instead.
    """
    if redis is None or not user_id:
        return None, False
    try:
        return await load_user(redis, spec, user_id, recent_n=1, with_watched=with_watched), False
    except Exception as exc:  # redis.RedisError, OSError, timeouts: all degrade the same way
        _log_degraded(exc)
        return None, True


def resolve_features(
    spec: FeatureSpec,
    stored: StoredUser | None,
    query: UserQuery,
    default: np.ndarray,
) -> tuple[np.ndarray, str]:
    """Feature vector for the request and where it came from.

    Stored profile fields are overridden by the request's where the request
    sets them. Stored aggregates win over the request's genre ratings: those
    describe a user with no history (the proto's cold-start contract).

    Returns:
        ``(float32 [F_user], source)`` with source ``stored``, ``inline`` or
        ``default``.
    """
    known = stored is not None and stored.known
    if not known and not query.has_inline:
        return default, "default"
    base = stored.profile if known and stored is not None else UserProfile()
    profile = UserProfile(
        age=query.age if query.age is not None else base.age,
        gender=query.gender or base.gender,
        occupation=query.occupation or base.occupation,
        country=query.country or base.country,
    )
    agg: UserAggregates | None = stored.aggregates if known and stored is not None else None
    source = "stored" if known else "inline"
    if (agg is None or agg.watch_count == 0) and query.genre_ratings:
        agg = aggregates_from_genre_ratings(spec, query.genre_ratings)
        source = "inline"
    if agg is None:
        agg = UserAggregates.empty(spec)
    return user_feature_vector(spec, profile, agg), source
