from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.features import (
    FeatureSpec,
    TargetScale,
    UserAggregates,
    UserProfile,
    aggregates_from_genre_ratings,
    decode_user_state,
    default_user_vector,
    encode_user_state,
    genre_mask,
    interaction_increments,
    item_feature_matrix,
    top_genres,
    user_feature_matrix,
    user_feature_vector,
)

SPEC = FeatureSpec(
    genres=("Action", "Comedy", "Drama"),
    countries=("us", "de"),
    genders=("M", "F"),
    occupations=("engineer", "writer"),
    global_mean=3.5,
)


def _agg(events):
    agg = UserAggregates.empty(SPEC)
    for genres, rating in events:
        agg.add(genre_mask(SPEC, genres), rating)
    return agg


def test_feature_names_match_vector_width():
    v = default_user_vector(SPEC)
    assert v.shape == (SPEC.n_user_features,)
    assert v.dtype == np.float32
    names = SPEC.user_feature_names
    assert v[names.index("mean_rating")] == pytest.approx(3.5)
    assert v[names.index("age_missing")] == 1.0


def test_vector_and_matrix_paths_agree():
    profiles = [UserProfile(30, "F", "writer", "de"), UserProfile(None, None, None, "xx")]
    aggs = [_agg([(["Action"], 5.0), (["Comedy", "Drama"], 2.0)]), _agg([(["Drama"], None)])]
    matrix = user_feature_matrix(
        SPEC,
        watch_count=np.array([a.watch_count for a in aggs]),
        rated_count=np.array([a.rated_count for a in aggs]),
        rating_sum=np.array([a.rating_sum for a in aggs]),
        genre_watch=np.stack([a.genre_watch for a in aggs]),
        genre_rated=np.stack([a.genre_rated for a in aggs]),
        genre_sum=np.stack([a.genre_sum for a in aggs]),
        age=np.array([30.0, np.nan]),
        gender=["F", None],
        occupation=["writer", None],
        country=["de", "xx"],
    )
    for row, (p, a) in enumerate(zip(profiles, aggs, strict=True)):
        np.testing.assert_array_equal(matrix[row], user_feature_vector(SPEC, p, a))
    names = SPEC.user_feature_names
    assert matrix[0, names.index("country:de")] == 1.0
    assert matrix[1, names.index("country:de")] == matrix[1, names.index("country:us")] == 0.0


def test_a_missing_country_encodes_as_the_datas_unknown_bucket():
    """The loaders put users without a country in "unknown"; serving gave such a user
    (a cold start, an anonymous request) an all-zero block no training row had."""
    from trainer.dataset import DEFAULT_COUNTRY

    spec = FeatureSpec(
        genres=SPEC.genres,
        countries=("de", DEFAULT_COUNTRY, "us"),
        genders=SPEC.genders,
        occupations=SPEC.occupations,
        global_mean=3.5,
    )
    names = spec.user_feature_names
    block = [names.index(f"country:{c}") for c in spec.countries]
    trained = user_feature_vector(
        spec, UserProfile(country=DEFAULT_COUNTRY), UserAggregates.empty(spec)
    )
    for country in (None, ""):
        got = user_feature_vector(spec, UserProfile(country=country), UserAggregates.empty(spec))
        np.testing.assert_array_equal(got, trained)
    np.testing.assert_array_equal(default_user_vector(spec), trained)
    # A name the data never had stays all zeros; so does a missing one without the bucket.
    assert not user_feature_vector(spec, UserProfile(country="zz"), UserAggregates.empty(spec))[
        block
    ].any()
    plain = SPEC.user_feature_names
    assert not default_user_vector(SPEC)[
        [plain.index(f"country:{c}") for c in SPEC.countries]
    ].any()


