"""recsys.packed: the packed candidate list survives the wire and decodes like Candidate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    cands, ids, rows = candidates_of(wire)
    assert ids == ["a", "b", "c"] and rows is None and len(cands) == 3
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
    cands, _, _ = candidates_of(_packed())
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
    cands, _, _ = candidates_of(lean)
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
    cands, ids, rows = candidates_of(legacy)
    assert ids == ["x"] and rows is None and cands[0].sources == ["popular"]


@pytest.mark.parametrize(
    "damage, field",
    [
        (lambda p: p.scores.append(1.0), "scores"),
        (lambda p: p.source_mask.pop(), "source_mask"),
        (lambda p: p.seed_index.pop(), "seed_index"),
        (lambda p: p.source_scores.add(), "source_scores"),
        # A per-source row short of one score per candidate (read later: IndexError).
        (lambda p: p.source_scores[0].scores.pop(), "source_scores has a row"),
    ],
)
def test_malformed_packed_answers_are_refused(damage, field):
    wire = _packed()
    damage(wire.packed)
    with pytest.raises(ValueError, match=field):
        PackedCandidateList(wire.packed)


def test_a_seed_or_genre_index_outside_its_table_reads_as_none():
    wire = _packed()
    wire.packed.seed_index[0] = 5
    wire.packed.genre_index[0] = -7
    cand = PackedCandidateList(wire.packed)[0]
    assert cand.seed_item_id == "" and cand.genre == ""
    assert cand.item_id == "a" and cand.sources == ["similar", "genre"]


class _Catalogue:
    def __init__(self, ids: list[str], fingerprint: str = "cat-1"):
        self.item_ids = ids
        self.catalogue_id = fingerprint


CATALOGUE = _Catalogue(["z", "c", "a", "b"])


def _by_rows(rows: list[int], catalogue: str = "cat-1") -> retrieval_pb2.RetrieveResponse:
    response = retrieval_pb2.RetrieveResponse()
    n = len(rows)
    pack(
        response.packed,
        rows=np.asarray(rows),
        catalogue=catalogue,
        scores=np.arange(n, dtype=np.float64),
        source_names=NAMES,
        source_mask=np.full(n, 0b0001, np.uint64),
        seeds=np.full(n, -1),
        seed_ids=[],
        genres=np.full(n, -1),
        genre_names=[],
    )
    return retrieval_pb2.RetrieveResponse.FromString(response.SerializeToString())


def test_rows_name_the_same_candidates_as_ids():
    wire = _by_rows([2, 3, 1])
    assert not wire.packed.item_ids and len(wire.packed.rows) == 12
    cands, ids, rows = candidates_of(wire, CATALOGUE)
    assert ids is None and rows.tolist() == [2, 3, 1]
    assert [c.item_id for c in cands] == ["a", "b", "c"]
    assert cands.item_ids == ["a", "b", "c"] and len(cands) == 3
    assert cands[1].score == 1.0 and cands[1].sources == ["similar"]
    assert cands[-1].to_pb().item_id == "c"
    empty, _, none = candidates_of(_by_rows([]), CATALOGUE)
    assert len(empty) == 0 and none is not None and none.size == 0


@pytest.mark.parametrize(
    "wire, catalogue, message",
    [
        (_by_rows([0, 1]), None, "catalogue"),
        (_by_rows([0, 1]), _Catalogue(["z", "c", "a", "b"], "cat-2"), "catalogue"),
        (_by_rows([0, 4]), CATALOGUE, "outside"),
        (_by_rows([-1, 0]), CATALOGUE, "outside"),
    ],
)
def test_rows_a_client_cannot_read_are_refused(wire, catalogue, message):
    with pytest.raises(ValueError, match=message):
        candidates_of(wire, catalogue)


def test_rows_must_be_whole_int32s():
    wire = _by_rows([0, 1])
    wire.packed.rows = wire.packed.rows[:-1]
    with pytest.raises(ValueError, match="int32"):
        PackedCandidateList(wire.packed, CATALOGUE)
    with pytest.raises(ValueError, match="catalogue"):
        pack(
            retrieval_pb2.PackedCandidates(),
            rows=np.zeros(1),
            scores=np.zeros(1),
            source_names=NAMES,
            source_mask=np.zeros(1, np.uint64),
            seeds=np.full(1, -1),
            seed_ids=[],
            genres=np.full(1, -1),
            genre_names=[],
        )


def test_nan_scores_travel_as_nan_per_source():
    wire = _packed()
    row = wire.packed.source_scores[2].scores
    assert all(math.isnan(s) for s in row), "country scored nothing here"


def _reference(msg, scores, mask, seeds, seed_ids, genres, genre_names, per_source) -> None:
    """The same fields filled through protobuf's own setters (what pack() encodes by hand)."""
    msg.scores.extend(np.nan_to_num(scores, nan=0.0).tolist())
    msg.source_mask.extend(mask.tolist())
    for index, table, names_field, index_field in (
        (seeds, seed_ids, msg.seeds, msg.seed_index),
        (genres, genre_names, msg.genres, msg.genre_index),
    ):
        order: dict[str, int] = {}
        for i in sorted({int(i) for i in index.tolist() if i >= 0}):
            order.setdefault(table[i], len(order))
        if order:
            names_field.extend(order)
            index_field.extend(order[table[i]] if i >= 0 else -1 for i in index.tolist())
    if per_source is not None:
        for row in per_source.tolist():
            msg.source_scores.add().scores.extend(row)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), m=st.integers(0, 40), with_scores=st.booleans())
