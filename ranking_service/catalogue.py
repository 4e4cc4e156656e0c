"""Item id → catalogue row mapping without Python bytecode per id."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat

import numpy as np


class IdIndex:
    """Maps item ids to catalogue rows; unknown ids map to -1.

    A lookup is ``np.fromiter(map(row_of.get, ids, repeat(-1)))``: ``map`` and
    ``fromiter`` iterate in C, so no Python bytecode runs per id, and the
    protobuf ``repeated string`` container is read directly, without first
    copying it into a list or a fixed-width numpy array. That is about 3x
    cheaper per Rank than hashing a unicode array in numpy (the previous
    implementation), because building the array already cost as much as the
    dictionary probes. The dictionary is the version's own ``item_index``
    when there is one, so a model version holds a single copy.
    """

    def __init__(
        self, item_ids: Sequence[str] | np.ndarray, row_of: Mapping[str, int] | None = None
    ):
        ids = item_ids.tolist() if isinstance(item_ids, np.ndarray) else item_ids
        if row_of is None:
            row_of = {iid: i for i, iid in enumerate(ids)}
            if len(row_of) != len(ids):
                raise ValueError("item ids must be unique")
        self._row_of = row_of
        self.size = len(ids)

    def __len__(self) -> int:
        return self.size

    def lookup(self, ids: Iterable[str] | np.ndarray) -> np.ndarray:
        """Rows of ``ids`` in request order; -1 where an id is unknown.

        Args:
            ids: Item ids: a list, a protobuf repeated field or a unicode numpy array.

        Returns:
            int64 ``[len(ids)]``.
        """
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        get = self._row_of.get
        try:
            count = len(ids)  # type: ignore[arg-type]
        except TypeError:
            return np.fromiter(map(get, ids, repeat(-1)), np.int64)
        return np.fromiter(map(get, ids, repeat(-1)), np.int64, count=count)
