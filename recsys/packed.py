"""The packed candidate list of ``Retrieve``: one encoder, one decoder.

``RetrieveRequest.packed`` asks for the answer as ``PackedCandidates``:
parallel arrays (ids, scores, a source bit mask, seed and genre indices into
small string tables, optional per-source score arrays) instead of one
``Candidate`` message per item. Building 500 messages, each with a map, was
about a third of the retrieval server's CPU per request; filling a handful
of repeated fields from numpy arrays is a few tens of microseconds, and the
receiver parses a few packed fields instead of 500 sub-messages.

:func:`pack` (the retrieval service) and :class:`PackedCandidateList` (any
client, e.g. the ranking service) are the only code that knows the layout;
``tests/unit/test_packed.py`` round-trips them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np

from recsys.v1 import common_pb2, retrieval_pb2


def _compact(index: np.ndarray, table: Sequence[str]) -> tuple[list[str], list[int]]:
    """Drops unused and repeated strings from ``table``; returns it and the remapped index."""
    if not len(table):
        return [], []
    used = np.zeros(len(table) + 1, bool)
    used[index] = True  # -1 lands on the spare last slot
    names: dict[str, int] = {}
    slot = np.full(len(table) + 1, -1, np.int64)
    # Two sources may name the same seed; one table entry each is enough.
    for i in np.flatnonzero(used[:-1]).tolist():
        slot[i] = names.setdefault(table[i], len(names))
    if not names:
        return [], []
    return list(names), slot[index].tolist()


def pack(
    msg: retrieval_pb2.PackedCandidates,
    *,
    item_ids: Sequence[str],
    scores: np.ndarray,
    source_names: Sequence[str],
    source_mask: np.ndarray,
    seeds: np.ndarray,
    seed_ids: Sequence[str],
    genres: np.ndarray,
    genre_names: Sequence[str],
    source_scores: np.ndarray | None = None,
) -> None:
    """Fills ``msg`` from arrays, one ``extend`` per field (no message per candidate).

    Args:
        msg: The (empty) message to fill.
        item_ids: Candidate ids in answer order.
        scores: float [m] best score, NaN when none (sent as 0, like ``Candidate.score``).
        source_names: The request's sources; bit ``i`` of a mask is ``source_names[i]``.
        source_mask: unsigned [m] sources that produced each candidate.
        seeds: int [m] index into ``seed_ids``, -1 for none.
        seed_ids: Seed item ids (unused and repeated entries are dropped on the wire).
        genres: int [m] index into ``genre_names``, -1 for none.
        genre_names: Genres (compacted the same way).
        source_scores: float [len(source_names), m] per-source scores (NaN: none), or
            None to leave them out (``omit_source_scores``).
    """
    msg.SetInParent()  # present even with no candidates, so clients know it was packed
    msg.item_ids.extend(item_ids)
    msg.scores.extend(np.nan_to_num(scores, nan=0.0).tolist())
    msg.source_names.extend(source_names)
    msg.source_mask.extend(source_mask.tolist())
    table, index = _compact(seeds, seed_ids)
    if table:
        msg.seeds.extend(table)
        msg.seed_index.extend(index)
    table, index = _compact(genres, genre_names)
    if table:
        msg.genres.extend(table)
        msg.genre_index.extend(index)
    if source_scores is not None:
        for row in source_scores.tolist():
            msg.source_scores.add().scores.extend(row)


class PackedCandidate:
    """One candidate of a :class:`PackedCandidateList`, read from the arrays on access.

    Has the fields of ``recsys.v1.Candidate`` that clients read (``item_id``,
    ``sources``, ``score``, ``source_scores``, ``seed_item_id``, ``genre``), so
    it fits :func:`recsys.explain.explain`; :meth:`to_pb` builds the message.
    """

    __slots__ = ("_i", "_list")

    def __init__(self, packed_list: PackedCandidateList, i: int):
        self._list = packed_list
        self._i = i

    @property
    def item_id(self) -> str:
        """Catalogue id."""
        return self._list.item_ids[self._i]

    @property
    def sources(self) -> list[str]:
        """Every source that produced the item, in config order."""
        return self._list.sources_of(self._i)

    @property
    def score(self) -> float:
        """Best retrieval score among its sources (0 when none gave one)."""
        return self._list.msg.scores[self._i]

    @property
    def source_scores(self) -> dict[str, float]:
        """Score per source name (empty when the request omitted them)."""
        return self._list.source_scores_of(self._i)

    @property
    def seed_item_id(self) -> str:
        """Seed item of a similarity source, empty when none."""
        return self._list.seed_of(self._i)

    @property
    def genre(self) -> str:
        """Genre of a per-genre source, empty when none."""
        return self._list.genre_of(self._i)

    def to_pb(self) -> common_pb2.Candidate:
        """The same candidate as a ``recsys.v1.Candidate`` message."""
        c = common_pb2.Candidate(
            item_id=self.item_id,
            sources=self.sources,
            score=self.score,
            seed_item_id=self.seed_item_id,
            genre=self.genre,
        )
        c.source_scores.update(self.source_scores)
        return c

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedCandidate):
            other = other.to_pb()
        if isinstance(other, common_pb2.Candidate):
            return self.to_pb() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-message semantics, like pb2

    def __repr__(self) -> str:
        return f"PackedCandidate({self.item_id!r}, sources={self.sources}, score={self.score:g})"


class PackedCandidateList(Sequence[PackedCandidate]):
    """``PackedCandidates`` read as a sequence of candidates, each decoded on access.

    ``item_ids`` is the whole id list (one copy out of the message); the
    other fields of a candidate are read only when asked, so a caller that
    ranks 500 candidates and shows 10 decodes 10.
    """

    def __init__(self, msg: retrieval_pb2.PackedCandidates):
        self.msg = msg
        self.item_ids: list[str] = list(msg.item_ids)
        self.source_names: list[str] = list(msg.source_names)
        n = len(self.item_ids)
        for field, size in (
            ("scores", len(msg.scores)),
            ("source_mask", len(msg.source_mask)),
            ("seed_index", len(msg.seed_index) or n),
            ("genre_index", len(msg.genre_index) or n),
        ):
            if size != n:
                raise ValueError(f"PackedCandidates.{field} has {size} entries for {n} item_ids")
        if msg.source_scores and len(msg.source_scores) != len(self.source_names):
            raise ValueError("PackedCandidates.source_scores does not match source_names")
        for field, index, table in (
            ("seed_index", msg.seed_index, msg.seeds),
            ("genre_index", msg.genre_index, msg.genres),
        ):
            if index and not -1 <= min(index) <= max(index) < len(table):
                raise ValueError(f"PackedCandidates.{field} points outside its table")

    def __len__(self) -> int:
        return len(self.item_ids)

    @overload
    def __getitem__(self, i: int) -> PackedCandidate: ...

    @overload
    def __getitem__(self, i: slice) -> list[PackedCandidate]: ...

    def __getitem__(self, i: int | slice) -> PackedCandidate | list[PackedCandidate]:
        if isinstance(i, slice):
            return [PackedCandidate(self, j) for j in range(*i.indices(len(self)))]
        n = len(self.item_ids)
        j = int(i) + n if i < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"candidate {i} of {n}")
        return PackedCandidate(self, j)

    def __iter__(self) -> Iterator[PackedCandidate]:
        for j in range(len(self.item_ids)):
            yield PackedCandidate(self, j)

    def sources_of(self, i: int) -> list[str]:
        """Source names of candidate ``i``."""
        mask = self.msg.source_mask[i]
        return [name for b, name in enumerate(self.source_names) if mask >> b & 1]

    def source_scores_of(self, i: int) -> dict[str, float]:
        """Per-source scores of candidate ``i`` (sources that gave none left out)."""
        out: dict[str, float] = {}
        for name, row in zip(self.source_names, self.msg.source_scores, strict=False):
            s = row.scores[i]
            if not math.isnan(s):
                out[name] = s
        return out

    def seed_of(self, i: int) -> str:
        """Seed item id of candidate ``i``, or ""."""
        idx = self.msg.seed_index
        return self.msg.seeds[idx[i]] if idx and idx[i] >= 0 else ""

    def genre_of(self, i: int) -> str:
        """Genre of candidate ``i``, or ""."""
        idx = self.msg.genre_index
        return self.msg.genres[idx[i]] if idx and idx[i] >= 0 else ""


def candidates_of(response: Any) -> tuple[Sequence[Any], list[str]]:
    """A ``RetrieveResponse``'s candidates and their ids, packed or not.

    A server that predates ``RetrieveRequest.packed`` answers with
    ``candidates``; this reads whichever form came back.
    """
    if response.HasField("packed"):
        packed = PackedCandidateList(response.packed)
        return packed, packed.item_ids
    return response.candidates, [c.item_id for c in response.candidates]
