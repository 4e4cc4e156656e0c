"""Merge, filter, interleave and refill: the pure part of ``Retrieve``.

No I/O and no protobuf here, so every rule is unit-tested directly:

* :func:`merge` - deduplicate across sources, keeping every source that
  produced an item (attribution), its per-source score, seed and genre.
* :func:`filter_lists` - per-source ordered lists without watched/excluded
  ids, ids outside the served catalogue, and in-source repeats.
* :func:`select` - weighted fair interleave up to the budget (each source
  capped at its own budget), then refill from the fallback chain
  (personalised -> segment -> popular leftovers), then a last-resort pad.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
from numba import njit

from recsys.rows import RowMarks
from retrieval_service.sources.base import TIERS, Candidate, CandidateBlock, Tier


@dataclass
class MergedCandidate:
    """One deduplicated item with every source that proposed it."""

    item_id: str
    sources: list[str] = field(default_factory=list)
    source_scores: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    seed_item_id: str | None = None
    genre: str | None = None


def merge(
    results: Mapping[str, Sequence[Candidate]], only: Container[str] | None = None
) -> dict[str, MergedCandidate]:
    """Deduplicates candidates across sources, in source order then rank order.

    Args:
        results: Each source's candidates, best first, in source order.
        only: When given, merge just these ids (the ones already selected),
            which skips the attribution work for candidates that were dropped.
    """
    merged: dict[str, MergedCandidate] = {}
    get = merged.get
    # The loop body is MergedCandidate.add inlined: this runs for every
    # candidate of every source on every request.
    for source, cands in results.items():
        for c in cands:
            iid = c.item_id
            if only is not None and iid not in only:
                continue
            m = get(iid)
            score = c.score
            if m is None:
                merged[iid] = MergedCandidate(
                    iid,
                    [source],
                    {} if score is None else {source: score},
                    score,
                    c.seed_item_id or None,
                    c.genre or None,
                )
                continue
            if source in m.sources:
                continue
            m.sources.append(source)
            if score is not None:
                m.source_scores[source] = score
                if m.score is None or score > m.score:
                    m.score = score
            if m.seed_item_id is None and c.seed_item_id:
                m.seed_item_id = c.seed_item_id
            if m.genre is None and c.genre:
                m.genre = c.genre
    return merged


def filter_lists(
    results: Mapping[str, Sequence[Candidate]],
    *,
    excluded: Container[str],
    catalogue: Container[str],
) -> dict[str, list[str]]:
    """Per-source item ids in source order, without excluded, unknown or repeated ids."""
    out: dict[str, list[str]] = {}
    for source, cands in results.items():
        seen: set[str] = set()
        keep: list[str] = []
        for c in cands:
            i = c.item_id
            if i in seen or i in excluded or i not in catalogue:
                continue
            seen.add(i)
            keep.append(i)
        out[source] = keep
    return out


@dataclass(frozen=True)
class Lane:
    """How one source takes part in the interleave."""

    name: str
    weight: float = 1.0
    quota: int = 1 << 30  # most items it may place in the first pass (its budget)
    tier: Tier = "personalised"


def _fair_pass(
    lists: Mapping[str, Sequence[str]],
    lanes: Sequence[Lane],
    budget: int,
    out: list[str],
    taken: set[str],
    *,
    use_quota: bool,
) -> None:
    # Weighted fair queueing: item j of a lane with weight w gets virtual time
    # (j + 1) / w; taking items in virtual-time order gives each lane a share
    # of the turns proportional to its weight, ties going to config order.
    entries = [
        ((j + 1) / lane.weight, li, item)
        for li, lane in enumerate(lanes)
        for j, item in enumerate(lists.get(lane.name, ()))
    ]
    # (virtual time, lane) is unique per entry, so the item is never compared.
    entries.sort()
    placed = [0] * len(lanes)
    for _, li, item in entries:
        if len(out) >= budget:
            return
        if item in taken or (use_quota and placed[li] >= lanes[li].quota):
            continue
        taken.add(item)
        out.append(item)
        placed[li] += 1


def select(
    lists: Mapping[str, Sequence[str]],
    lanes: Sequence[Lane],
    budget: int,
    pad: Iterable[str] = (),
) -> list[str]:
    """Chooses up to ``budget`` distinct items from already-filtered source lists.

    1. Fair interleave: lanes take turns in proportion to their weights, each
       placing at most ``quota`` items, so one big source cannot crowd out
       the rest.
    2. Refill, when the list is still short: the leftovers of each tier in
       fallback order (personalised, segment, popular), quotas lifted.
    3. ``pad`` (already filtered, e.g. the in-memory popular list) fills the rest.

    Returns:
        Item ids in answer order.
    """
    out: list[str] = []
    taken: set[str] = set()
    if budget <= 0:
        return out
    _fair_pass(lists, lanes, budget, out, taken, use_quota=True)
    for tier in TIERS:
        if len(out) >= budget:
            break
        tier_lanes = [lane for lane in lanes if lane.tier == tier]
        if tier_lanes:
            _fair_pass(lists, tier_lanes, budget, out, taken, use_quota=False)
    for item in pad:
        if len(out) >= budget:
            break
        if item not in taken:
            taken.add(item)
            out.append(item)
    return out


# --- The same rules over numpy arrays (what the engine runs) ----------------------------
#
# ``merge``/``filter_lists``/``select`` above are the readable statement of the
# rules; the engine runs ``assemble`` below, which applies them to the
# sources' CandidateBlocks without a Python object per candidate. A property
# test checks that both give the same answer.


@dataclass
class Selection:
    """The answer of ``Retrieve`` as parallel arrays, one entry per candidate in answer order.

    Attributes:
        rows: int64 [m] catalogue rows.
        scores: float64 [m] best score among the item's sources, NaN when none scored it.
        source_names: The request's sources; bit ``i`` of ``source_mask`` is ``source_names[i]``.
        source_mask: uint64 [m] every source that proposed the item.
        source_scores: float64 [len(source_names), m] each source's score, NaN where
            the source did not propose the item or gave no score.
        seed_ids: Seed items ``seeds`` refers to.
        seeds: int64 [m] index into ``seed_ids`` (-1: none), first seed in source order.
        genre_names: Genres ``genres`` refers to.
        genres: int64 [m] index into ``genre_names`` (-1: none), first genre in source order.
    """

    rows: np.ndarray
    scores: np.ndarray
    source_names: list[str]
    source_mask: np.ndarray
    source_scores: np.ndarray
    seed_ids: list[str]
    seeds: np.ndarray
    genre_names: list[str]
    genres: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def merged(self, item_ids: Sequence[str]) -> list[MergedCandidate]:
        """The same answer as :class:`MergedCandidate` objects (built on demand, slow)."""
        names = self.source_names
        out = []
        masks = self.source_mask.tolist()
        scores = self.scores.tolist()
        per_source = self.source_scores.T.tolist()
        for i, row in enumerate(self.rows.tolist()):
            srcs = [names[b] for b in range(len(names)) if masks[i] >> b & 1]
            by_source = {
                names[b]: s for b, s in enumerate(per_source[i]) if masks[i] >> b & 1 and s == s
            }
            seed, genre = int(self.seeds[i]), int(self.genres[i])
            out.append(
                MergedCandidate(
                    item_ids[row],
                    srcs,
                    by_source,
                    None if scores[i] != scores[i] else scores[i],
                    self.seed_ids[seed] if seed >= 0 else None,
                    self.genre_names[genre] if genre >= 0 else None,
                )
            )
        return out


def assemble(
    blocks: Sequence[CandidateBlock],
    lanes: Sequence[Lane],
    names: Sequence[str],
    budget: int,
    marks: RowMarks,
    excluded: np.ndarray,
    pad: tuple[str, np.ndarray, np.ndarray] | None = None,
) -> tuple[Selection, int]:
    """Filter, interleave, refill, pad and attribute: the merge of ``Retrieve`` on arrays.

    The rules of :func:`filter_lists`, :func:`select` and :func:`merge`, run
    as one compiled pass over the sources' blocks (see :func:`_assemble`).

    Args:
        blocks: The answer of each lane's source (same order as ``lanes``;
            rows distinct within a block and inside the catalogue).
        lanes: Weight, quota and tier of each source that answered.
        names: Every source of the request, in config order (the bits of the mask).
        budget: Most candidates to return.
        marks: Scratch over the catalogue (all slots).
        excluded: Catalogue rows to drop (watched, excluded, recent).
        pad: ``(source name, rows, scores)`` of the last-resort fill (the in-memory
            popular list, rows distinct), or None.

    Returns:
        The selection, and how many of the blocks' candidates passed the filter.
    """
    n_lanes = len(blocks)
    sizes = [b.rows.shape[0] for b in blocks]
    starts = np.asarray([0, *accumulate(sizes)], np.int64)
    # Lane-major concatenations; a block without scores, seeds or genres
    # reads from a shared filler (a view: nothing allocated per request).
    nan, none = _fillers(max(sizes, default=0))
    seed_ids: list[str] = []
    genre_names: list[str] = []
    seed_off, genre_off = [], []  # where each lane's indexes start in the request-wide lists
    for blk in blocks:
        seed_off.append(len(seed_ids))
        if blk.seeds is not None:
            seed_ids.extend(blk.seed_ids)
        genre_off.append(len(genre_names))
        if blk.genres is not None:
            genre_names.extend(blk.genre_names)
    if n_lanes:
        rows = np.concatenate([blk.rows for blk in blocks]).astype(np.int64, copy=False)
        scores = np.concatenate(
            [
                nan[:n] if blk.scores is None else blk.scores
                for blk, n in zip(blocks, sizes, strict=True)
            ]
        ).astype(np.float64, copy=False)
        seeds = np.concatenate(
            [
                none[:n] if blk.seeds is None else blk.seeds
                for blk, n in zip(blocks, sizes, strict=True)
            ]
        ).astype(np.int64, copy=False)
        genres = np.concatenate(
            [
                none[:n] if blk.genres is None else blk.genres
                for blk, n in zip(blocks, sizes, strict=True)
            ]
        ).astype(np.int64, copy=False)
    else:
        rows = seeds = genres = np.zeros(0, np.int64)
        scores = np.zeros(0, np.float64)
    bit = {name: i for i, name in enumerate(names)}
    weights = np.asarray([ln.weight for ln in lanes], np.float64)
    quota = np.asarray([min(ln.quota, max(budget, 0)) for ln in lanes], np.int64)
    tier = np.asarray([TIERS.index(ln.tier) if ln.tier in TIERS else -1 for ln in lanes], np.int64)
    bits = np.asarray([bit[ln.name] for ln in lanes], np.int64)
    no_rows = np.zeros(0, np.int64)
    pad_rows, pad_scores, pad_bit = no_rows, np.zeros(0, np.float64), -1
    if pad is not None:
        pad_rows, pad_scores, pad_bit = pad[1], pad[2], bit[pad[0]]
    ex_stamp, ex_g = marks.scratch(0)
    ex_stamp[excluded] = ex_g
    stamp, taken = marks.scratch(1)
    order, best, mask, per_source, seed_of, genre_of, kept = _assemble(
        rows,
        starts,
        scores,
        seeds,
        genres,
        np.asarray(seed_off, np.int64),
        np.asarray(genre_off, np.int64),
        weights,
        len({ln.weight for ln in lanes}) <= 1,
        quota,
        tier,
        len(TIERS),
        bits,
        len(names),
        max(budget, 0),
        ex_stamp,
        ex_g,
        stamp,
        taken,
        marks.position_scratch(),
        pad_rows,
        pad_scores,
        pad_bit,
    )
    selection = Selection(
        order,
        best,
        list(names),
        mask,
        per_source,
        seed_ids,
        seed_of,
        genre_names,
        genre_of,
    )
    return selection, kept


_FILLERS: list[tuple[np.ndarray, np.ndarray]] = []


def _fillers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only NaN and -1 arrays of at least ``n`` entries (made once, grown when needed)."""
    if not _FILLERS or _FILLERS[0][0].shape[0] < n:
        size = max(n, 1024)
        nan, none = np.full(size, np.nan), np.full(size, -1, np.int64)
        nan.flags.writeable = none.flags.writeable = False
        _FILLERS[:] = [(nan, none)]
    return _FILLERS[0]


