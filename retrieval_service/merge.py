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

from retrieval_service.sources.base import TIERS, Candidate, Tier


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
