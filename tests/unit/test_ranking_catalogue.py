import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from ranking_service.catalogue import IdIndex
from recsys.v1 import ranking_pb2

ids_st = st.lists(st.text(min_size=1, max_size=8), unique=True, max_size=60)


@settings(deadline=None)  # timing-free: the machine is shared
@given(catalogue=ids_st, extra=st.lists(st.text(max_size=8), max_size=20))
def test_lookup_matches_a_dictionary(catalogue, extra):
    index = IdIndex(catalogue)
    reference = {iid: row for row, iid in enumerate(catalogue)}
    query = [*catalogue[::2], *extra]
    rows = index.lookup(query)
    assert rows.dtype == np.int64
    assert rows.tolist() == [reference.get(q, -1) for q in query]


def test_unknown_ids_are_minus_one_and_order_is_kept():
    index = IdIndex(["b", "a", "c10", "c2"])
    assert index.lookup(["c2", "zz", "a", "", "c1", "b"]).tolist() == [3, -1, 1, -1, -1, 0]


def test_empty_catalogue_and_empty_query():
    assert IdIndex([]).lookup(["a", "b"]).tolist() == [-1, -1]
    assert IdIndex(["a"]).lookup([]).shape == (0,)


def test_accepts_numpy_queries_protobuf_fields_and_generators():
    index = IdIndex(["amélie", "東京", "x", "a\x00b"])
    assert index.lookup(np.array(["東京", "amélie", "y"])).tolist() == [1, 0, -1]
    req = ranking_pb2.RankRequest(candidate_item_ids=["x", "a\x00b", "a", "東京"])
    assert index.lookup(req.candidate_item_ids).tolist() == [2, 3, -1, 1]
    assert index.lookup(i for i in ["x", "nope"]).tolist() == [2, -1]


def test_shares_a_given_mapping_and_rejects_duplicates():
    mapping = {"a": 0, "b": 1}
    index = IdIndex(["a", "b"], mapping)
    mapping["c"] = 2  # the index reads the version's own dictionary, not a copy
    assert index.lookup(["c"]).tolist() == [2]
    with pytest.raises(ValueError, match="unique"):
        IdIndex(["a", "a"])


def _rank_bytes(ids: list[str], **kw) -> bytes:
    return ranking_pb2.RankRequest(candidate_item_ids=ids, **kw).SerializeToString()


CANDIDATES = ranking_pb2.RankRequest.DESCRIPTOR.fields_by_name["candidate_item_ids"].number


@settings(deadline=None)
@given(
    catalogue=ids_st,
    extra=st.lists(st.text(max_size=12), max_size=20),
    user=st.text(max_size=10),
    top_k=st.integers(0, 2**31 - 1),
)
def test_lookup_from_wire_bytes_matches_the_parsed_field(catalogue, extra, user, top_k):
    index = IdIndex(catalogue)
    query = [*extra, *catalogue[::3], *catalogue[:2]]  # unknowns, knowns and repeats
    raw = ranking_pb2.RankRequest(
        user={"user_id": user, "exclude_item_ids": catalogue[:1], "features": {"age": 7}},
        candidate_item_ids=query,
        top_k=top_k,
        include_watched=True,
        debug=True,
    ).SerializeToString()
    rows = index.lookup_field(raw, CANDIDATES, len(query))
    assert rows is not None and rows.dtype == np.int64
    assert rows.tolist() == index.lookup(query).tolist()


@settings(deadline=None)
@given(data=st.binary(max_size=64))
def test_lookup_from_arbitrary_bytes_is_safe_and_never_wrong(data):
    index = IdIndex(["a", "b", "\x02", "é"])
    # Whatever the bytes, the scan stays in bounds. For bytes protobuf
    # accepts, it answers what the parsed field says or declines (None sends
    # the caller to lookup()); validating other bytes is protobuf's job.
    try:
        parsed = ranking_pb2.RankRequest.FromString(data)
    except DecodeError:
        parsed = None
    for count in (0, 1, 3):
        rows = index.lookup_field(data, CANDIDATES, count)
        if rows is not None and parsed is not None:
            assert rows.tolist() == index.lookup(parsed.candidate_item_ids).tolist()


def test_wire_lookup_declines_what_it_cannot_read():
    index = IdIndex(["a", "b"])
    good = _rank_bytes(["b", "x", "a"])
    assert index.lookup_field(good, CANDIDATES, 3).tolist() == [1, -1, 0]
    assert index.lookup_field(good, CANDIDATES, 2) is None  # more entries than expected
    assert index.lookup_field(good, CANDIDATES, 4) is None  # fewer
    assert index.lookup_field(good[:-1], CANDIDATES, 3) is None  # truncated
    # A group (wire type 3) among unknown fields: protobuf keeps it, the scan declines.
    group = bytes([(15 << 3) | 3, 0x08, 0x01, (15 << 3) | 4])
    assert index.lookup_field(group + good, CANDIDATES, 3) is None
    assert ranking_pb2.RankRequest.FromString(group + good).candidate_item_ids == ["b", "x", "a"]
    assert index.lookup_field(b"", CANDIDATES, 0).shape == (0,)


def test_wire_lookup_of_a_large_catalogue_and_non_ascii_ids():
    catalogue = [f"item-{i}" for i in range(50_000)] + ["東京", "amélie", "a\x00b", ""]
    index = IdIndex(catalogue)
    rng = np.random.default_rng(3)
    query = [catalogue[i] for i in rng.integers(0, len(catalogue), 2_000)]
    query += ["東京", "amélie", "a\x00b", "", "item-50000", "ITEM-1"]
    rows = index.lookup_field(_rank_bytes(query), CANDIDATES, len(query))
    assert rows.tolist() == index.lookup(query).tolist()
    assert rows[-6:].tolist() == [50_000, 50_001, 50_002, 50_003, -1, -1]


def test_duplicates_in_a_given_mapping_are_rejected_too():
    with pytest.raises(ValueError, match="unique"):
        IdIndex(["a", "b", "a"], {"a": 2, "b": 1})


# Unknown fields of every wire type but groups: (field number, wire type, payload).
unknown_st = st.lists(
    st.one_of(
        st.tuples(st.integers(20, 2**29 - 1), st.just(0), st.integers(0, 2**64 - 1)),
        st.tuples(
            st.integers(20, 2**29 - 1), st.sampled_from([1, 5]), st.binary(min_size=8, max_size=8)
        ),
        st.tuples(st.integers(20, 2**29 - 1), st.just(2), st.binary(max_size=300)),
    ),
    max_size=4,
)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(number: int, wire: int, payload) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(payload)
    if wire == 1:
        return key + payload
    if wire == 5:
        return key + payload[:4]
    return key + _varint(len(payload)) + payload


@settings(deadline=None)
@given(
    ids=st.lists(st.sampled_from(["a", "b", "é", "zz", "東京"]), max_size=8),
    before=unknown_st,
    after=unknown_st,
)
def test_wire_lookup_skips_unknown_fields_of_every_kind_but_groups(ids, before, after):
    index = IdIndex(["a", "é", "東京"])
    raw = b"".join(_field(*f) for f in before) + _rank_bytes(ids, top_k=3)
    raw += b"".join(_field(*f) for f in after)
    parsed = ranking_pb2.RankRequest.FromString(raw)
    assert list(parsed.candidate_item_ids) == ids
    rows = index.lookup_field(raw, CANDIDATES, len(ids))
    assert rows is not None and rows.tolist() == index.lookup(ids).tolist()
