import numpy as np

from ranking_service.users import UserQuery, feature_rows, resolve_inputs
from recsys.features import (
    FeatureSpec,
    UserAggregates,
    UserProfile,
    aggregates_from_genre_ratings,
    default_user_vector,
    user_feature_vector,
)
from recsys.user_store import StoredUser

SPEC = FeatureSpec(genres=("Action", "Comedy", "Drama"), countries=("eu", "us"), genders=("F", "M"))
DEFAULT = default_user_vector(SPEC)


def resolve_features(spec, stored, query, default):
    """One request's feature vector and its source, the way a batch of one builds it."""
    inputs = resolve_inputs(spec, stored, query)
    source = inputs[2] if inputs is not None else "default"
    return feature_rows(spec, [inputs], default)[0], source


def stored(country="eu", watch=3) -> StoredUser:
    agg = UserAggregates.empty(SPEC)
    for _ in range(watch):
        agg.add(np.array([1, 0, 1], bool), 5.0)
    return StoredUser("u1", True, UserProfile(age=30, gender="F", country=country), agg)


def test_nothing_known_gives_the_default_vector():
    vec, source = resolve_features(SPEC, None, UserQuery(user_id="new"), DEFAULT)
    assert source == "default"
    np.testing.assert_array_equal(vec, DEFAULT)
    unknown = StoredUser("new", known=False)
    vec, source = resolve_features(SPEC, unknown, UserQuery(user_id="new"), DEFAULT)
    assert source == "default"


def test_cold_start_uses_inline_fields():
    q = UserQuery(user_id="new", age=40, country="us", genre_ratings={"Comedy": 5.0, "Nope": 1.0})
    vec, source = resolve_features(SPEC, None, q, DEFAULT)
    expected = user_feature_vector(
        SPEC,
        UserProfile(age=40, country="us"),
        aggregates_from_genre_ratings(SPEC, {"Comedy": 5.0}),
    )
    assert source == "inline"
    np.testing.assert_array_equal(vec, expected)
    assert not np.array_equal(vec, DEFAULT)


def test_known_user_uses_stored_state():
    s = stored()
    vec, source = resolve_features(SPEC, s, UserQuery(user_id="u1"), DEFAULT)
    assert source == "stored"
    np.testing.assert_array_equal(vec, user_feature_vector(SPEC, s.profile, s.aggregates))


def test_inline_profile_overrides_stored_but_history_wins_over_genre_ratings():
    s = stored(country="eu")
    q = UserQuery(user_id="u1", country="us", genre_ratings={"Comedy": 1.0})
    vec, source = resolve_features(SPEC, s, q, DEFAULT)
    profile = UserProfile(age=30, gender="F", country="us")
    assert source == "stored"
    np.testing.assert_array_equal(vec, user_feature_vector(SPEC, profile, s.aggregates))


def test_known_user_without_history_takes_inline_genre_ratings():
    s = stored(watch=0)
    q = UserQuery(user_id="u1", genre_ratings={"Drama": 4.0})
    vec, source = resolve_features(SPEC, s, q, DEFAULT)
    expected = user_feature_vector(
        SPEC, s.profile, aggregates_from_genre_ratings(SPEC, {"Drama": 4.0})
    )
    assert source == "inline"
    np.testing.assert_array_equal(vec, expected)


def test_feature_rows_equal_one_vector_per_user():
    cases = [
        (None, UserQuery(user_id="new")),
        (stored(), UserQuery(user_id="u1")),
        (stored("us", 0), UserQuery(user_id="u1", genre_ratings={"Comedy": 4.5}, age=22)),
        (None, UserQuery(country="us", gender="M")),
        (stored(watch=7), UserQuery(user_id="u1", country="us")),
    ]
    rows = feature_rows(SPEC, [resolve_inputs(SPEC, st, q) for st, q in cases], DEFAULT)
    assert rows.shape == (len(cases), DEFAULT.shape[0]) and rows.dtype == np.float32
    for row, (st, q) in zip(rows, cases, strict=True):
        inputs = resolve_inputs(SPEC, st, q)
        vec = DEFAULT if inputs is None else user_feature_vector(SPEC, inputs[0], inputs[1])
        np.testing.assert_allclose(row, vec, rtol=1e-6, atol=1e-6)
