import math

import pytest

from ranking_service.catalogue import IdIndex
from ranking_service.validation import (
    InvalidArgument,
    RetrievalLimits,
    parse_rank,
    parse_recommend,
)
from recsys.config import RankingSettings, RetrievalSettings
from recsys.v1 import common_pb2, ranking_pb2

LIMITS = RankingSettings(max_candidates=5, max_id_bytes=8, default_k=3, max_k=4)
CATALOGUE = IdIndex(["a", "b", "éé", "東京"])


def rank(**kw) -> ranking_pb2.RankRequest:
    kw.setdefault("candidate_item_ids", ["a", "b"])
    return ranking_pb2.RankRequest(**kw)


def test_a_good_rank_request_parses():
    q = parse_rank(
        rank(
            user=common_pb2.UserContext(
                user_id="u1",
                features=common_pb2.UserFeatures(age=30, country="eu", genre_ratings={"x": 4}),
                exclude_item_ids=["c"],
            ),
            candidate_item_ids=["a", "é", "b"],
            include_watched=True,
            debug=True,
        ),
        LIMITS,
    )
    assert list(q.candidates) == ["a", "é", "b"]
    assert q.rows(IdIndex(["b", "a"])).tolist() == [1, -1, 0]
    assert q.k == 3  # 0 means the default
    assert q.user.age == 30 and q.user.country == "eu" and q.user.genre_ratings == {"x": 4.0}
    assert q.user.exclude_item_ids == ["c"]
    assert q.include_watched and q.debug


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"candidate_item_ids": []}, "candidate_item_ids"),
        ({"candidate_item_ids": list("abcdef")}, "candidate_item_ids"),
        ({"candidate_item_ids": ["a", ""]}, "candidate_item_ids[1]"),
        ({"candidate_item_ids": ["a", "b", "123456789"]}, "candidate_item_ids[2]"),
        ({"candidate_item_ids": ["a", "ééééé"]}, "candidate_item_ids[1]"),  # 10 bytes
        ({"candidate_item_ids": ["a\x00", "b"]}, "candidate_item_ids[0]"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 5}, "top_k"),
        ({"user": common_pb2.UserContext(user_id="x" * 9)}, "user.user_id"),
        (
            {"user": common_pb2.UserContext(features=common_pb2.UserFeatures(age=-3))},
            "user.features.age",
        ),
        (
            {
                "user": common_pb2.UserContext(
                    features=common_pb2.UserFeatures(genre_ratings={"Drama": math.nan})
                )
            },
            "user.features.genre_ratings[Drama]",
        ),
        (
            {"user": common_pb2.UserContext(exclude_item_ids=["ok", ""])},
            "user.exclude_item_ids[1]",
        ),
        (
            {"user": common_pb2.UserContext(recent_item_ids=["x" * 20])},
            "user.recent_item_ids[0]",
        ),
    ],
)
def test_bad_rank_requests_name_the_field(request_kw, field):
    with pytest.raises(InvalidArgument) as err:
        # Malformed candidate ids are found when the catalogue does not know them.
        parse_rank(rank(**request_kw), LIMITS).rows(CATALOGUE)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_a_multibyte_id_within_the_byte_limit_is_accepted():
    q = parse_rank(rank(candidate_item_ids=["éé", "東京", "zz"]), LIMITS)
    assert q.rows(CATALOGUE).tolist() == [2, 3, -1]


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"k": -2}, "k"),
        ({"k": 99}, "k"),
        ({"retrieval_budget": -1}, "retrieval_budget"),
        ({"retrieval_budget": 6}, "retrieval_budget"),
        ({"sources": ["ok", ""]}, "sources[1]"),
        ({"user": common_pb2.UserContext(user_id="y" * 30)}, "user.user_id"),
        # Side-feature strings end up in reasons and caches: bounded like ids.
        (
            {
                "user": common_pb2.UserContext(
                    user_id="u", features=common_pb2.UserFeatures(country="c" * 9)
                )
            },
            "user.features.country",
        ),
        (
            {
                "user": common_pb2.UserContext(
                    user_id="u", features=common_pb2.UserFeatures(occupation="o\x00")
                )
            },
            "user.features.occupation",
        ),
        (
            {
                "user": common_pb2.UserContext(
                    user_id="u", features=common_pb2.UserFeatures(genre_ratings={"g" * 9: 3.0})
                )
            },
            "user.features.genre_ratings key",
        ),
    ],
)
def test_bad_recommend_requests_name_the_field(request_kw, field):
    with pytest.raises(InvalidArgument) as err:
        parse_recommend(recommend(**request_kw), LIMITS)
    assert err.value.field == field


def recommend(**kw) -> ranking_pb2.RecommendRequest:
    return ranking_pb2.RecommendRequest(**{"user": common_pb2.UserContext(user_id="u"), **kw})


RETRIEVAL = RetrievalLimits(sources=("popular", "top_genre"), max_budget=4)


