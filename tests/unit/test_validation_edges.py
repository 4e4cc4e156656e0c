"""Request validation at its edges: limits exactly at and one past, zero and infinite values."""

from __future__ import annotations

import math

import pytest

from ranking_service.validation import InvalidArgument, parse_rank, parse_recommend
from recsys.config import RankingSettings
from recsys.v1 import common_pb2, ranking_pb2

LIMITS = RankingSettings(max_candidates=5, max_id_bytes=8, default_k=3, max_k=4)


def rank(**kw) -> ranking_pb2.RankRequest:
    kw.setdefault("candidate_item_ids", ["a", "b"])
    return ranking_pb2.RankRequest(**kw)


def test_exactly_max_candidates_is_accepted():
    """A Rank with exactly ``max_candidates`` ids is within the limit."""
    q = parse_rank(rank(candidate_item_ids=list("abcde")), LIMITS)
    assert len(q.candidates) == 5


def test_an_age_of_zero_means_not_given():
    """Age 0 means "not given", so it cannot override the stored age."""
    q = parse_rank(
        rank(user=common_pb2.UserContext(features=common_pb2.UserFeatures(age=0))), LIMITS
    )
    assert q.user.age is None


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_an_infinite_genre_rating_is_refused(value):
    """Infinite genre ratings are refused like NaN ones."""
    with pytest.raises(InvalidArgument) as err:
        parse_recommend(
            ranking_pb2.RecommendRequest(
                user=common_pb2.UserContext(
                    user_id="u", features=common_pb2.UserFeatures(genre_ratings={"Drama": value})
                )
            ),
            LIMITS,
        )
    assert err.value.field == "user.features.genre_ratings[Drama]"


@pytest.mark.parametrize("field", ["exclude_item_ids", "recent_item_ids"])
def test_one_id_over_the_count_limit_is_refused(field):
    """Exactly the limit is accepted, one more is refused."""
    ok = parse_rank(rank(user=common_pb2.UserContext(**{field: list("abcde")})), LIMITS)
    assert len(getattr(ok.user, field)) == 5
    with pytest.raises(InvalidArgument) as err:
        parse_rank(rank(user=common_pb2.UserContext(**{field: list("abcdef")})), LIMITS)
    assert err.value.field == f"user.{field}"
