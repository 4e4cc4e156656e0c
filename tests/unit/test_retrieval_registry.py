"""Source registry (entry points + config validation) and request validation."""

from __future__ import annotations

import pytest

from recsys.config import RetrievalSettings, _default_sources
from retrieval_service.engine import RequestFeatures, RetrievalEngine, RetrieveQuery
from retrieval_service.errors import InvalidArgument, NotFound, SourceConfigError, Unavailable
from retrieval_service.registry import ENTRY_POINT_GROUP, available_sources, build_sources
from retrieval_service.sources.annoy_similar import AnnoySimilarConfig, AnnoySimilarSource
from retrieval_service.sources.base import CandidateSource
from retrieval_service.sources.top_lists import PopularSource, TopCountrySource, TopGenreSource


def test_builtins_are_registered_through_entry_points():
    found = available_sources()
    assert ENTRY_POINT_GROUP == "recsys.candidate_sources"
    expected = {
        "annoy_similar": AnnoySimilarSource,
        "redis_top_genre": TopGenreSource,
        "redis_top_country": TopCountrySource,
        "popular": PopularSource,
    }
    for name, cls in expected.items():
        assert found[name].load() is cls


def test_a_type_two_packages_define_differently_is_refused_by_name(monkeypatch):
    """Last one on sys.path won: a plugin called ``popular`` replaced the built-in unseen."""
    from importlib.metadata import EntryPoint

    import retrieval_service.registry as registry

    installed = registry._entry_points()
    evil = EntryPoint("popular", "someplugin.src:EvilPopular", ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: [*installed, evil])
    with pytest.raises(SourceConfigError, match=r"sources\[0\].*'popular' is defined more than"):
        build_sources([{"name": "popular", "type": "popular"}])
    with pytest.raises(SourceConfigError) as err:
        build_sources([{"name": "popular", "type": "popular"}])
    assert "retrieval_service.sources.top_lists:PopularSource" in str(err.value)
    assert "someplugin.src:EvilPopular" in str(err.value)
    # Only the clashing type: the others still build.
    assert [s.name for s in build_sources([{"name": "genre", "type": "redis_top_genre"}])] == [
        "genre"
    ]
    # The same definition listed twice (one package seen on two paths) is no clash.
    twice = [*installed, *(ep for ep in installed if ep.name == "popular")]
    monkeypatch.setattr(registry, "_entry_points", lambda: twice)
    assert build_sources([{"name": "popular", "type": "popular"}])[0].name == "popular"


def test_default_config_builds_every_builtin():
    sources = build_sources(_default_sources())
    assert [s.name for s in sources] == [
        "similar_to_recent", "top_genre", "top_country", "popular",
    ]  # fmt: skip
    assert all(isinstance(s, CandidateSource) for s in sources)
    sim = sources[0]
    assert isinstance(sim.config, AnnoySimilarConfig)
    assert sim.config.budget == 200 and sim.config.timeout_ms == 50
    assert sources[1].config.tier == "segment" and sources[3].config.tier == "popular"


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        (
            [{"name": "a", "type": "annoy_similar", "seedz": 3}],
            r"\[0\] \(name='a'\): unknown key 'seedz'",
        ),
        (
            [{"name": "a", "type": "no_such"}],
            r"unknown source type 'no_such'; installed .*annoy_similar",
        ),
        ([{"name": "a"}], r"missing key 'type'"),
        ([{"name": "Bad-Name", "type": "popular"}], r"name: .*snake_case"),
        ([{"name": "a", "type": "popular", "budget": 0}], r"budget: .*greater than or equal to 1"),
        ([{"name": "a", "type": "popular", "weight": -1}], r"weight"),
        (
            [{"name": "a", "type": "popular"}, {"name": "a", "type": "redis_top_country"}],
            r"\[1\] \(name='a'\): duplicate source name 'a'",
        ),
        ([], r"retrieval.sources is empty"),
        (["popular"], r"expected a table"),
        # Was a bare TypeError (unhashable type: 'list') naming no entry.
        ([{"name": "a", "type": ["popular"]}], r"\[0\] \(name='a'\): key 'type' must be a string"),
        (
            [{"name": "a", "type": "annoy_similar", "per_seed": 60, "search_k": 50}],
            r"search_k 50 must be -1 or more than per_seed \(60\)",
        ),
        (
            [{"name": f"p{i}", "type": "popular"} for i in range(65)],
            r"65 sources configured, at most 64",
        ),
    ],
)
def test_bad_source_config_names_source_and_key(entries, match):
    with pytest.raises(SourceConfigError, match=match):
        build_sources(entries)


def test_a_plugin_whose_constructor_raises_is_refused_naming_the_entry(monkeypatch):
    """Its own check of its settings escaped as a bare ValueError naming no entry."""
    from importlib.metadata import EntryPoint
    from typing import Literal

    import retrieval_service.registry as registry
    from retrieval_service.sources.base import SourceConfig

    class NeedsAKeyConfig(SourceConfig):
        type: Literal["needs_key"] = "needs_key"

    class NeedsAKey:
        config_model = NeedsAKeyConfig

        def __init__(self, config):
            raise ValueError("needs an api key")

    ep = EntryPoint("needs_key", "x:NeedsAKey", ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "load_source_class", lambda _ep: NeedsAKey)
    with pytest.raises(
        SourceConfigError,
        match=r"sources\[0\] \(name='k'\): source type 'needs_key' could not be built: "
        r"ValueError: needs an api key",
    ):
        build_sources([{"name": "k", "type": "needs_key"}], available={"needs_key": ep})


