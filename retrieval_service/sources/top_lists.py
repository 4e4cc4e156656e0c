"""Top-list sources: per genre, per country and overall popularity.

The lists are model outputs published under version-scoped Redis sorted sets
(``recsys.redis_keys.top_*``). Reads go through ``ctx.redis`` so every source
of a request shares one pipelined round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from recsys import redis_keys
from retrieval_service.sources.base import (
    Candidate,
    CandidateBlock,
    RedisUnavailable,
    RetrievalContext,
    SourceBase,
    SourceConfig,
    Tier,
    TopRows,
    await_each,
    round_robin,
)


class TopGenreConfig(SourceConfig):
    """Config of :class:`TopGenreSource`."""

    type: Literal["redis_top_genre"] = "redis_top_genre"
    budget: int = Field(150, ge=1)
    genres: int = Field(3, ge=1, description="How many of the user's favourite genres to use.")
    tier: Tier = "segment"


class TopGenreSource(SourceBase):
    """Best items of the user's favourite genres, round-robin across genres (favourite first)."""

    eager = True
    config_model = TopGenreConfig
    config: TopGenreConfig

    async def retrieve(self, ctx: RetrievalContext, k: int) -> Sequence[Candidate]:
        if not ctx.redis.available:  # neither the user's genres nor the lists are readable
            raise RedisUnavailable(ctx.hydrate_error or "redis unavailable")
        genres = ctx.top_genres(self.config.genres)
        if not genres or k <= 0:
            return []
        # Each list is read k deep, not k / genres: an item in two of the
        # lists is taken once, and shallow reads left the answer short of k.
        per = k
        cache = ctx.redis.cache if ctx.redis.available else None
        # The answer depends only on the genres, k and the version's lists:
        # users sharing favourite genres share it.
        memo = ("top_genre", tuple(genres), k)
        if cache is not None and (known := cache.recall(memo)) is not None:
            return known
        version = ctx.version_id
        # Issue every read before awaiting any, so they share one pipeline.
        pending = [ctx.top_rows(redis_keys.top_genre(version, g), per) for g in genres]
        from_copies = all(f.done() for f in pending)  # answered by the cache, no read
        lists: list[TopRows] = await await_each(pending)
        # Rank-major matrix: row r holds rank r of every genre list (-1: list too short).
        rows = np.full((per, len(genres)), -1, np.int64)
        scores = np.zeros((per, len(genres)), np.float64)
        for g, got in enumerate(lists):
            m = min(per, got.rows.shape[0])
            rows[:m, g] = got.rows[:m]
            scores[:m, g] = got.scores[:m]
        with ctx.served.marks() as marks:
            take = round_robin(rows, k, marks)
        block = CandidateBlock(
            ctx.served.item_ids,
            rows.ravel()[take],
            scores.ravel()[take],
            genres=take % len(genres),
            genre_names=tuple(genres),
        )
        if cache is not None and from_copies:
            for a in (block.rows, block.scores, block.genres):
                a.flags.writeable = False  # shared by later answers
            cache.remember(memo, block)
        return block


class TopCountryConfig(SourceConfig):
    """Config of :class:`TopCountrySource`."""

    type: Literal["redis_top_country"] = "redis_top_country"
    budget: int = Field(100, ge=1)
    tier: Tier = "segment"


class TopCountrySource(SourceBase):
    """Best items among users of the request's (or profile's) country."""

    eager = True
    config_model = TopCountryConfig
    config: TopCountryConfig

    async def retrieve(self, ctx: RetrievalContext, k: int) -> Sequence[Candidate]:
        if not ctx.redis.available:
            raise RedisUnavailable(ctx.hydrate_error or "redis unavailable")
        if not ctx.country or k <= 0:
            return []
        got = await ctx.top_rows(redis_keys.top_country(ctx.version_id, ctx.country), k)
        return CandidateBlock(ctx.served.item_ids, got.rows, got.scores)


class PopularConfig(SourceConfig):
    """Config of :class:`PopularSource`."""

    type: Literal["popular"] = "popular"
    budget: int = Field(200, ge=1)
    tier: Tier = "popular"
    from_redis: bool = Field(
        False,
        description="Read the published sorted set instead of the version's in-memory list "
        "(the same data; Redis costs a read and a parse of `budget` entries per request).",
    )


class PopularSource(SourceBase):
    """Most popular items: the cold-start answer and the end of the fallback chain.

    By default it answers from the version's ``top_lists.json``, already in
    memory: the list is a model output identical to the published sorted
    set, and skipping Redis saves parsing a few hundred entries per request.
    With ``from_redis`` it reads the sorted set, and still falls back to
    memory when Redis is down or the list was never published.
    """

    eager = True
    config_model = PopularConfig
    config: PopularConfig

    async def retrieve(self, ctx: RetrievalContext, k: int) -> Sequence[Candidate]:
        if k <= 0:
            return []
        served = ctx.served
        if self.config.from_redis and ctx.redis.available:
            try:
                got = await ctx.top_rows(redis_keys.top_popular(ctx.version_id), k)
            except RedisUnavailable:
                pass
            else:
                if got.rows.shape[0]:
                    return CandidateBlock(served.item_ids, got.rows, got.scores)
        # Precomputed per version: slicing two arrays, no object per candidate.
        return CandidateBlock(
            served.item_ids, served.popular_rows[:k], served.popular_row_scores[:k]
        )
