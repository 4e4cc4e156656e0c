"""Item id → catalogue row mapping without Python bytecode per id."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat

import numpy as np
from numba import njit


class IdIndex:
    """Maps item ids to catalogue rows; unknown ids map to -1.

    A lookup is ``np.fromiter(map(row_of.get, ids, repeat(-1)))``: ``map`` and
    ``fromiter`` iterate in C, so no Python bytecode runs per id, and the
    protobuf ``repeated string`` container is read directly, without first
    copying it into a list or a fixed-width numpy array. That is about 3x
    cheaper per Rank than hashing a unicode array in numpy (the previous
    implementation), because building the array already cost as much as the
    dictionary probes. The dictionary is the version's own ``item_index``
    when there is one, so a model version holds a single copy; it must map
    each id to its position in ``item_ids``.

    :meth:`lookup_field` reads ids from protobuf wire bytes instead, through
    a second structure built here from ``item_ids``: the ids' UTF-8 bytes and
    an open-addressing table of rows (~23 MB for 1M ids, ~0.5 s to build).
    Building it also rejects repeated ids.
    """

    def __init__(
        self, item_ids: Sequence[str] | np.ndarray, row_of: Mapping[str, int] | None = None
    ):
        ids = item_ids.tolist() if isinstance(item_ids, np.ndarray) else item_ids
        # Raises on a repeated id, whether or not a mapping was given.
        self._keys, self._offsets, self._table = _byte_table(ids)
        if row_of is None:
            row_of = {iid: i for i, iid in enumerate(ids)}
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

    def lookup_field(self, message: bytes, field_number: int, count: int) -> np.ndarray | None:
        """Rows of the ids in one ``repeated string`` field of an encoded message.

        The ids are read from the protobuf wire bytes and hashed there, in
        compiled code: no Python string is made per id. For a 1,000-id
        ``RankRequest`` that is ~15 µs (re-encoding the parsed message
        included) against ~80 µs for :meth:`lookup` on the parsed field,
        most of which is creating the 1,000 ``str`` objects.

        Args:
            message: The encoded message (``SerializeToString()``).
            field_number: The field's number in the message.
            count: How many ids the parsed field holds.

        Returns:
            int64 ``[count]`` rows as :meth:`lookup` would return them, or
            None when the bytes cannot be read that way (a group among
            unknown fields, malformed input, a count that does not match),
            so the caller falls back to :meth:`lookup`.
        """
        out = np.empty(count, np.int64)
        buf = np.frombuffer(message, np.uint8)
        if _scan_field(buf, field_number, self._keys, self._offsets, self._table, out) != count:
            return None
        return out


def _byte_table(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ids' UTF-8 bytes end to end, their offsets, and an open-addressing table of rows."""
    # surrogatepass: such an id cannot arrive in a protobuf string, but it
    # must not stop the catalogue from loading either.
    encoded = [s.encode("utf-8", "surrogatepass") for s in ids]
    keys = np.frombuffer(b"".join(encoded), np.uint8)
    offsets = np.zeros(len(encoded) + 1, np.int64)
    offsets[1:] = np.cumsum(np.fromiter(map(len, encoded), np.int64, count=len(encoded)))
    size = 1
    while size < 2 * len(encoded):  # at most half full: short probe runs
        size *= 2
    table = np.full(size, -1, np.int32 if len(encoded) < 2**31 else np.int64)
    dup = _fill_table(keys, offsets, table)
    if dup >= 0:
        raise ValueError(f"item ids must be unique ({ids[dup]!r} repeats)")
    # Compiles the scan (or loads it from numba's cache) with the argument
    # types requests use, so no request pays for it.
    _scan_field(np.frombuffer(b"\x12\x00", np.uint8), 2, keys, offsets, table,
                np.empty(1, np.int64))  # fmt: skip
    return keys, offsets, table


@njit(cache=True, inline="always")
def _hash(buf: np.ndarray, a: int, b: int) -> int:
    """FNV-1a over ``buf[a:b]``, as a non-negative int64."""
    h = np.uint64(0xCBF29CE484222325)
    prime = np.uint64(0x100000001B3)
    for i in range(a, b):
        h = (h ^ np.uint64(buf[i])) * prime
    return np.int64(h >> np.uint64(1))


@njit(cache=True, inline="always")
def _slot(
    keys: np.ndarray, offsets: np.ndarray, table: np.ndarray, buf: np.ndarray, a: int, b: int
) -> int:
    """The table slot holding the id ``buf[a:b]``, or the empty slot where it would go."""
    mask = table.shape[0] - 1
    n = b - a
    s = _hash(buf, a, b) & mask
    while True:
        t = table[s]
        if t < 0:
            return s
        ta = offsets[t]
        if offsets[t + 1] - ta == n:
            same = True
            for i in range(n):
                if keys[ta + i] != buf[a + i]:
                    same = False
                    break
            if same:
                return s
        s = (s + 1) & mask


@njit(cache=True)
def _fill_table(keys: np.ndarray, offsets: np.ndarray, table: np.ndarray) -> int:
    """Inserts every id's row; returns the row of a repeated id, or -1."""
    for row in range(offsets.shape[0] - 1):
        s = _slot(keys, offsets, table, keys, offsets[row], offsets[row + 1])
        if table[s] >= 0:
            return row
        table[s] = row
    return -1


@njit(cache=True, inline="always")
def _varint(buf: np.ndarray, at: int) -> tuple[int, int]:
    """A varint of at most 5 bytes at ``buf[at]``: (value, next position), next -1 if bad.

    Five bytes cover every tag (field numbers fit 29 bits) and any length
    that could fit in the buffer.
    """
    n = buf.shape[0]
    value = 0
    shift = 0
    while at < n and shift < 35:
        c = np.int64(buf[at])
        at += 1
        value |= (c & 0x7F) << shift
        if c < 0x80:
            return value, at
        shift += 7
    return 0, -1


@njit(cache=True)
def _scan_field(
    buf: np.ndarray,
    field: int,
    keys: np.ndarray,
    offsets: np.ndarray,
    table: np.ndarray,
    out: np.ndarray,
) -> int:
    """Walks a message's top-level fields, writing the row of each ``field`` entry to ``out``.

    Returns how many entries were found, or -1 for bytes it will not read
    (truncated, a group, a varint too long, more entries than ``out``).
    Every read is bounds-checked here: numba does not check indices.
    """
    n = buf.shape[0]
    at = 0
    found = 0
    while at < n:
        tag, at = _varint(buf, at)
        if at < 0:
            return -1
        wire = tag & 7
        if wire == 0:  # varint: skip it
            while True:
                if at >= n:
                    return -1
                c = np.int64(buf[at])
                at += 1
                if c < 0x80:
                    break
        elif wire == 1:  # fixed64
            at += 8
        elif wire == 5:  # fixed32
            at += 4
        elif wire == 2:  # length-delimited
            length, at = _varint(buf, at)
            end = at + length
            if at < 0 or end > n:
                return -1
            if tag >> 3 == field:
                if found >= out.shape[0]:
                    return -1
                row = table[_slot(keys, offsets, table, buf, at, end)]
                out[found] = row
                found += 1
            at = end
        else:  # groups (3, 4) and the unused wire types
            return -1
        if at > n:
            return -1
    return found