def _engine(**overrides) -> RetrievalEngine:
    settings = RetrievalSettings(**overrides)
    return RetrievalEngine(settings, build_sources(_default_sources()), redis=None)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (RetrieveQuery(""), "user.user_id"),
        (RetrieveQuery("é" * 129), "user.user_id"),  # 258 bytes in UTF-8
        (RetrieveQuery("u", budget=-1), "budget"),
        (RetrieveQuery("u", budget=5001), "budget"),
        (RetrieveQuery("u", sources=("popular", "nope")), "sources[1]"),
        # The engine holds history newest first; the message names the
        # position in the request's list, which is oldest first.
        (RetrieveQuery("u", recent=("", "b", "c")), "user.recent_item_ids[2]"),
        (RetrieveQuery("u", recent=("a", "b", "")), "user.recent_item_ids[0]"),
        (RetrieveQuery("u", exclude=("a\x00b",)), "user.exclude_item_ids[0]"),
        (RetrieveQuery("u", features=RequestFeatures(country="x" * 300)), "user.features.country"),
        (RetrieveQuery("u", features=RequestFeatures(gender="g" * 257)), "user.features.gender"),
        (RetrieveQuery("u", features=RequestFeatures(age=-3.0)), "user.features.age"),
        (
            RetrieveQuery("u", features=RequestFeatures(genre_ratings={"Drama": float("nan")})),
            "user.features.genre_ratings[Drama]",
        ),
        (RetrieveQuery("u", exclude=("x" * 257,)), "user.exclude_item_ids[0]"),
    ],
)
async def test_retrieve_validation_happens_before_anything_else(query, field):
    with pytest.raises(InvalidArgument) as err:
        await _engine().retrieve(query)
    assert err.value.field == field
    assert str(err.value).startswith(field + ": ")


@pytest.mark.parametrize("field", ["sources", "recent_item_ids", "exclude_item_ids"])
async def test_an_id_list_over_the_limit_is_refused_before_it_is_copied(field, monkeypatch):
    """A 16 MiB Retrieve of 4.2M ids cost +289 MiB and ~850 ms of copies on the
    event loop before the count check refused it."""
    import builtins

    import retrieval_service.servicer as servicer
    from recsys.v1 import common_pb2, retrieval_pb2

    copied: list[int] = []

    def counting_tuple(values=()):
        copied.append(len(out := builtins.tuple(values)))
        return out

    monkeypatch.setattr(servicer, "tuple", counting_tuple, raising=False)

    def request(n: int) -> retrieval_pb2.RetrieveRequest:
        ids = [f"i{i}" for i in range(n)]
        if field == "sources":
            return retrieval_pb2.RetrieveRequest(
                user=common_pb2.UserContext(user_id="u"), sources=ids
            )
        return retrieval_pb2.RetrieveRequest(
            user=common_pb2.UserContext(user_id="u", **{field: ids})
        )

    at_limit = servicer.query_from_pb(request(10), max_ids=10)
    assert max(copied) == 10
    if field == "recent_item_ids":  # newest first, as before
        assert at_limit.recent == tuple(f"i{i}" for i in reversed(range(10)))
    copied.clear()
    over = servicer.query_from_pb(request(11), max_ids=10)
    assert max(copied) == 0  # the other two lists, empty
    name = field if field == "sources" else f"user.{field}"
    with pytest.raises(InvalidArgument, match=rf"^{name}: 11 entries, at most 10 allowed$"):
        await _engine(max_request_ids=10).retrieve(over)


async def test_valid_query_without_a_version_is_unavailable():
    with pytest.raises(Unavailable, match="no model version loaded"):
        await _engine().retrieve(RetrieveQuery("u", budget=10, sources=("popular",)))


@pytest.mark.parametrize(
    ("item", "k", "field"), [("", 5, "item_id"), ("1", 0, "k"), ("1", 11, "k")]
)
def test_similar_validation(item, k, field):
    with pytest.raises(InvalidArgument) as err:
        _engine(max_similar_k=10).similar(item, k)
    assert err.value.field == field


async def test_record_validation():
    engine = _engine()
    with pytest.raises(InvalidArgument, match=r"^user_id: must not be empty"):
        await engine.record("", "1", None)
    for negative in (-5, -1):  # -1 is the edge a sentinel check would let through
        with pytest.raises(InvalidArgument, match=r"^timestamp: -\d+ is negative"):
            await engine.record("u", "1", None, timestamp=negative)
    with pytest.raises(Unavailable):
        await engine.record("u", "1", 4.0)
    assert NotFound.code == "NOT_FOUND" and InvalidArgument.code == "INVALID_ARGUMENT"


def test_only_this_packages_sources_skip_the_block_alignment_check():
    from retrieval_service.engine import _builtin

    built = build_sources(_default_sources())
    assert all(_builtin(s) for s in built)

    class Plugin(PopularSource):  # defined here: another package's module
        pass

    assert not _builtin(Plugin(built[-1].config))


def test_a_sources_answer_is_cut_to_what_it_was_asked_for():
    """A plugin that returns more than ``k`` gets ``k`` counted, as a list or as a block."""
    from types import SimpleNamespace

    import numpy as np

    from retrieval_service.engine import _as_block
    from retrieval_service.sources.base import Candidate, CandidateBlock

    ids = [f"i{n}" for n in range(20)]
    served = SimpleNamespace(item_ids=ids, item_index={s: n for n, s in enumerate(ids)})
    block = CandidateBlock(ids, np.arange(10, dtype=np.int64), np.linspace(1, 0, 10))
    for trusted in (True, False):
        cut = _as_block(block, 3, served, trusted=trusted)
        assert cut.rows.tolist() == [0, 1, 2]
    listed = _as_block([Candidate(item_id=s, score=1.0) for s in ids[:8]], 3, served)
    assert [ids[r] for r in listed.rows.tolist()] == ids[:3]
