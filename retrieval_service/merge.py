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

from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

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


def interleave(
    rows: Sequence[np.ndarray],
    lanes: Sequence[Lane],
    budget: int,
    marks: RowMarks,
    pad: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`select` over arrays: up to ``budget`` distinct rows from filtered lane lists.

    Args:
        rows: Per lane (same order as ``lanes``), its filtered rows, distinct, best first.
        lanes: Weight, quota and tier of each lane.
        budget: Most rows to return.
        marks: Scratch over the catalogue (uses slot 1).
        pad: Returns already filtered ``(rows, scores)`` (e.g. the popular list)
            that fill what is left; called only when the lanes cannot fill the budget.

    Returns:
        The chosen rows in answer order, and the pad scores of the rows at the
        end that came from ``pad``.
    """
    no_scores = np.zeros(0, np.float64)
    taken = marks.mark(1, np.zeros(0, np.int64))
    if budget <= 0:
        return np.zeros(0, np.int64), no_scores
    n_lanes = len(lanes)
    sizes = [r.shape[0] for r in rows]
    chunks: list[np.ndarray] = []
    n_out = 0
    if sum(sizes):
        seq, lane = _turn_order(rows, lanes, sizes)
        quota = np.asarray([min(ln.quota, budget) for ln in lanes], np.int64)
        lane_ids = np.arange(n_lanes)
        placed = np.zeros(n_lanes, np.int64)
        full = placed >= quota
        # First pass, quotas on. Between two moments when a lane fills up the
        # rule is "first occurrence of a row not taken yet, from a lane not
        # full", which is vectorised; a round ends where a lane fills (later
        # entries must be looked at again without it), so there are at most
        # n_lanes + 1 rounds.
        start = 0
        while start < seq.shape[0] and n_out < budget:
            s_seq, s_lane = seq[start:], lane[start:]
            cand = np.flatnonzero(~full[s_lane] & ~marks.has(1, taken, s_seq))
            if not cand.shape[0]:
                break
            acc = cand[marks.first(s_seq[cand])]
            acc_lane = s_lane[acc]
            cut = min(acc.shape[0], budget - n_out)
            # Entry i's count among the accepted entries of its own lane so far
            # (lane-major one-hot, so the running sums run along contiguous rows).
            own = (lane_ids[:, None] == acc_lane).cumsum(axis=1, dtype=np.int32)
            count = own[acc_lane, np.arange(acc.shape[0])]
            fills = np.flatnonzero(count >= (quota - placed)[acc_lane])
            refill = bool(fills.shape[0]) and int(fills[0]) + 1 < cut
            if refill:
                cut = int(fills[0]) + 1
            take = acc[:cut]
            marks.add(1, taken, s_seq[take])
            placed += np.bincount(acc_lane[:cut], minlength=n_lanes)
            full = placed >= quota
            chunks.append(s_seq[take])
            n_out += cut
            if not refill:
                break
            start += int(take[-1]) + 1
        # Refill: leftovers tier by tier, quotas lifted.
        if n_out < budget:
            tiers = [ln.tier for ln in lanes]
            lane_tier = np.asarray([TIERS.index(t) if t in TIERS else -1 for t in tiers])
            # Entries not taken yet, found once; a tier's takes are struck from
            # the later tiers' share below (the same row can sit in several lanes).
            left = np.flatnonzero(~marks.has(1, taken, seq))
            left_tier = lane_tier[lane[left]]
            took = False
            for t, tier in enumerate(TIERS):
                if n_out >= budget:
                    break
                if tier not in tiers:
                    continue
                cand = left[left_tier == t]
                if took and cand.shape[0]:
                    cand = cand[~marks.has(1, taken, seq[cand])]
                if not cand.shape[0]:
                    continue
                take = cand[marks.first(seq[cand])][: budget - n_out]
                marks.add(1, taken, seq[take])
                chunks.append(seq[take])
                n_out += take.shape[0]
                took = True
    pad_scores = no_scores
    if pad is not None and n_out < budget:
        fill, fill_scores = pad()
        free = ~marks.has(1, taken, fill)
        chunks.append(fill[free][: budget - n_out])
        pad_scores = fill_scores[free][: budget - n_out]
    if not chunks:
        return np.zeros(0, np.int64), no_scores
    return (np.concatenate(chunks) if len(chunks) > 1 else chunks[0]), pad_scores


def _turn_order(
    rows: Sequence[np.ndarray], lanes: Sequence[Lane], sizes: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Every lane entry in interleave order, and its lane.

    Weighted fair queueing, as in :func:`_fair_pass`: entry j of a lane of
    weight w has virtual time (j + 1) / w; ties go to the lane first in
    config order.
    """
    n_lanes = len(lanes)
    if len({ln.weight for ln in lanes}) == 1:
        # Equal weights: rank 0 of every lane, then rank 1, ... (a transpose).
        grid = np.full((max(sizes), n_lanes), -1, np.int64)
        for li, r in enumerate(rows):
            grid[: r.shape[0], li] = r
        flat = grid.ravel()
        at = np.flatnonzero(flat >= 0)
        return flat[at], at % n_lanes
    lane = np.repeat(np.arange(n_lanes), sizes)
    rank = np.arange(lane.shape[0]) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    weight = np.asarray([ln.weight for ln in lanes], np.float64)
    # Stable: equal virtual times keep the concatenation's lane order.
    order = np.argsort((rank + 1) / weight[lane], kind="stable")
    return np.concatenate(rows)[order], lane[order]


def filter_blocks(
    blocks: Sequence[CandidateBlock], excluded: np.ndarray, marks: RowMarks
) -> tuple[list[np.ndarray], int]:
    """:func:`filter_lists` over blocks: per block, the positions that are not excluded.

    Args:
        blocks: Each source's answer (rows distinct and inside the catalogue).
        excluded: Catalogue rows to drop (watched, excluded, recent).
        marks: Scratch over the catalogue; slot 0 keeps ``excluded`` for :func:`assemble`.

    Returns:
        The kept positions per block, and the generation of ``excluded`` in slot 0.
    """
    g = marks.mark(0, excluded)
    kept = []
    for block in blocks:
        drop = marks.has(0, g, block.rows)
        kept.append(np.flatnonzero(~drop) if drop.any() else np.arange(block.rows.shape[0]))
    return kept, g


def assemble(
    blocks: Sequence[CandidateBlock],
    kept: Sequence[np.ndarray],
    lanes: Sequence[Lane],
    names: Sequence[str],
    budget: int,
    marks: RowMarks,
    *,
    excluded: int,
    pad: tuple[str, np.ndarray, np.ndarray] | None = None,
) -> Selection:
    """Interleave, refill and attribute: the merge of ``Retrieve`` on arrays.

    Args:
        blocks: The answer of each lane's source (same order as ``lanes``).
        kept: Per block, the positions that passed :func:`filter_blocks`.
        lanes: Weight, quota and tier of each source that answered.
        names: Every source of the request, in config order (the bits of the mask).
        budget: Most candidates to return.
        marks: The scratch :func:`filter_blocks` used.
        excluded: Generation of the excluded rows in slot 0 (from :func:`filter_blocks`).
        pad: ``(source name, rows, scores)`` of the last-resort fill (the in-memory
            popular list, rows distinct), or None.
    """
    lane_rows = [b.rows[k] for b, k in zip(blocks, kept, strict=True)]

    def fill() -> tuple[np.ndarray, np.ndarray]:
        assert pad is not None
        free = ~marks.has(0, excluded, pad[1])
        return pad[1][free], pad[2][free]

    order, pad_scores = interleave(
        lane_rows, lanes, budget, marks, fill if pad is not None else None
    )
    m = order.shape[0]
    bit = {name: i for i, name in enumerate(names)}
    mask = np.zeros(m, np.uint64)
    best = np.full(m, np.nan)
    per_source = np.full((len(names), m), np.nan)
    seeds = np.full(m, -1, np.int64)
    genres = np.full(m, -1, np.int64)
    seed_ids: list[str] = []
    genre_names: list[str] = []
    chosen = marks.positions(order)
    for lane, block, keep, rows in zip(lanes, blocks, kept, lane_rows, strict=True):
        hit = marks.has(2, chosen, rows)
        if not hit.any():
            continue
        at = marks.position(rows[hit])
        pos = keep[hit]
        b = bit[lane.name]
        mask[at] |= np.uint64(1 << b)
        if block.scores is not None:
            sc = block.scores[pos]
            per_source[b, at] = sc
            best[at] = np.fmax(best[at], sc)
        # The first source (config order) with a seed item or a genre gives it.
        if block.seeds is not None:
            si = block.seeds[pos]
            free = (seeds[at] < 0) & (si >= 0)
            seeds[at[free]] = si[free] + len(seed_ids)
            seed_ids.extend(block.seed_ids)
        if block.genres is not None:
            gi = block.genres[pos]
            free = (genres[at] < 0) & (gi >= 0)
            genres[at[free]] = gi[free] + len(genre_names)
            genre_names.extend(block.genre_names)
    n_pad = pad_scores.shape[0]
    if n_pad:
        assert pad is not None
        b = bit[pad[0]]
        mask[m - n_pad :] |= np.uint64(1 << b)
        per_source[b, m - n_pad :] = pad_scores
        best[m - n_pad :] = pad_scores
    return Selection(
        order, best, list(names), mask, per_source, seed_ids, seeds, genre_names, genres
    )