def test_genre_means_are_shrunk_toward_user_mean():
    agg = _agg([(["Action"], 5.0)])
    v = user_feature_vector(SPEC, UserProfile(), agg)
    names = SPEC.user_feature_names
    user_mean = v[names.index("mean_rating")]
    action = v[names.index("genre_mean:Action")]
    assert user_mean < action < 5.0
    assert v[names.index("genre_mean:Comedy")] == pytest.approx(user_mean)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sets(st.sampled_from(SPEC.genres)),
            st.one_of(st.none(), st.floats(1, 5, allow_nan=False)),
        ),
        max_size=20,
    ),
    st.one_of(st.none(), st.integers(1, 99)),
    st.sampled_from([None, "M", "F"]),
)
def test_redis_encoding_round_trips(events, age, gender):
    agg = _agg(events)
    profile = UserProfile(age, gender, "engineer", "us")
    decoded = decode_user_state(
        SPEC, {k.encode(): v.encode() for k, v in encode_user_state(SPEC, profile, agg).items()}
    )
    assert decoded is not None
    p2, a2 = decoded
    np.testing.assert_array_equal(
        user_feature_vector(SPEC, profile, agg), user_feature_vector(SPEC, p2, a2)
    )


def test_online_increments_mirror_batch_aggregation():
    """Applying interaction_increments to a hash equals UserAggregates.add."""
    events = [(["Action", "Drama"], 4.0), (["Comedy"], None), (["Drama"], 1.5)]
    state: dict[str, float] = {}
    for genres, rating in events:
        ints, floats = interaction_increments(SPEC, genres, rating)
        for k, v in {**ints, **floats}.items():
            state[k] = state.get(k, 0) + v
    hash_form = {
        k: str(int(v)) if k in ("n", "nr") or k.startswith(("gw:", "gr:")) else repr(v)
        for k, v in state.items()
    }
    _, online = decode_user_state(SPEC, hash_form)
    batch = _agg(events)
    np.testing.assert_array_equal(
        user_feature_vector(SPEC, UserProfile(), online),
        user_feature_vector(SPEC, UserProfile(), batch),
    )


def test_unknown_user_hash_decodes_to_none():
    assert decode_user_state(SPEC, {}) is None


def test_top_genres_orders_by_watches():
    agg = _agg([(["Drama"], 3.0), (["Drama"], 3.0), (["Action"], 5.0)])
    assert top_genres(SPEC, agg, 2) == ["Drama", "Action"]
    assert top_genres(SPEC, UserAggregates.empty(SPEC), 3) == []


def test_a_cold_start_users_favourite_genres_are_the_best_rated_and_not_the_disliked():
    """Every named genre counts one watch: the ratings decide, and 1 star is no favourite."""
    first, second, third = SPEC.genres[:3]
    liked = aggregates_from_genre_ratings(SPEC, {first: 5.0, second: 4.0, third: 1.0})
    assert top_genres(SPEC, liked, 3, stated=True) == [first, second]
    swapped = aggregates_from_genre_ratings(SPEC, {first: 4.0, second: 5.0})
    assert top_genres(SPEC, swapped, 2, stated=True) == [second, first]
    # A history's low-rated genres stay (a harsh rater rates everything low).
    harsh = _agg([(["Drama"], 2.0)] * 3 + [(["Action"], 1.0)])
    assert top_genres(SPEC, harsh, 2) == ["Drama", "Action"]


def test_cold_start_genre_ratings_ignore_unknown_and_clamp():
    agg = aggregates_from_genre_ratings(SPEC, {"Comedy": 9.0, "Nope": 4.0, "Drama": float("nan")})
    assert agg.watch_count == 1
    assert agg.genre_sum[SPEC.genres.index("Comedy")] == 5.0


def test_item_features_missing_year_uses_default():
    m = item_feature_matrix(
        SPEC,
        genre_matrix=np.array([[1, 0, 1], [0, 1, 0]], np.uint8),
        year=np.array([1995.0, np.nan]),
        rating_count=np.array([10, 0]),
        rating_sum=np.array([45.0, 0.0]),
    )
    names = SPEC.item_feature_names
    assert m.shape == (2, SPEC.n_item_features)
    assert m[1, names.index("year")] == SPEC.default_year
    assert m[1, names.index("year_missing")] == 1.0
    assert m[1, names.index("mean_rating")] == pytest.approx(SPEC.global_mean)
    assert 3.5 < m[0, names.index("mean_rating")] < 4.5


def test_spec_round_trip_and_layout_check():
    d = SPEC.to_dict()
    assert FeatureSpec.from_dict(d) == SPEC
    d["user_feature_names"] = d["user_feature_names"][::-1]
    with pytest.raises(ValueError, match="user_feature_names"):
        FeatureSpec.from_dict(d)