@njit(cache=True, boundscheck=True)
def _assemble(
    rows,
    starts,
    scores,
    seeds,
    genres,
    seed_off,
    genre_off,
    weights,
    equal,
    quota,
    tier,
    n_tiers,
    bits,
    n_names,
    budget,
    ex_stamp,
    ex_g,
    stamp,
    taken,
    pos,
    pad_rows,
    pad_scores,
    pad_bit,
):  # pragma: no cover - compiled; checked against the readable rules by property tests
    """:func:`assemble`'s work over the blocks concatenated lane by lane.

    Compiled because the same rules as whole-array numpy steps took ~100
    small calls per request (a round of steps each time a lane fills), the
    largest share of retrieval's CPU.
    """
    n_lanes = starts.shape[0] - 1
    # Filter: each lane's entries that are not excluded, with their rank in the lane.
    kept = np.empty(rows.shape[0], np.int64)
    kept_lane = np.empty(rows.shape[0], np.int64)
    kept_rank = np.empty(rows.shape[0], np.int64)
    sizes = np.zeros(n_lanes, np.int64)
    n_kept = 0
    for ln in range(n_lanes):
        for i in range(starts[ln], starts[ln + 1]):
            if ex_stamp[rows[i]] == ex_g:
                continue
            kept[n_kept] = i
            kept_lane[n_kept] = ln
            kept_rank[n_kept] = sizes[ln]
            sizes[ln] += 1
            n_kept += 1
    # Turn order (weighted fair queueing, as _fair_pass): entry j of a lane of
    # weight w has virtual time (j + 1) / w; ties go to the lane first in config order.
    turn = np.empty(n_kept, np.int64)
    if equal:  # rank 0 of every lane, then rank 1, ...: no sort needed
        first = np.zeros(n_lanes, np.int64)
        for ln in range(1, n_lanes):
            first[ln] = first[ln - 1] + sizes[ln - 1]
        t = 0
        for rank in range(sizes.max() if n_lanes else 0):
            for ln in range(n_lanes):
                if rank < sizes[ln]:
                    turn[t] = first[ln] + rank
                    t += 1
    else:
        vt = np.empty(n_kept, np.float64)
        for t in range(n_kept):
            vt[t] = (kept_rank[t] + 1) / weights[kept_lane[t]]
        turn = np.argsort(vt, kind="mergesort")  # stable: lane-major input breaks ties
    # First pass: turn order, quotas on; then refill tier by tier, quotas lifted.
    out = np.empty(budget, np.int64)
    placed = np.zeros(n_lanes, np.int64)
    n = 0
    for t in range(n_kept):
        if n >= budget:
            break
        e = turn[t]
        r, ln = rows[kept[e]], kept_lane[e]
        if stamp[r] == taken or placed[ln] >= quota[ln]:
            continue
        stamp[r] = taken
        out[n] = r
        n += 1
        placed[ln] += 1
    for want in range(n_tiers):
        for t in range(n_kept):
            if n >= budget:
                break
            e = turn[t]
            r = rows[kept[e]]
            if tier[kept_lane[e]] != want or stamp[r] == taken:
                continue
            stamp[r] = taken
            out[n] = r
            n += 1
    from_lanes = n
    # Last resort: the pad list, not excluded and not taken.
    pad_at = np.empty(budget, np.int64)
    if pad_bit >= 0:
        for i in range(pad_rows.shape[0]):
            if n >= budget:
                break
            r = pad_rows[i]
            if ex_stamp[r] == ex_g or stamp[r] == taken:
                continue
            stamp[r] = taken
            out[n] = r
            pad_at[n] = i
            n += 1
    # Attribution: every lane that proposed a chosen row, its score, and the
    # first seed and genre in config order.
    for i in range(n):
        pos[out[i]] = i
    mask = np.zeros(n, np.uint64)
    best = np.full(n, np.nan)
    per_source = np.full((n_names, n), np.nan)
    seed_of = np.full(n, -1, np.int64)
    genre_of = np.full(n, -1, np.int64)
    for t in range(n_kept):
        i = kept[t]
        r = rows[i]
        if stamp[r] != taken:
            continue
        at = pos[r]
        if at >= from_lanes:
            continue
        ln = kept_lane[t]
        b = bits[ln]
        mask[at] |= np.uint64(1) << np.uint64(b)
        s = scores[i]
        if s == s:  # not NaN
            per_source[b, at] = s
            if not best[at] >= s:  # NaN (no score yet) or lower
                best[at] = s
        if seed_of[at] < 0 and seeds[i] >= 0:
            seed_of[at] = seeds[i] + seed_off[ln]
        if genre_of[at] < 0 and genres[i] >= 0:
            genre_of[at] = genres[i] + genre_off[ln]
    for at in range(from_lanes, n):
        s = pad_scores[pad_at[at]]
        mask[at] |= np.uint64(1) << np.uint64(pad_bit)
        per_source[pad_bit, at] = s
        best[at] = s
    return out[:n].copy(), best, mask, per_source, seed_of, genre_of, n_kept


def compile_kernels() -> None:
    """Compiles the merge's kernels (or loads them from numba's cache) with a tiny merge.

    The first call of a compiled function builds it: seconds, not
    microseconds. A version load calls this, so no request pays for it.
    Argument types match the engine's calls exactly (int64 rows, float64
    scores), so the request path finds the same compiled specialisation.
    """
    from retrieval_service.sources.base import round_robin

    marks = RowMarks(4)
    rows = np.asarray([2, 0], np.int64)
    block = CandidateBlock(
        (),
        rows,
        np.asarray([0.5, 0.25]),
        seeds=np.asarray([0, -1], np.int64),
        seed_ids=("s",),
        genres=np.asarray([-1, 0], np.int64),
        genre_names=("g",),
    )
    for weight in (1.0, 2.0):  # equal and mixed weights take different branches
        lanes = [Lane("a", 1.0, 2), Lane("b", weight, 1, "popular")]
        assemble(
            [block, block[:1]],
            lanes,
            ["a", "b"],
            3,
            marks,
            np.asarray([1], np.int64),
            ("b", np.asarray([3, 1], np.int64), np.asarray([1.0, 0.5])),
        )
    round_robin(np.asarray([[1, -1], [2, 3]], np.int64), 3, marks, exclude=[3])
