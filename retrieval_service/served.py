"""One loaded model version as the retrieval service serves it.

A :class:`ServedVersion` bundles everything a request reads from a version -
the verified :class:`~recsys.artifacts.ModelVersion`, its memory-mapped Annoy
index, the catalogue lookup, the in-memory popular list and per-source
precomputed state - so hot reload swaps **one reference** and a request that
started on the old version keeps a consistent view to the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from recsys.artifacts import ArtifactError, ModelVersion
from recsys.rows import RowMarks
from retrieval_service.sources.base import TopListCache

# Nodes an Annoy query inspects, tuned with the trainer's default 10 trees:
# recall@10 0.95 on 100K x 32 vectors (bench/retrieval.py sweeps it). The
# annoy_similar source's default, and the least SimilarItems searches.
TUNED_SEARCH_K = 750


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
    # Copies of this version's Redis top lists (used when retrieval.top_list_cache is on).
    top_cache: TopListCache = field(init=False, repr=False)
    # The popular list as catalogue rows (unknown and repeated ids left out) and scores.
    popular_rows: np.ndarray = field(init=False, repr=False)
    popular_row_scores: np.ndarray = field(init=False, repr=False)
    # Scratch arrays lent to one request at a time (see marks()).
    _marks: list[RowMarks] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.top_cache = self.new_top_cache()
        rows, scores, seen = [], [], set()
        for item, score in self.popular:
            row = self.item_index.get(item)
            if row is not None and row not in seen:
                seen.add(row)
                rows.append(row)
                scores.append(score)
        self.popular_rows = np.asarray(rows, np.int64)
        self.popular_row_scores = np.asarray(scores, np.float64)
        self._marks = []

    @property
    def version(self) -> str:
        """The version string (directory name)."""
        return self.model.version

    def new_top_cache(self, build: str | None = None) -> TopListCache:
        """An empty :class:`TopListCache` for this version, made under ``build``."""
        return TopListCache(self.model.version, index=self.item_index, build=build)

    def rows_of(self, ids: Iterable[str], n: int = -1) -> np.ndarray:
        """Catalogue rows of ``ids``, ids outside the catalogue left out.

        ``n`` is the number of ids when known (saves growing the array).
        """
        rows = np.fromiter(map(self.item_index.get, ids, repeat(-1)), np.int64, n)
        return rows if not rows.shape[0] or rows.min() >= 0 else rows[rows >= 0]

    @contextmanager
    def marks(self) -> Iterator[RowMarks]:
        """Lends a :class:`RowMarks` over this catalogue to one caller.

        Synchronous code between two awaits holds it, so one event loop needs
        one; a second is made only when another thread holds the first.
        """
        pool = self._marks
        try:
            marks = pool.pop()  # atomic under the GIL
        except IndexError:
            marks = RowMarks(len(self.item_ids))
        try:
            yield marks
        finally:
            pool.append(marks)

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

        Annoy's default search (``(k + 1) * n_trees`` nodes) misses true
        neighbours at small ``k``; a user-facing "more like this" list
        searches at least :data:`TUNED_SEARCH_K` nodes in all. (A floor per
        tree, set when versions had 30 trees, gave 200 nodes once they had
        10: recall@10 0.73 on a 100K catalogue.)
        """
        search_k = self.search_k
        if search_k < 0:
            search_k = max((k + 1) * self.annoy.get_n_trees(), TUNED_SEARCH_K)
        return self.neighbours_of_row(self.item_index[item_id], k, search_k)


def load_served_version(path: str | Path, *, search_k: int = -1) -> ServedVersion:
    """Opens, verifies and indexes a version directory (blocking; run it in a thread).

    Raises:
        ArtifactError: The version cannot be served (the message says why).
    """
    model = ModelVersion.open(path)
    annoy = model.annoy_index()
    ids = model.item_ids
    _ = model.catalogue_id  # hashed here, off the request path
    popular_raw = model.top_lists.get("popular", [])
    try:
        popular = [(str(i), float(s)) for i, s in popular_raw]
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{model.path}: top_lists.json 'popular' is malformed: {exc}") from exc
    if any(not math.isfinite(s) for _, s in popular):
        raise ArtifactError(f"{model.path}: top_lists.json 'popular' has a non-finite score")
    return ServedVersion(model, annoy, ids, model.item_index, popular, search_k=search_k)
