"""The user state retrieval passes on to ranking decodes to what ranking would read itself."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ranking_service.users import UserQuery, feature_rows, resolve_inputs
from recsys.features import (
    FeatureSpec,
    UserAggregates,
    UserProfile,
    decode_user_state,
    default_user_vector,
    encode_user_state,
)
from recsys.user_store import StoredUser, state_from_pb, state_to_pb
from recsys.v1 import retrieval_pb2

SPEC = FeatureSpec(
    genres=("Action", "Comedy", "Drama", "Sci-Fi"),
    countries=("eu", "us"),
    genders=("F", "M"),
    occupations=("artist", "doctor"),
)
G = len(SPEC.genres)

texts = st.none() | st.text(max_size=12)
counts = st.lists(st.integers(0, 10**6), min_size=G, max_size=G)
sums = st.lists(st.floats(0, 5e6, allow_nan=False), min_size=G, max_size=G)


def wire(user: StoredUser, spec: FeatureSpec = SPEC) -> retrieval_pb2.StoredUserState:
    """Encode, serialise and parse again, as the message crosses the network."""
    msg = retrieval_pb2.RetrieveResponse()
    state_to_pb(spec, user, msg.user_state)
    return retrieval_pb2.RetrieveResponse.FromString(msg.SerializeToString()).user_state


@settings(max_examples=150, deadline=None)
@given(
    age=st.none() | st.floats(0, 120, allow_nan=False),
    gender=texts,
    occupation=texts,
    country=texts,
    n=st.integers(0, 10**6),
    nr=st.integers(0, 10**6),
    total=st.floats(0, 5e6, allow_nan=False),
    gw=counts,
    gr=counts,
    gs=sums,
)
def test_round_trip_equals_the_redis_hash_read(
    age, gender, occupation, country, n, nr, total, gw, gr, gs
):
    profile = UserProfile(age=age, gender=gender, occupation=occupation, country=country)
    gs = [x if r else 0.0 for x, r in zip(gs, gr, strict=True)]  # no rating sum without ratings
    agg = UserAggregates(n, nr, total, np.array(gw, np.int64), np.array(gr, np.int64), np.array(gs))
    # What the ranking service's own read of the hash would give.
    read = decode_user_state(
        SPEC, {k.encode(): v.encode() for k, v in encode_user_state(SPEC, profile, agg).items()}
    )
    assert read is not None
    got = state_from_pb(SPEC, "u1", wire(StoredUser("u1", True, profile, agg, ["x"], {"y"})))
    assert got is not None and got.known and got.user_id == "u1"
    assert got.recent == [] and got.watched == set()  # history is not passed on
    want_profile, want_agg = read
    assert got.profile == want_profile
    assert (got.aggregates.watch_count, got.aggregates.rated_count) == (
        want_agg.watch_count,
        want_agg.rated_count,
    )
    assert got.aggregates.rating_sum == want_agg.rating_sum
    for name in ("genre_watch", "genre_rated", "genre_sum"):
        a, b = getattr(got.aggregates, name), getattr(want_agg, name)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # And so the user tower's input row is the same.
    default = default_user_vector(SPEC)
    query = UserQuery(user_id="u1")
    via_pb = feature_rows(SPEC, [resolve_inputs(SPEC, got, query)], default)[0]
    via_hash = StoredUser("u1", True, want_profile, want_agg)
    direct = feature_rows(SPEC, [resolve_inputs(SPEC, via_hash, query)], default)[0]
    np.testing.assert_array_equal(via_pb, direct)


def test_a_user_without_a_state_hash_is_unknown():
    for user in (StoredUser("u1", known=False), StoredUser("u1", known=True, recent=["a"])):
        msg = wire(user)
        assert not msg.known and not msg.genres and not msg.aggregates
        got = state_from_pb(SPEC, "u1", msg)
        assert got is not None and not got.known and got.aggregates is None


def _known() -> StoredUser:
    agg = UserAggregates.empty(SPEC)
    agg.add(np.array([1, 0, 1, 0], bool), 4.0)
    return StoredUser("u1", True, UserProfile(age=31.0, country="us"), agg)


def test_a_state_under_another_genre_list_is_refused():
    other = FeatureSpec(genres=("Action", "Drama", "Comedy", "Sci-Fi"), countries=("eu", "us"))
    msg = wire(_known(), other)
    assert state_from_pb(other, "u1", msg) is not None
    assert state_from_pb(SPEC, "u1", msg) is None  # same genres, another order
    fewer = FeatureSpec(genres=("Action", "Comedy", "Drama"), countries=("eu", "us"))
    assert state_from_pb(fewer, "u1", msg) is None


def test_malformed_aggregates_are_refused():
    msg = wire(_known())
    short = retrieval_pb2.StoredUserState()
    short.CopyFrom(msg)
    short.aggregates = msg.aggregates[:-8]
    assert state_from_pb(SPEC, "u1", short) is None
    bad = retrieval_pb2.StoredUserState()
    bad.CopyFrom(msg)
    nums = np.frombuffer(msg.aggregates, "<f8").copy()
    nums[1] = math.nan
    bad.aggregates = nums.tobytes()
    assert state_from_pb(SPEC, "u1", bad) is None
    assert state_from_pb(SPEC, "u1", msg) is not None
