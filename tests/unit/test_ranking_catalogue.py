import numpy as np
import pytest
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
