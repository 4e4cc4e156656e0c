import math

import pytest

from ranking_service.catalogue import IdIndex
from ranking_service.validation import InvalidArgument, parse_rank, parse_recommend
from recsys.config import RankingSettings
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
            {"user": common_pb2.UserContext(features=common_pb2.UserFeatures(country="c" * 9))},
            "user.features.country",
        ),
        (
            {"user": common_pb2.UserContext(features=common_pb2.UserFeatures(occupation="o\x00"))},
            "user.features.occupation",
        ),
        (
            {
                "user": common_pb2.UserContext(
                    features=common_pb2.UserFeatures(genre_ratings={"g" * 9: 3.0})
                )
            },
            "user.features.genre_ratings key",
        ),
    ],
)
def test_bad_recommend_requests_name_the_field(request_kw, field):
    with pytest.raises(InvalidArgument) as err:
        parse_recommend(ranking_pb2.RecommendRequest(**request_kw), LIMITS)
    assert err.value.field == field


def test_a_good_recommend_request_parses():
    q = parse_recommend(
        ranking_pb2.RecommendRequest(k=2, retrieval_budget=5, sources=["popular"]), LIMITS
    )
    assert (q.k, q.budget, q.sources) == (2, 5, ["popular"])
