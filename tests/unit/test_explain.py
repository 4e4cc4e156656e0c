"""Reasons derived from retrieval provenance."""

from __future__ import annotations

from recsys.config import RecsysSettings
from recsys.explain import Reason, explain, source_kinds
from recsys.v1 import common_pb2

KINDS = source_kinds(RecsysSettings().retrieval.sources)
TITLES = {"1": "Toy Story (1995)", "50": "Star Wars (1977)"}


def cand(*sources: str, seed: str = "", genre: str = "") -> common_pb2.Candidate:
    return common_pb2.Candidate(item_id="x", sources=sources, seed_item_id=seed, genre=genre)


def why(c, country: str = "us-west") -> list[Reason]:
    return explain(c, kinds=KINDS, title_of=lambda i: TITLES.get(i, ""), country=country)


def test_kinds_follow_the_configured_types_not_names():
    entries = [
        {"name": "more_like_this", "type": "annoy_similar"},
        {"name": "genre_lists", "type": "redis_top_genre"},
        {"name": "my_plugin", "type": "recently_added"},
    ]
    kinds = source_kinds(entries)
    assert kinds["more_like_this"] == "similar_to"
    assert kinds["genre_lists"] == "top_in_genre"
    assert "my_plugin" not in kinds
    assert kinds["popular"] == "popular"  # the ranking fallback's label


def test_similar_names_the_seed_title():
    (r,) = why(cand("similar_to_recent", seed="50"))
    assert r == Reason("similar_to", "50", "Because you watched Star Wars (1977)")


def test_unknown_seed_title_falls_back_to_the_id():
    (r,) = why(cand("similar_to_recent", seed="999"))
    assert r.text == "Because you watched 999" and r.ref == "999"


def test_each_source_kind():
    assert why(cand("top_genre", genre="Comedy")) == [
        Reason("top_in_genre", "Comedy", "Top in Comedy")
    ]
    assert why(cand("top_country"), country="us-west") == [
        Reason("top_in_country", "us-west", "Popular in your region")
    ]
    assert why(cand("popular")) == [Reason("popular", "", "Popular now")]


def test_several_sources_most_specific_first_one_per_kind():
    c = cand("popular", "top_country", "top_genre", "similar_to_recent", seed="1", genre="Drama")
    got = why(c)
    assert [r.kind for r in got] == ["similar_to", "top_in_genre", "top_in_country", "popular"]
    assert got[0].text == "Because you watched Toy Story (1995)"
    assert got[1].ref == "Drama"


def test_missing_attribution_gives_no_false_reason():
    # A similarity source without a seed, or a genre list without a genre,
    # cannot be explained honestly: no reason rather than a wrong one.
    assert why(cand("similar_to_recent")) == []
    assert why(cand("top_genre")) == []
    assert why(cand()) == []


def test_plugin_sources_are_explained_by_their_fields():
    assert why(cand("my_plugin", seed="1"))[0].kind == "similar_to"
    assert why(cand("my_plugin", genre="Horror"))[0].text == "Top in Horror"
    assert why(cand("my_plugin")) == []