def test_hand_encoded_fields_match_protobufs_own_encoding(data, m, with_scores):
    """pack() writes the numbers as wire bytes: protobuf must read what it would have written."""
    floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
    scores = np.asarray(data.draw(st.lists(floats, min_size=m, max_size=m)), np.float64)
    # Masks up to 64 bits and indices into tables past 127 entries exercise multi-byte varints.
    mask = np.asarray(
        data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=m, max_size=m)), np.uint64
    )
    n_seeds = data.draw(st.integers(0, 300))
    seed_ids = [f"s{data.draw(st.integers(0, 400))}" for _ in range(n_seeds)]
    seeds = np.asarray(
        data.draw(st.lists(st.integers(-1, n_seeds - 1), min_size=m, max_size=m)), np.int64
    )
    genre_names = ["Drama", "Comedy", "Drama"]
    genres = np.asarray(data.draw(st.lists(st.integers(-1, 2), min_size=m, max_size=m)), np.int64)
    per_source = None
    if with_scores:
        per_source = np.asarray(
            data.draw(st.lists(floats, min_size=2 * m, max_size=2 * m)), np.float64
        ).reshape(2, m)
    got, want = retrieval_pb2.PackedCandidates(), retrieval_pb2.PackedCandidates()
    pack(
        got,
        item_ids=[f"i{j}" for j in range(m)],
        scores=scores,
        source_names=["a", "b"],
        source_mask=mask,
        seeds=seeds,
        seed_ids=seed_ids,
        genres=genres,
        genre_names=genre_names,
        source_scores=per_source,
    )
    want.item_ids.extend(f"i{j}" for j in range(m))
    want.source_names.extend(["a", "b"])
    _reference(want, scores, mask, seeds, seed_ids, genres, genre_names, per_source)
    # Bytes, not ==: NaN per-source scores compare unequal to themselves as messages.
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)


def test_provenance_reads_the_same_fields_as_the_properties():
    cands, _, _ = candidates_of(_packed())
    for c in (*cands, *cands):  # the second pass reads masks already decoded
        assert c.provenance() == (tuple(c.sources), c.seed_item_id, c.genre)
    assert cands[0].provenance() == (("similar", "genre"), "s1", "Drama")
    # Several at once (the ranking service's winners), in the order asked, repeats allowed.
    order = [len(cands) - 1, 0, 0, *range(len(cands))]
    assert cands.provenance_many(order) == [cands[i].provenance() for i in order]
    assert cands.provenance_many([]) == []


@pytest.mark.parametrize("top", [0x7F, 0x80, 0x81, 0x3FFF, 0x4000, 2**63 + 5])
def test_varints_at_the_byte_boundaries_match_protobuf(top):
    """One byte up to 127, two from 128: the boundaries a random draw rarely hits."""
    from google.protobuf.internal.encoder import _VarintBytes

    from recsys.packed import _varints

    values = np.asarray([0, 1, top - 1, top], np.uint64)
    assert _varints(values) == b"".join(_VarintBytes(int(v)) for v in values)
