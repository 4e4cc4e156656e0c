"""Similar-to-recent: nearest items to the user's last watched items, through Annoy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from retrieval_service.served import TUNED_SEARCH_K, ServedVersion, cosine_from_angular
from retrieval_service.sources.base import (
    Candidate,
    CandidateBlock,
    RedisUnavailable,
    RetrievalContext,
    SourceBase,
    SourceConfig,
    round_robin,
)


class AnnoySimilarConfig(SourceConfig):
    """Config of :class:`AnnoySimilarSource`."""

    type: Literal["annoy_similar"] = "annoy_similar"
    budget: int = Field(200, ge=1)
    seeds: int = Field(10, ge=1, description="How many of the newest recent items seed the search.")
    per_seed: int = Field(50, ge=1, description="Neighbours fetched per seed.")
    search_k: int = Field(
        TUNED_SEARCH_K,
        description="Nodes Annoy inspects per query (-1: n_trees * (per_seed + 1)). Tuned with "
        "the trainer's default 10 trees: recall@10 0.957, recall@50 0.90 on 100K x 32 vectors "
        "(bench/retrieval.py sweeps trees and search_k). An index built with more trees costs "
        "more per query at the same search_k.",
    )
    hot_items: int = Field(
        2000,
        ge=0,
        description="Precompute neighbour lists for this many items at version load, the "
        "most popular first, then the rest of the catalogue in row order (0 turns it off); "
        "seeds among them skip the index.",
    )

    @model_validator(mode="after")
    def _enough_search(self) -> AnnoySimilarConfig:
        if self.search_k != -1 and self.search_k <= self.per_seed:
            raise ValueError(
                f"search_k {self.search_k} must be -1 or more than per_seed ({self.per_seed}): "
                "Annoy cannot return more neighbours than the nodes it inspects"
            )
        return self


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
    seeds keeps the seed it ranks highest for (the newest on a tie). Score =
    cosine similarity.
    """

    eager = True
    config_model = AnnoySimilarConfig
    config: AnnoySimilarConfig

    def prepare(self, served: ServedVersion) -> HotNeighbours | None:
        cfg = self.config
        if cfg.hot_items == 0:
            return None
        hot = served.popular_rows.tolist()[: cfg.hot_items]
        if len(hot) < cfg.hot_items:
            # A catalogue of a few thousand items is cheap to precompute entirely.
            known = set(hot)
            rest = [r for r in range(len(served.item_ids)) if r not in known]
            hot.extend(rest[: cfg.hot_items - len(hot)])
        rows = np.full((len(hot), cfg.per_seed), -1, np.int32)
        scores = np.zeros((len(hot), cfg.per_seed), np.float32)
        for slot, row in enumerate(hot):
            nn, dist = served.annoy.get_nns_by_item(row, cfg.per_seed + 1, cfg.search_k, True)
            kept = [(r, d) for r, d in zip(nn, dist, strict=True) if r != row][: cfg.per_seed]
            rows[slot, : len(kept)] = [r for r, _ in kept]
            scores[slot, : len(kept)] = [cosine_from_angular(d) for _, d in kept]
        return HotNeighbours({row: slot for slot, row in enumerate(hot)}, rows, scores)

    def _live(self, served: ServedVersion, row: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        # Same query as prepare() (per_seed, not n): Annoy's answer depends on
        # how many neighbours are asked for, and cached and live seeds must agree.
        nn, dist = served.annoy.get_nns_by_item(
            row, self.config.per_seed + 1, self.config.search_k, True
        )
        rows = np.asarray(nn, np.int64)
        keep = rows != row
        rows = rows[keep][:n]
        d = np.asarray(dist, np.float64)[keep][:n]
        return rows, 1.0 - d * d / 2.0  # cosine_from_angular, vectorised

    def _neighbours(
        self, served: ServedVersion, hot: HotNeighbours | None, seed_rows: list[int], n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``[n, len(seeds)]`` neighbour rows (-1 padded) and cosine scores, rank-major."""
        if hot is not None and n <= hot.rows.shape[1]:
            slots = [hot.slot.get(r) for r in seed_rows]
            if None not in slots:  # every seed precomputed: two gathers
                return hot.rows[slots, :n].T.astype(np.int64), hot.scores[slots, :n].T.astype(
                    np.float64
                )
        else:
            slots = [None] * len(seed_rows)
        rows = np.full((n, len(seed_rows)), -1, np.int64)
        scores = np.zeros((n, len(seed_rows)), np.float64)
        for col, (row, slot) in enumerate(zip(seed_rows, slots, strict=True)):
            if slot is not None:
                rows[:, col] = hot.rows[slot, :n]  # type: ignore[union-attr]
                scores[:, col] = hot.scores[slot, :n]  # type: ignore[union-attr]
            else:
                got, cos = self._live(served, row, n)
                rows[: got.shape[0], col] = got
                scores[: got.shape[0], col] = cos
        return rows, scores

    async def retrieve(self, ctx: RetrievalContext, k: int) -> Sequence[Candidate]:
        if ctx.hydrate_error and not ctx.recent_from_request and not ctx.recent:
            # No stored history could be read: an empty answer would look like
            # a user with no history, so say what happened instead. (A history
            # read fine beside a hash that did not decode is still used.)
            raise RedisUnavailable(ctx.hydrate_error)
        served = ctx.served
        index = served.item_index
        seeds = [i for i in ctx.recent if i in index][: self.config.seeds]
        if not seeds or k <= 0:
            return []
        # Usually enough per seed that a round-robin over the seeds reaches k.
        per_seed = self.config.per_seed
        n = min(per_seed, -(-k // len(seeds)) * 2)
        seed_rows = [index[s] for s in seeds]
        state = ctx.state_for(self)
        while True:
            rows, scores = self._neighbours(served, state, seed_rows, n)
            # Rank by rank, newest seed first at each: an item near several
            # seeds keeps the one it ranks highest for, and the seeds
            # themselves are never proposed.
            with served.marks() as marks:
                take = round_robin(rows, k, marks, exclude=seed_rows)
            if take.shape[0] >= k or n >= per_seed:
                break
            # Seeds close to one another (a binge of one cluster) share their
            # neighbours and are each other's: the rest of each list then.
            n = per_seed
        return CandidateBlock(
            served.item_ids,
            rows.ravel()[take],
            scores.ravel()[take],
            seeds=take % len(seeds),
            seed_ids=seeds,
        )
