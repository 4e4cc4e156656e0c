"""Item id → catalogue row mapping without a Python loop per id."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Odd 64-bit multipliers (from splitmix64); arithmetic wraps modulo 2**64.
_P = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def hash_ids(ids: np.ndarray) -> np.ndarray:
    """64-bit hashes of a fixed-width unicode array, vectorised over ids.

    ``sum(code[i] * P**(i+1))`` then a splitmix finaliser: numpy pads
    fixed-width strings with NUL code points, which add nothing to the
    sum, so an id hashes the same in arrays of any width. The loop runs
    over character positions (the width), never over ids.
    """
    n = ids.shape[0]
    width = ids.dtype.itemsize // 4
    h = np.zeros(n, np.uint64)
    if n == 0 or width == 0:
        return h
    codes = np.ascontiguousarray(ids).view(np.uint32).reshape(n, width)
    power = 1
    for i in range(width):
        power = (power * int(_P)) % (1 << 64)  # Python ints: no overflow warning
        h += codes[:, i].astype(np.uint64) * np.uint64(power)
    h ^= h >> np.uint64(30)
    h *= _M1
    h ^= h >> np.uint64(27)
    h *= _M2
    h ^= h >> np.uint64(31)
    return h


class IdIndex:
    """Maps item ids to catalogue rows with vectorised hashing, no Python loop per id.

    Ids are hashed to 64 bits (:func:`hash_ids`) into an open-addressing
    table (linear probing, load factor at most 1/2) held in two numpy
    arrays. A lookup hashes all query ids at once and probes the table in
    a few vectorised passes (one per probe step, not per id), so it costs
    O(n) with about one cache miss per id, even for a 1M-item catalogue.
    Every hit is confirmed by comparing the id strings, so a hash collision
    can never map an unknown id to a row. The index costs ~40 bytes per
    item plus the fixed-width id array.
    """

    def __init__(self, item_ids: Sequence[str]):
        ids = np.asarray(item_ids, dtype=np.str_)
        if ids.ndim != 1:
            raise ValueError("item ids must be a flat list of strings")
        self._ids = ids  # catalogue order, for confirming hits
        self.size = int(ids.shape[0])
        n_slots = 1 << max(4, int(2 * max(self.size, 1) - 1).bit_length())
        self._mask = np.uint64(n_slots - 1)
        self._keys = np.zeros(n_slots, np.uint64)
        self._rows = np.full(n_slots, -1, np.int64)
        self.max_probe = 0
        hashes = hash_ids(ids)
        pending = np.arange(self.size, dtype=np.int64)
        slots = hashes & self._mask
        while pending.size:
            free = self._rows[slots] < 0
            # Among pending ids aiming at a free slot, the first one per slot takes it.
            taken, first = np.unique(slots[free], return_index=True)
            winners = pending[free][first]
            self._rows[taken] = winners
            self._keys[taken] = hashes[winners]
            lost = np.ones(pending.size, bool)
            lost[np.flatnonzero(free)[first]] = False
            pending = pending[lost]
            if pending.size:
                self.max_probe += 1
            slots = (slots[lost] + np.uint64(1)) & self._mask

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
        out = np.full(query.shape[0], -1, np.int64)
        if query.size == 0 or self.size == 0:
            return out
        keys = hash_ids(query)
        home = keys & self._mask
        rows = self._rows[home]
        found = (rows >= 0) & (self._keys[home] == keys)
        out[found] = rows[found]
        # Ids not in their home slot (collided at build time, or unknown):
        # scan their whole probe window at once. Without deletions a key
        # always sits within max_probe slots of home, so the window decides.
        rest = np.flatnonzero(~found & (rows >= 0))
        if rest.size and self.max_probe:
            steps = np.arange(1, self.max_probe + 1, dtype=np.uint64)
            window = (home[rest, None] + steps[None, :]) & self._mask
            match = self._keys[window] == keys[rest, None]
            match &= self._rows[window] >= 0
            hit = match.any(axis=1)
            first = match.argmax(axis=1)
            out[rest[hit]] = self._rows[window[hit, first[hit]]]
        # Confirm on the strings, so a 64-bit collision cannot return a wrong row.
        known = np.flatnonzero(out >= 0)
        wrong = known[self._ids[out[known]] != query[known]]
        out[wrong] = -1
        return out
