"""Item id → catalogue row mapping without a Python loop per id."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class IdIndex:
    """Maps item ids to catalogue rows with one vectorised binary search.

    The ids are kept as a sorted fixed-width unicode array plus the
    permutation back to catalogue order, so a lookup of n ids against a
    catalogue of N items is ``np.searchsorted`` (n log N string compares in
    C) instead of n dictionary lookups in Python. For a 1M-item catalogue the
    index costs a few tens of MB and no per-id Python objects.
    """

    def __init__(self, item_ids: Sequence[str]):
        ids = np.asarray(item_ids, dtype=np.str_)
        if ids.ndim != 1:
            raise ValueError("item ids must be a flat list of strings")
        order = np.argsort(ids, kind="stable")
        self._sorted = ids[order]
        self._rows = order.astype(np.int64)
        self.size = int(ids.shape[0])

    def __len__(self) -> int:
        return self.size

    def lookup(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Rows of ``ids`` in catalogue order; -1 where an id is unknown.

        Args:
            ids: Item ids (a list of str, or a unicode numpy array).

        Returns:
            int64 ``[len(ids)]``.
        """
        query = np.asarray(ids, dtype=np.str_)
        if query.size == 0 or self.size == 0:
            return np.full(query.shape[0], -1, np.int64)
        pos = np.searchsorted(self._sorted, query)
        pos = np.minimum(pos, self.size - 1)
        hit = self._sorted[pos] == query
        return np.where(hit, self._rows[pos], -1)