@pytest.mark.parametrize(
    ("request_kw", "field", "message"),
    [
        ({"user": common_pb2.UserContext()}, "user.user_id", "must not be empty"),
        ({"retrieval_budget": 5}, "retrieval_budget", "5 is outside 0..4"),
        (
            {"sources": ["popular", "nope"]},
            "sources[1]",
            "unknown source 'nope'; configured: popular, top_genre",
        ),
    ],
)
def test_recommend_is_checked_against_retrievals_limits(request_kw, field, message):
    """What retrieval would refuse, ranking refuses itself (retrieval may be down)."""
    with pytest.raises(InvalidArgument) as err:
        parse_recommend(recommend(**request_kw), LIMITS, RETRIEVAL)
    assert str(err.value) == f"{field}: {message}"


def test_retrieval_limits_come_from_the_shared_config():
    got = RetrievalLimits.from_settings(RetrievalSettings(max_budget=700))
    assert got == RetrievalLimits(("similar_to_recent", "top_genre", "top_country", "popular"), 700)


def test_a_good_recommend_request_parses():
    q = parse_recommend(recommend(k=2, retrieval_budget=4, sources=["popular"]), LIMITS, RETRIEVAL)
    assert (q.k, q.budget, q.sources) == (2, 4, ["popular"])


def test_a_negative_k_says_zero_is_allowed():
    with pytest.raises(InvalidArgument, match=r"^k: -1 is outside 0\.\.4 \(0: the default\)$"):
        parse_recommend(recommend(k=-1), LIMITS)


def test_a_huge_genre_map_is_counted_before_it_is_copied(monkeypatch):
    """Copying a 900k-entry map held up the event loop for a second before the refusal."""
    import ranking_service.validation as ranking_validation
    import retrieval_service.servicer as retrieval_servicer
    from recsys.checks import MAX_GENRE_RATINGS
    from recsys.v1 import retrieval_pb2

    def no_copy(*_a, **_kw):
        raise AssertionError("the map was copied before its size was checked")

    huge = {f"g{i}": 1.0 for i in range(MAX_GENRE_RATINGS + 1)}
    ctx = common_pb2.UserContext(user_id="u", features=common_pb2.UserFeatures(genre_ratings=huge))
    for module in (ranking_validation, retrieval_servicer):
        monkeypatch.setattr(module, "dict", no_copy, raising=False)
    with pytest.raises(InvalidArgument, match=r"^user\.features\.genre_ratings: 1001 entries"):
        parse_recommend(recommend(user=ctx), LIMITS)
    # Retrieval's conversion leaves it uncopied for the engine's check to refuse.
    q = retrieval_servicer.query_from_pb(retrieval_pb2.RetrieveRequest(user=ctx), max_ids=10)
    assert len(q.features.genre_ratings) == MAX_GENRE_RATINGS + 1


def test_recommend_sources_are_counted_before_each_is_checked():
    many = recommend(sources=["popular"] * 11)
    limits = RetrievalLimits(("popular",), 4, max_request_ids=10)
    with pytest.raises(InvalidArgument, match=r"^sources: 11 entries, at most 10$"):
        parse_recommend(many, LIMITS, limits)


def test_top_k_equal_to_max_k_is_accepted():
    assert parse_rank(rank(candidate_item_ids=["a"], top_k=LIMITS.max_k), LIMITS).k == LIMITS.max_k


def test_a_multibyte_exclude_id_over_the_byte_limit_is_refused():
    """Five characters, ten bytes: the limit is on bytes."""
    req = rank(user=common_pb2.UserContext(exclude_item_ids=["ééééé"]))
    with pytest.raises(InvalidArgument) as err:
        parse_rank(req, LIMITS).rows(CATALOGUE)
    assert err.value.field == "user.exclude_item_ids[0]"


def test_one_long_exclude_id_is_refused_without_widening_every_other():
    """A fixed-width string array gave all 1,000 ids the long one's width: 400 MB here
    before any length was looked at, and a MemoryError (INTERNAL) at 1.6M characters."""
    import tracemalloc

    limits = RankingSettings(max_candidates=2000)
    ids = [f"i{n}" for n in range(1000)] + ["x" * 100_000]
    req = rank(user=common_pb2.UserContext(exclude_item_ids=ids))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument) as err:
            parse_rank(req, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.field == "user.exclude_item_ids[1000]"
    assert peak < 20 << 20, f"{peak / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    ("ids", "index", "problem"),
    [(["a", "", "b"], 1, "must not be empty"), (["a", "b\x00c"], 1, "NUL"), (["ab\x00"], 0, "NUL")],
)
def test_exclude_ids_refused_name_their_index(ids, index, problem):
    req = rank(user=common_pb2.UserContext(exclude_item_ids=ids))
    with pytest.raises(InvalidArgument, match=problem) as err:
        parse_rank(req, LIMITS)
    assert err.value.field == f"user.exclude_item_ids[{index}]"
