"""Set operations on catalogue rows without sorting (both services)."""

from __future__ import annotations

import numpy as np


class RowMarks:
    """Scratch arrays over catalogue rows: set operations on rows without sorting.

    numpy's set routines (``unique``, ``isin``) sort, and on the few hundred
    rows of one request their fixed cost dominates. Here a set of rows is a
    *stamp* written into a catalogue-sized array (``stamp[rows] = g``), so
    marking and testing are single fancy-indexing steps. Each marking takes
    a fresh generation ``g`` of its slot, so nothing is cleared (until a
    slot's counter wraps, which clears that slot alone). ``SLOTS`` sets can
    be live at once (one array each).

    Shared by both services: retrieval's merge and filters, ranking's dedup
    and watched filter. Not thread-safe: retrieval's
    :meth:`ServedVersion.marks` lends one to one caller at a time; ranking
    keeps one per loaded model and uses it on the event loop only.

    Args:
        n: Catalogue size.
    """

    SLOTS = 2

    def __init__(self, n: int):
        self._stamps = [np.zeros(n, np.int32) for _ in range(self.SLOTS)]
        self._pos = np.zeros(n, np.int64)
        # One counter per slot: when a slot's int32 stamps run out it starts
        # over from a cleared array, and only that slot's set (the one being
        # replaced) is lost, never a live set in the other slot.
        self._gen = [0] * self.SLOTS

    def _next(self, slot: int) -> int:
        g = self._gen[slot] + 1
        if g >= 2**31 - 1:
            self._stamps[slot].fill(0)
            g = 1
        self._gen[slot] = g
        return g

    def mark(self, slot: int, rows: np.ndarray) -> int:
        """Makes ``rows`` the set in ``slot``; returns its generation for :meth:`has`."""
        g = self._next(slot)
        self._stamps[slot][rows] = g
        return g

    def scratch(self, slot: int) -> tuple[np.ndarray, int]:
        """A fresh, empty set in ``slot`` as (stamp array, generation), for compiled loops.

        A row is in the set when ``stamp[row] == generation``; writing the
        generation adds it; :meth:`has` sees the same set.
        """
        return self._stamps[slot], self._next(slot)

    def position_scratch(self) -> np.ndarray:
        """An int64 catalogue-sized scratch array (a chosen row's position), for compiled loops."""
        return self._pos

    def has(self, slot: int, g: int, rows: np.ndarray) -> np.ndarray:
        """Boolean mask: which ``rows`` are in the set of generation ``g`` in ``slot``."""
        return self._stamps[slot][rows] == g

    def first(self, rows: np.ndarray) -> np.ndarray:
        """Boolean mask of the first occurrence of each distinct value in ``rows``."""
        n = rows.shape[0]
        idx = np.arange(n)
        pos = self._pos
        pos[rows] = n
        np.minimum.at(pos, rows, idx)  # ufunc.at: defined for repeated indices
        return pos[rows] == idx
