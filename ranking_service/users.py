"""User features for one request: stored state, inline cold-start fields, or defaults."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from recsys.errors import ThrottledWarning, describe_error
from recsys.features import (
    FeatureSpec,
    UserAggregates,
    UserProfile,
    aggregates_from_genre_ratings,
    user_feature_rows,
)
from recsys.user_store import StoredUser, UserRead, load_users

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
    # The request's own history (it replaces the stored one): watched items.
    recent_item_ids: list[str] = field(default_factory=list)
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


# Redis down means every request fails the same way: one line per interval.
_log_degraded = ThrottledWarning(
    log, "user reads failing, ranking with request/default features: %s (%d since last report)"
)


async def fetch_users(
    redis,
    spec_and_ids: Sequence[tuple[FeatureSpec, str, bool] | None],
    *,
    timeout_s: float | None = None,
) -> list[tuple[StoredUser | None, bool]]:
    """Reads several users' stored state in one round trip (a micro-batch's users).

    Args:
        redis: ``redis.asyncio`` client, or None (nothing is read).
        spec_and_ids: Per request ``(spec, user_id, with_watched)``, or None
            for a request without a user id.
        timeout_s: Longest wait for the read (None: unbounded).

    Returns:
        Per request ``(stored, redis_failed)``; ``(None, True)`` when Redis
        failed for it. Redis being down must not fail a request: the caller
        ranks with the request's inline features or the defaults instead.
    """
    out: list[tuple[StoredUser | None, bool]] = [(None, False)] * len(spec_and_ids)
    if redis is None:
        return out
    wanted = [i for i, r in enumerate(spec_and_ids) if r is not None and r[1]]
    if not wanted:
        return out
    reads = []
    for i in wanted:
        spec, user_id, with_watched = spec_and_ids[i]  # type: ignore[misc]
        # Ranking needs no history list: the profile hash and (for Rank) the
        # watched set. One command less per user in the batch's pipeline.
        reads.append(UserRead(spec, user_id, recent_n=0, with_watched=with_watched))
    try:
        got = await load_users(redis, reads, timeout_s=timeout_s)
    except Exception as exc:  # redis.RedisError, OSError, timeouts: all degrade the same way
        waited = f"{timeout_s * 1e3:.0f} ms" if timeout_s is not None else ""
        _log_degraded(describe_error(exc, waited=waited))
        for i in wanted:
            out[i] = (None, True)
        return out
    for i, stored in zip(wanted, got, strict=True):
        if isinstance(stored, Exception):
            _log_degraded(stored)
            out[i] = (None, True)
        elif stored.corrupt:  # counted as a failed read; its watched set still applies
            _log_degraded(ValueError(stored.corrupt))
            out[i] = (stored, True)
        else:
            out[i] = (stored, False)
    return out


def resolve_inputs(
    spec: FeatureSpec, stored: StoredUser | None, query: UserQuery
) -> tuple[UserProfile, UserAggregates, str] | None:
    """The profile and aggregates to featurise and where they came from; None: use defaults.

    Stored profile fields are overridden by the request's where the request
    sets them. Stored aggregates win over the request's genre ratings: those
    describe a user with no history (the proto's cold-start contract).
    """
    known = stored is not None and stored.known
    if not known and not query.has_inline:
        return None
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
    return profile, agg, source


def feature_rows(
    spec: FeatureSpec,
    inputs: Sequence[tuple[UserProfile, UserAggregates, str] | None],
    default: np.ndarray,
) -> np.ndarray:
    """float32 ``[n, F_user]``: one :func:`user_feature_matrix` call for every resolved user.

    Rows whose input is None get ``default``.
    """
    out = np.repeat(default[None, :].astype(np.float32), len(inputs), axis=0)
    idx = [i for i, x in enumerate(inputs) if x is not None]
    if not idx:
        return out
    chosen = [inputs[i] for i in idx]
    out[idx] = user_feature_rows(
        spec,
        [c[0] for c in chosen],  # type: ignore[index]
        [c[1] for c in chosen],  # type: ignore[index]
    )
    return out
