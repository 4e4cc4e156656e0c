"""Merge, filter, interleave and refill: pure functions, checked by example and by property."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from retrieval_service.merge import Lane, filter_lists, merge, select
from retrieval_service.served import cosine_from_angular
from retrieval_service.sources.base import Candidate


def test_merge_keeps_every_source_and_best_score():
    merged = merge(
        {
            "sim": [Candidate("a", 0.9, seed_item_id="s1"), Candidate("b", 0.5, seed_item_id="s2")],
            "genre": [Candidate("b", 4.2, genre="Drama"), Candidate("c", 4.0, genre="Drama")],
            "pop": [Candidate("a"), Candidate("b", 100.0)],
        }
    )
    assert list(merged) == ["a", "b", "c"]
    a, b, c = merged["a"], merged["b"], merged["c"]
    assert a.sources == ["sim", "pop"] and a.source_scores == {"sim": 0.9} and a.score == 0.9
    assert b.sources == ["sim", "genre", "pop"]
    assert b.source_scores == {"sim": 0.5, "genre": 4.2, "pop": 100.0} and b.score == 100.0
    assert b.seed_item_id == "s2" and b.genre == "Drama"
    assert c.sources == ["genre"] and c.seed_item_id is None


def test_merge_first_proposal_per_source_wins():
    merged = merge({"sim": [Candidate("a", 0.9, "s1"), Candidate("a", 0.95, "s2")]})
    assert merged["a"].sources == ["sim"]
    assert merged["a"].source_scores == {"sim": 0.9} and merged["a"].seed_item_id == "s1"


def test_filter_drops_excluded_unknown_and_repeats_keeping_order():
    lists = filter_lists(
        {"x": [Candidate(i) for i in ["a", "w", "b", "zz", "a", "c"]], "y": [Candidate("w")]},
        excluded={"w"},
        catalogue={"a", "b", "c", "w"},
    )
    assert lists == {"x": ["a", "b", "c"], "y": []}


def test_fair_interleave_alternates_equal_weights():
    lists = {"big": [f"b{i}" for i in range(100)], "small": ["s0", "s1", "s2"]}
    out = select(lists, [Lane("big"), Lane("small")], 6)
    assert out == ["b0", "s0", "b1", "s1", "b2", "s2"]


def test_weights_set_the_share_of_turns():
    lists = {"a": [f"a{i}" for i in range(100)], "b": [f"b{i}" for i in range(100)]}
    out = select(lists, [Lane("a", weight=3.0), Lane("b", weight=1.0)], 40)
    share = Counter(i[0] for i in out)
    assert share == {"a": 30, "b": 10}


def test_quota_caps_a_source_then_refill_follows_the_tier_chain():
    lists = {
        "sim": [f"s{i}" for i in range(10)],
        "genre": [f"g{i}" for i in range(10)],
        "pop": [f"p{i}" for i in range(10)],
    }
    lanes = [
        Lane("sim", quota=2, tier="personalised"),
        Lane("genre", quota=2, tier="segment"),
        Lane("pop", quota=2, tier="popular"),
    ]
    out = select(lists, lanes, 10)
    assert out[:6] == ["s0", "g0", "p0", "s1", "g1", "p1"]
    # Refill takes the personalised leftovers before anything else.
    assert out[6:] == ["s2", "s3", "s4", "s5"]
    out = select({**lists, "sim": ["s0"]}, lanes, 8)
    assert out[5:] == ["g2", "g3", "g4"]


def test_pad_fills_last_and_skips_taken():
    out = select({"a": ["x", "y"]}, [Lane("a")], 5, pad=iter(["y", "p1", "p2", "p3", "p4"]))
    assert out == ["x", "y", "p1", "p2", "p3"]


def test_budget_zero_is_empty():
    assert select({"a": ["x"]}, [Lane("a")], 0, pad=["y"]) == []


def test_cosine_from_angular_distance():
    assert cosine_from_angular(0.0) == 1.0
    assert abs(cosine_from_angular(2.0**0.5)) < 1e-12
    assert cosine_from_angular(2.0) == -1.0


ids = st.lists(st.sampled_from([f"i{n}" for n in range(40)]), max_size=30)


@given(
    lists=st.lists(ids, min_size=1, max_size=4),
    weights=st.lists(st.floats(0.1, 5.0), min_size=4, max_size=4),
    quotas=st.lists(st.integers(0, 30), min_size=4, max_size=4),
    budget=st.integers(0, 60),
    pad=ids,
)
def test_select_properties(lists, weights, quotas, budget, pad):
    named = {f"s{n}": lst for n, lst in enumerate(lists)}
    tiers = ["personalised", "segment", "popular", "segment"]
    lanes = [Lane(f"s{n}", weights[n], quotas[n], tiers[n]) for n in range(len(lists))]
    out = select(named, lanes, budget, pad)
    supply = {i for lst in lists for i in lst} | set(pad)
    assert len(out) == len(set(out)), "no duplicates"
    assert len(out) <= budget
    assert set(out) <= supply
    # Refill and pad mean the answer is only short when the supply ran out.
    assert len(out) == min(budget, len(supply))


@given(
    sizes=st.lists(st.integers(0, 20), min_size=1, max_size=4),
    quotas=st.lists(st.integers(0, 20), min_size=4, max_size=4),
    weights=st.lists(st.floats(0.1, 5.0), min_size=4, max_size=4),
)
def test_quotas_are_honoured_when_lists_are_disjoint(sizes, quotas, weights):
    named = {f"s{n}": [f"s{n}-{j}" for j in range(size)] for n, size in enumerate(sizes)}
    lanes = [Lane(f"s{n}", weights[n], quotas[n]) for n in range(len(sizes))]
    budget = sum(min(q, size) for q, size in zip(quotas, sizes, strict=False))
    out = select(named, lanes, budget)
    for n, size in enumerate(sizes):
        placed = sum(1 for i in out if i.startswith(f"s{n}-"))
        assert placed == min(quotas[n], size)
