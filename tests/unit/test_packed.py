"""recsys.packed: the packed candidate list survives the wire and decodes like Candidate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys.explain import explain, source_kinds
from recsys.packed import PackedCandidateList, candidates_of, pack
from recsys.v1 import common_pb2, retrieval_pb2

NAMES = ["similar", "genre", "country", "popular"]


def _packed(scores: bool = True) -> retrieval_pb2.RetrieveResponse:
    per_source = np.full((4, 3), np.nan)
    per_source[0, 0], per_source[1, 0], per_source[3, 2] = 0.75, 4.25, 120.0
    response = retrieval_pb2.RetrieveResponse(index_version="7")
    pack(
        response.packed,
        item_ids=["a", "b", "c"],
        scores=np.asarray([4.25, np.nan, 120.0]),
        source_names=NAMES,
        source_mask=np.asarray([0b0011, 0b0100, 0b1000], np.uint64),
        # Two table entries name the same seed, one is unused: the wire keeps one.
        seeds=np.asarray([2, -1, -1]),
        seed_ids=["unused", "s1", "s1"],
        genres=np.asarray([0, -1, -1]),
        genre_names=["Drama"],
        source_scores=per_source if scores else None,
    )
    return retrieval_pb2.RetrieveResponse.FromString(response.SerializeToString())


def test_round_trip_decodes_every_field():
    wire = _packed()
    assert list(wire.packed.seeds) == ["s1"] and list(wire.packed.seed_index) == [0, -1, -1]
    cands, ids = candidates_of(wire)
    assert ids == ["a", "b", "c"] and len(cands) == 3
    a, b, c = cands
    assert a.item_id == "a" and a.sources == ["similar", "genre"]
    assert a.score == 4.25 and a.seed_item_id == "s1" and a.genre == "Drama"
    assert a.source_scores == {"similar": 0.75, "genre": 4.25}
    assert b.sources == ["country"] and b.score == 0.0 and b.source_scores == {}
    assert b.seed_item_id == "" and b.genre == ""
    assert c.source_scores == {"popular": 120.0} and cands[-1].item_id == "c"
    assert a.to_pb() == common_pb2.Candidate(
        item_id="a",
        sources=["similar", "genre"],
        score=4.25,
        source_scores={"similar": 0.75, "genre": 4.25},
        seed_item_id="s1",
        genre="Drama",
    )
    assert a == a.to_pb() and a != b
    with pytest.raises(IndexError):
        cands[3]


def test_reasons_read_a_packed_candidate_like_a_message():
    cands, _ = candidates_of(_packed())
    kinds = source_kinds(
        [
            {"name": "similar", "type": "annoy_similar"},
            {"name": "genre", "type": "redis_top_genre"},
        ]
    )
    titles = {"s1": "Seed One"}.get
    for cand in cands:
        assert explain(cand, kinds=kinds, title_of=titles) == explain(
            cand.to_pb(), kinds=kinds, title_of=titles
        )
    assert [r.text for r in explain(cands[0], kinds=kinds, title_of=titles)] == [
        "Because you watched Seed One",
        "Top in Drama",
    ]


def test_scores_left_out_and_empty_answers():
    lean = _packed(scores=False)
    assert not lean.packed.source_scores
    cands, _ = candidates_of(lean)
    assert cands[0].source_scores == {} and cands[0].score == 4.25
    assert lean.ByteSize() < _packed().ByteSize()
    empty = retrieval_pb2.RetrieveResponse()
    pack(
        empty.packed,
        item_ids=[],
        scores=np.zeros(0),
        source_names=NAMES,
        source_mask=np.zeros(0, np.uint64),
        seeds=np.zeros(0, np.int64),
        seed_ids=[],
        genres=np.zeros(0, np.int64),
        genre_names=[],
    )
    wire = retrieval_pb2.RetrieveResponse.FromString(empty.SerializeToString())
    assert wire.HasField("packed"), "an empty packed answer is still recognisably packed"
    assert len(candidates_of(wire)[0]) == 0


def test_an_unpacked_answer_reads_the_same_way():
    legacy = retrieval_pb2.RetrieveResponse(
        candidates=[common_pb2.Candidate(item_id="x", sources=["popular"], score=1.0)]
    )
    cands, ids = candidates_of(legacy)
    assert ids == ["x"] and cands[0].sources == ["popular"]


@pytest.mark.parametrize(
    "damage, field",
    [
        (lambda p: p.scores.append(1.0), "scores"),
        (lambda p: p.source_mask.pop(), "source_mask"),
        (lambda p: p.seed_index.__setitem__(0, 5), "seed_index"),
        (lambda p: p.source_scores.add(), "source_scores"),
    ],
)
def test_malformed_packed_answers_are_refused(damage, field):
    wire = _packed()
    damage(wire.packed)
    with pytest.raises(ValueError, match=field):
        PackedCandidateList(wire.packed)


def test_nan_scores_travel_as_nan_per_source():
    wire = _packed()
    row = wire.packed.source_scores[2].scores
    assert all(math.isnan(s) for s in row), "country scored nothing here"