def test_target_scale_round_trip():
    t = TargetScale("rating", 1.0, 5.0)
    r = np.array([1.0, 3.0, 5.0])
    np.testing.assert_allclose(t.from_model(t.to_model(r)), r, atol=1e-6)
    b = TargetScale("binary", logit_scale=4.0)
    assert b.to_model(np.array([3.5, 4.0])).tolist() == [0.0, 1.0]
    p = b.from_model(np.array([-1.0, 0.0, 1.0]))
    assert p[0] < 0.5 == p[1] < p[2]


def test_a_corrupt_aggregate_is_a_clear_error():
    with pytest.raises(ValueError, match="non-numeric aggregate"):
        decode_user_state(SPEC, {b"n": b"three", b"gender": b"F"})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({b"n": b"nan"}, "non-finite aggregate"),
        ({b"n": b"3", b"sum": b"inf"}, "non-finite aggregate"),
        ({b"n": b"3", b"age": b"nan"}, "non-finite age"),
        # Finite as float64, inf as float32 features: the tower answered NaN.
        ({b"n": b"3", b"nr": b"3", b"sum": b"1e300"}, "beyond 1e\\+15"),
        ({b"n": b"3", b"age": b"1e300"}, "age or one beyond"),
    ],
)
def test_a_non_finite_stored_number_is_a_clear_error(fields, message):
    """float() parses "nan" and "inf"; they must fail the user, not poison its scores."""
    with pytest.raises(ValueError, match=message):
        decode_user_state(SPEC, fields)


def test_the_largest_stored_numbers_allowed_give_finite_features():
    from recsys.features import MAX_STATE_NUMBER

    big = repr(MAX_STATE_NUMBER).encode()
    fields = {b"n": b"1", b"nr": b"1", b"sum": big, b"age": big}
    fields.update({f"gs:{g}".encode(): big for g in SPEC.genres})
    profile, agg = decode_user_state(SPEC, fields)
    assert np.isfinite(user_feature_vector(SPEC, profile, agg)).all()


def test_a_passed_on_state_with_huge_numbers_is_refused():
    """The state retrieval passes ranking is checked as the Redis hash is."""
    from recsys.user_store import StoredUser, state_from_pb, state_to_pb
    from recsys.v1 import retrieval_pb2

    profile, agg = decode_user_state(SPEC, {b"n": b"3", b"nr": b"3", b"sum": b"12"})
    msg = retrieval_pb2.StoredUserState()
    state_to_pb(SPEC, StoredUser("u", True, profile, agg), msg)
    assert state_from_pb(SPEC, "u", msg) is not None
    huge = type(msg)()
    huge.CopyFrom(msg)
    nums = np.frombuffer(msg.aggregates, "<f8").copy()
    nums[2] = 1e300
    huge.aggregates = nums.astype("<f8").tobytes()
    assert state_from_pb(SPEC, "u", huge) is None
    old_age = type(msg)()
    old_age.CopyFrom(msg)
    old_age.age = 1e300
    assert state_from_pb(SPEC, "u", old_age) is None


def test_a_missing_age_is_the_specs_default_age():
    spec = FeatureSpec(genres=SPEC.genres, countries=SPEC.countries, default_age=34.0)
    names = spec.user_feature_names
    empty = UserAggregates.empty(spec)
    unknown = user_feature_vector(spec, UserProfile(), empty)
    assert unknown[names.index("age")] == 34.0 and unknown[names.index("age_missing")] == 1.0
    # A version written before the field existed reads as 0, as it was built.
    old = FeatureSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "default_age"})
    assert old.default_age == 0.0
    assert user_feature_vector(old, UserProfile(), empty)[names.index("age")] == 0.0


def test_the_default_age_is_the_training_users_median_in_whole_years():
    from trainer.prepare import build_spec
    from trainer.synthetic import generate

    data = generate(200, 150, 4_000, 3, 0)
    ages = data.user_age[np.isfinite(data.user_age) & (data.user_age > 0)]
    spec = build_spec(data, np.arange(data.n_ratings))
    assert spec.default_age == float(np.round(np.median(ages))) > 0
