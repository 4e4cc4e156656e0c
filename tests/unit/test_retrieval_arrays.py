"""The array form of merge/filter/interleave must give exactly the answer of the readable rules.

``retrieval_service.merge.select``/``merge``/``filter_lists`` state the rules
over strings and dicts; the engine runs ``assemble``, one compiled pass over
numpy arrays. Hypothesis draws overlapping lists, weights,
quotas, tiers, budgets, exclusions, missing scores, seeds and genres, and
both forms must agree item for item, attribution included.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.rows import RowMarks
from retrieval_service.merge import (
    Lane,
    MergedCandidate,
    assemble,
    filter_lists,
    merge,
    select,
)
from retrieval_service.sources.base import Candidate, CandidateBlock, round_robin

N_ITEMS = 40
IDS = [f"i{n}" for n in range(N_ITEMS)]
INDEX = {item: row for row, item in enumerate(IDS)}
TIERS = ("personalised", "segment", "popular")

rows_list = st.lists(st.integers(0, N_ITEMS - 1), max_size=30, unique=True)
# Equal weights take the transpose fast path; mixed ones the sort.
weights = st.one_of(
    st.just([1.0] * 5), st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=5, max_size=5)
)


@settings(max_examples=300, deadline=None)
@given(
    lists=st.lists(rows_list, min_size=1, max_size=5),
    w=weights,
    quotas=st.lists(st.integers(0, 25), min_size=5, max_size=5),
    tiers=st.lists(st.sampled_from(TIERS), min_size=5, max_size=5),
    budget=st.integers(0, 70),
    pad=rows_list,
)
def test_interleave_equals_select(lists, w, quotas, tiers, budget, pad):
    lanes = [Lane(f"s{n}", w[n], quotas[n], tiers[n]) for n in range(len(lists))]
    want = select(
        {f"s{n}": [IDS[r] for r in lst] for n, lst in enumerate(lists)},
        lanes,
        budget,
        iter([IDS[r] for r in pad]),
    )
    pad_rows = np.asarray(pad, np.int64)
    names = [ln.name for ln in lanes] + ["pad"]
    sel, kept = assemble(
        [CandidateBlock(IDS, np.asarray(lst, np.int64)) for lst in lists],
        lanes,
        names,
        budget,
        RowMarks(N_ITEMS),
        np.zeros(0, np.int64),
        ("pad", pad_rows, pad_rows * 10.0),
    )
    got = sel.rows
    assert [IDS[r] for r in got.tolist()] == want
    assert kept == sum(len(lst) for lst in lists)
    # Rows the lanes did not place came from the pad, with its scores and only its bit.
    from_pad = sel.source_mask == np.uint64(1 << len(lanes))
    assert set(got[from_pad].tolist()) <= set(pad)
    assert sel.scores[from_pad].tolist() == (got[from_pad] * 10.0).tolist()
    assert np.isnan(sel.scores[~from_pad]).all(), "lanes without scores give none"


def _reference(results, lanes, budget, excluded, pad_source, popular):
    """What the engine did before the array form: filter, select, merge, pad."""
    lists = filter_lists(results, excluded=excluded, catalogue=INDEX)
    pad = (i for i, _ in popular if i not in excluded) if pad_source else ()
    order = select(lists, lanes, budget, pad)
    merged = merge(results, only=set(order))
    scores = dict(popular)
    out = []
    for item in order:
        m = merged.get(item)
        if m is None:
            m = MergedCandidate(item, [pad_source], {pad_source: scores[item]}, scores[item])
        out.append(m)
    return out


candidate = st.builds(
    Candidate,
    st.sampled_from([*IDS, "unknown-a", "unknown-b"]),
    st.one_of(st.none(), st.floats(-5, 5)),
    st.one_of(st.none(), st.sampled_from(["s1", "s2", "s3"])),
    st.one_of(st.none(), st.sampled_from(["Drama", "Comedy"])),
)


@settings(max_examples=300, deadline=None)
@given(
    answers=st.lists(st.lists(candidate, max_size=25), min_size=1, max_size=4),
    failed=st.lists(st.booleans(), min_size=4, max_size=4),
    w=weights,
    quotas=st.lists(st.integers(1, 25), min_size=5, max_size=5),
    tiers=st.lists(st.sampled_from(TIERS), min_size=5, max_size=5),
    budget=st.integers(1, 60),
    excluded=st.sets(st.sampled_from(IDS), max_size=15),
    with_pad=st.booleans(),
)
def test_assemble_equals_the_readable_rules(
    answers, failed, w, quotas, tiers, budget, excluded, with_pad
):
    names = [f"s{n}" for n in range(len(answers))]
    # Some sources failed: they keep their bit position but add no lane.
    ok = {n: a for n, a, f in zip(names, answers, failed, strict=False) if not f or n == "s0"}
    lanes = [Lane(n, w[i], quotas[i], tiers[i]) for i, n in enumerate(names) if n in ok]
    popular = [(IDS[r], float(N_ITEMS - r)) for r in (3, 1, 4, 15, 9, 26, 5, 35)]
    pad_source = names[-1] if with_pad else None
    want = _reference(ok, lanes, budget, excluded, pad_source, popular)

    blocks = [CandidateBlock.from_candidates(ok[ln.name], IDS, INDEX) for ln in lanes]
    marks = RowMarks(N_ITEMS)
    ex_rows = np.asarray(sorted(INDEX[i] for i in excluded), np.int64)
    pad = None
    if pad_source:
        pad = (
            pad_source,
            np.asarray([INDEX[i] for i, _ in popular], np.int64),
            np.asarray([s for _, s in popular]),
        )
    sel, kept = assemble(blocks, lanes, names, budget, marks, ex_rows, pad)
    assert kept == sum(int((~np.isin(b.rows, ex_rows)).sum()) for b in blocks)
    got = sel.merged(IDS)
    assert [m.item_id for m in got] == [m.item_id for m in want]
    for g_m, w_m in zip(got, want, strict=True):
        assert g_m.sources == w_m.sources, g_m.item_id
        assert g_m.source_scores == w_m.source_scores, g_m.item_id
        assert g_m.score == w_m.score or (g_m.score is None and w_m.score is None)
        assert (g_m.seed_item_id, g_m.genre) == (w_m.seed_item_id, w_m.genre)


def test_candidate_block_reads_as_a_candidate_sequence():
    block = CandidateBlock(
        IDS,
        np.asarray([5, 2, 7], np.int64),
        np.asarray([0.5, math.nan, 0.25]),
        seeds=np.asarray([1, -1, 0], np.int64),
        seed_ids=["i9", "i8"],
        genres=np.asarray([-1, 0, -1], np.int64),
        genre_names=["Drama"],
    )
    assert len(block) == 3
    assert list(block) == [
        Candidate("i5", 0.5, "i8", None),
        Candidate("i2", None, None, "Drama"),
        Candidate("i7", 0.25, "i9", None),
    ]
    assert block[-1] == Candidate("i7", 0.25, "i9", None)
    tail = block[1:]
    assert isinstance(tail, CandidateBlock) and [c.item_id for c in tail] == ["i2", "i7"]
    with pytest.raises(IndexError):
        block[3]


def test_from_candidates_drops_unknown_and_repeats_and_checks_types():
    block = CandidateBlock.from_candidates(
        [Candidate("i1", 1.0, "i9"), Candidate("zz", 2.0), Candidate("i1", 3.0), Candidate("i2")],
        IDS,
        INDEX,
    )
    assert block.rows.tolist() == [1, 2]
    assert block.scores is not None and block.scores[0] == 1.0 and math.isnan(block.scores[1])
    assert list(block) == [Candidate("i1", 1.0, "i9"), Candidate("i2")]
    with pytest.raises(TypeError, match="not Candidate"):
        CandidateBlock.from_candidates([("i1", 1.0)], IDS, INDEX)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not a number"):
        CandidateBlock.from_candidates([Candidate("i1", "high")], IDS, INDEX)  # type: ignore[arg-type]


def test_row_marks_sets_and_first_occurrences():
    marks = RowMarks(10)
    a = marks.mark(0, np.asarray([1, 3]))
    b = marks.mark(1, np.asarray([3, 4]))
    assert marks.has(0, a, np.arange(6)).tolist() == [False, True, False, True, False, False]
    assert marks.has(1, b, np.arange(6)).tolist() == [False, False, False, True, True, False]
    again = marks.mark(0, np.asarray([2]))  # a new set in slot 0 replaces the old one
    assert marks.has(0, again, np.asarray([1, 2, 3])).tolist() == [False, True, False]
    assert marks.first(np.asarray([4, 2, 4, 9, 2, 4])).tolist() == [1, 1, 0, 1, 0, 0]
    # The raw form compiled loops use: the same sets, a fresh generation each time.
    stamp, g2 = marks.scratch(1)
    assert g2 > b and not marks.has(1, g2, np.asarray([3, 4])).any(), "starts empty"
    stamp[[6, 8]] = g2
    assert marks.has(1, g2, np.asarray([6, 7, 8])).tolist() == [True, False, True]
    assert marks.position_scratch().shape == (10,)


def test_round_robin_takes_rank_by_rank_once_each():
    grid = np.asarray([[1, 2, 3], [2, 4, -1], [5, 1, -1]], np.int64)
    take = round_robin(grid, 10, RowMarks(10))
    assert grid.ravel()[take].tolist() == [1, 2, 3, 4, 5]
    assert (take % 3).tolist() == [0, 1, 2, 1, 0]
    take = round_robin(grid, 2, RowMarks(10), exclude=[2])
    assert grid.ravel()[take].tolist() == [1, 3]


def test_row_marks_wrapping_one_slot_keeps_the_other_slots_set():
    """A counter running out in slot 1 must not wipe the live set in slot 0 (the exclusions)."""
    marks = RowMarks(10)
    marks._gen = [2**31 - 3] * RowMarks.SLOTS  # both counters near the int32 limit
    excluded = marks.mark(0, np.asarray([2, 5]))
    for _ in range(3):  # slot 1 wraps during these
        stamp, g = marks.scratch(1)
        stamp[[7]] = g
        assert marks.has(1, g, np.asarray([5, 7])).tolist() == [False, True]
        assert marks.has(0, excluded, np.asarray([2, 5, 7])).tolist() == [True, True, False]
    assert marks.scratch(1)[1] < 2**31 - 3, "slot 1 started over"
