"""One loaded model version as the retrieval service serves it.

A :class:`ServedVersion` bundles everything a request reads from a version -
the verified :class:`~recsys.artifacts.ModelVersion`, its memory-mapped Annoy
index, the catalogue lookup, the in-memory popular list and per-source
precomputed state - so hot reload swaps **one reference** and a request that
started on the old version keeps a consistent view to the end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys.artifacts import ArtifactError, ModelVersion
from retrieval_service.sources.base import TopListCache

# Nodes inspected per tree, at least, by SimilarItems (see ServedVersion.similar).
SIMILAR_MIN_SEARCH = 20


@dataclass(frozen=True)
class Neighbour:
    """One item near another in the item-vector space."""

    item_id: str
    score: float  # cosine similarity in [-1, 1]


def cosine_from_angular(distance: float) -> float:
    """Cosine similarity from Annoy's angular distance ``sqrt(2 - 2 cos)``."""
    return 1.0 - distance * distance / 2.0


@dataclass
class ServedVersion:
    """A version ready to serve; treat as immutable once published to requests."""

    model: ModelVersion
    annoy: Any  # annoy.AnnoyIndex, memory-mapped by Annoy
    item_ids: list[str]
    item_index: Mapping[str, int]
    popular: list[tuple[str, float]]
    search_k: int = -1
    source_state: dict[str, Any] = field(default_factory=dict)
    popular_scores: dict[str, float] = field(init=False, repr=False)
    # Copies of this version's Redis top lists (used when retrieval.top_list_cache is on).
    top_cache: TopListCache = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.popular_scores = dict(self.popular)
        self.top_cache = TopListCache(self.model.version)

    @property
    def version(self) -> str:
        """The version string (directory name)."""
        return self.model.version

    def neighbours_of_row(self, row: int, k: int, search_k: int | None = None) -> list[Neighbour]:
        """The ``k`` nearest items to catalogue row ``row``, itself excluded, best first."""
        if k <= 0:
            return []
        rows, dists = self.annoy.get_nns_by_item(
            row, k + 1, search_k if search_k is not None else self.search_k, True
        )
        ids = self.item_ids
        out = [
            Neighbour(ids[r], cosine_from_angular(d))
            for r, d in zip(rows, dists, strict=True)
            if r != row
        ]
        return out[:k]

    def similar(self, item_id: str, k: int) -> list[Neighbour]:
        """Neighbours of ``item_id``; raises KeyError for an id outside the catalogue.

        Annoy's default search (``(k + 1) * n_trees`` nodes) misses a few true
        neighbours at small ``k``; a user-facing "more like this" list
        searches at least ``SIMILAR_MIN_SEARCH`` nodes per tree.
        """
        search_k = self.search_k
        if search_k < 0:
            search_k = max(k + 1, SIMILAR_MIN_SEARCH) * self.annoy.get_n_trees()
        return self.neighbours_of_row(self.item_index[item_id], k, search_k)


def load_served_version(path: str | Path, *, search_k: int = -1) -> ServedVersion:
    """Opens, verifies and indexes a version directory (blocking; run it in a thread).

    Raises:
        ArtifactError: The version cannot be served (the message says why).
    """
    model = ModelVersion.open(path)
    annoy = model.annoy_index()
    ids = model.item_ids
    popular_raw = model.top_lists.get("popular", [])
    try:
        popular = [(str(i), float(s)) for i, s in popular_raw]
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{model.path}: top_lists.json 'popular' is malformed: {exc}") from exc
    if any(not math.isfinite(s) for _, s in popular):
        raise ArtifactError(f"{model.path}: top_lists.json 'popular' has a non-finite score")
    return ServedVersion(model, annoy, ids, model.item_index, popular, search_k=search_k)
