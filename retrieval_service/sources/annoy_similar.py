"""Similar-to-recent: nearest items to the user's last watched items, through Annoy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from retrieval_service.served import ServedVersion, cosine_from_angular
from retrieval_service.sources.base import (
    Candidate,
    RedisUnavailable,
    RetrievalContext,
    SourceBase,
    SourceConfig,
)


class AnnoySimilarConfig(SourceConfig):
    """Config of :class:`AnnoySimilarSource`."""

    type: Literal["annoy_similar"] = "annoy_similar"
    budget: int = Field(200, ge=1)
    seeds: int = Field(10, ge=1, description="How many of the newest recent items seed the search.")
    per_seed: int = Field(50, ge=1, description="Neighbours fetched per seed.")
    search_k: int = Field(-1, description="Annoy search_k (-1: n_trees * n).")
    hot_items: int = Field(
        2000,
        ge=0,
        description="Precompute neighbour lists for this many of the most popular items at "
        "version load (0 turns it off); seeds among them skip the index.",
    )


@dataclass(frozen=True)
class HotNeighbours:
    """Precomputed neighbours: row ``r`` of ``rows``/``scores`` belongs to ``slot[item_row]``."""

    slot: dict[int, int]
    rows: np.ndarray  # int32 [H, per_seed], -1 padded
    scores: np.ndarray  # float32 [H, per_seed]


class AnnoySimilarSource(SourceBase):
    """For each of the last ``seeds`` recent items, its ``per_seed`` nearest items.

    Neighbour lists are interleaved round-robin (newest seed first at each
    rank), so one seed cannot fill the budget alone; an item near several
    seeds keeps the first (most recent) seed. Score = cosine similarity.
    """

    config_model = AnnoySimilarConfig
    config: AnnoySimilarConfig

    def prepare(self, served: ServedVersion) -> HotNeighbours | None:
        cfg = self.config
        if cfg.hot_items == 0:
            return None
        hot = [served.item_index[i] for i, _ in served.popular if i in served.item_index]
        hot = list(dict.fromkeys(hot))[: cfg.hot_items]
        rows = np.full((len(hot), cfg.per_seed), -1, np.int32)
        scores = np.zeros((len(hot), cfg.per_seed), np.float32)
        for slot, row in enumerate(hot):
            nn, dist = served.annoy.get_nns_by_item(row, cfg.per_seed + 1, cfg.search_k, True)
            kept = [(r, d) for r, d in zip(nn, dist, strict=True) if r != row][: cfg.per_seed]
            rows[slot, : len(kept)] = [r for r, _ in kept]
            scores[slot, : len(kept)] = [cosine_from_angular(d) for _, d in kept]
        return HotNeighbours({row: slot for slot, row in enumerate(hot)}, rows, scores)

    def _neighbours(
        self, served: ServedVersion, hot: HotNeighbours | None, row: int, n: int
    ) -> tuple[list[int], list[float]]:
        if hot is not None and n <= hot.rows.shape[1] and row in hot.slot:
            s = hot.slot[row]
            rows = hot.rows[s, :n].tolist()
            scores = hot.scores[s, :n].tolist()
            if rows and rows[-1] == -1:  # catalogue smaller than per_seed
                cut = rows.index(-1)
                rows, scores = rows[:cut], scores[:cut]
            return rows, scores
        # Same query as prepare() (per_seed, not n): Annoy's answer depends on
        # how many neighbours are asked for, and cached and live seeds must agree.
        per_seed = self.config.per_seed
        nn, dist = served.annoy.get_nns_by_item(row, per_seed + 1, self.config.search_k, True)
        kept = [(r, d) for r, d in zip(nn, dist, strict=True) if r != row][:n]
        return [r for r, _ in kept], [cosine_from_angular(d) for _, d in kept]

    async def retrieve(self, ctx: RetrievalContext, k: int) -> Sequence[Candidate]:
        if ctx.hydrate_error and not ctx.recent_from_request:
            # No stored history could be read: an empty answer would look like
            # a user with no history, so say what happened instead.
            raise RedisUnavailable(ctx.hydrate_error)
        served = ctx.served
        index = served.item_index
        seeds = [i for i in ctx.recent if i in index][: self.config.seeds]
        if not seeds or k <= 0:
            return []
        hot = ctx.state_for(self)
        # Enough per seed that a round-robin over the seeds can reach k.
        n = min(self.config.per_seed, -(-k // len(seeds)) * 2)
        lists = [(seed, *self._neighbours(served, hot, index[seed], n)) for seed in seeds]
        ids = served.item_ids
        seen: set[int] = {index[s] for s in seeds}
        out: list[Candidate] = []
        for rank in range(n):
            for seed, rows, scores in lists:
                if rank < len(rows) and rows[rank] not in seen:
                    seen.add(rows[rank])
                    out.append(Candidate(ids[rows[rank]], scores[rank], seed_item_id=seed))
                    if len(out) >= k:
                        return out
        return out
