"""A version deleted and trained again under its own number replaces the old build in
running services, as in a replica started afterwards (both services, real servers).

Compared by name alone, a running service kept the old build for good while a
new replica loaded the new one, both reporting the same ``model_version``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import grpc
import pytest

from ranking_service.testing import ranking_settings
from recsys.config import ExperimentSettings
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

from .conftest import publish_into, retrieval_settings, serving_ranking, serving_retrieval

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def retrained(train_version, tmp_path_factory) -> Path:
    """Version 1 trained again with another seed: what a deleted version 1 comes back as."""
    return train_version(tmp_path_factory.mktemp("retrained"), seed=1, epochs=1)


def put(src: Path, dst: Path) -> None:
    """Copies a version into place whole, as the trainer's writer renames it in."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.copytree(src, tmp)
    os.rename(tmp, dst)


async def similar_items(ch: grpc.aio.Channel) -> tuple[str, list[str]]:
    stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
    r = await stub.SimilarItems(retrieval_pb2.SimilarItemsRequest(item_id="1", k=10), timeout=5)
    return r.index_version, [i.item_id for i in r.items]


async def ranked(ch: grpc.aio.Channel) -> tuple[str, list[float]]:
    stub = ranking_pb2_grpc.RankingServiceStub(ch)
    request = ranking_pb2.RankRequest(candidate_item_ids=["1", "2", "3", "4", "5"], top_k=5)
    r = await stub.Rank(request, timeout=5)
    return r.model_version, sorted(round(i.score, 4) for i in r.items)


SERVICES = {
    "retrieval": (retrieval_settings, serving_retrieval, similar_items),
    "ranking": (ranking_settings, serving_ranking, ranked),
}


@pytest.mark.parametrize("service", list(SERVICES))
async def test_a_version_trained_again_under_its_number_is_served(
    service, trained_version, retrained, tmp_path, rel_redis
):
    settings_for, serving, answer = SERVICES[service]
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    put(trained_version, model_dir / "1")
    publish_into(rel_redis.url, model_dir / "1")
    settings = settings_for(model_dir, rel_redis.url, reload_interval_s=0.1)
    async with serving(settings) as (address, _server), grpc.aio.insecure_channel(address) as ch:
        old = await answer(ch)
        shutil.rmtree(model_dir / "1")
        put(retrained, model_dir / "1")
        publish_into(rel_redis.url, model_dir / "1")
        deadline = time.monotonic() + 60
        while (now := await answer(ch)) == old:
            assert time.monotonic() < deadline, "the old build of version 1 still serves"
            await asyncio.sleep(0.1)
        async with (
            serving(settings) as (fresh, _),
            grpc.aio.insecure_channel(fresh) as fresh_ch,
        ):
            assert await answer(fresh_ch) == now  # what a replica started now serves
    assert now[0] == "1"


TRACKS = {  # the copy each model track serves, by track
    "retrieval": lambda app: app.engine.tracks,
    "ranking": lambda srv: srv.ranker.models,
}

# The default arm follows the pointer (at 1), the other pins 1: two tracks, one build.
PINNED_ARM = ExperimentSettings(
    name="pinned-arm",
    variants=[
        {"name": "control", "share": 0.5},
        {"name": "pinned", "share": 0.5, "model_version": "1"},
    ],
)


@pytest.mark.parametrize("service", list(SERVICES))
async def test_tracks_sharing_a_build_share_its_rebuilt_copy(
    service, trained_version, retrained, tmp_path, rel_redis
):
    """Both tracks' watchers see the rebuild in one poll: each loaded its own copy of it
    (a copy was matched among the served ones only, not the loads under way), and
    memory held the new build twice for good."""
    settings_for, serving, _answer = SERVICES[service]
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    put(trained_version, model_dir / "1")
    publish_into(rel_redis.url, model_dir / "1")
    settings = settings_for(model_dir, rel_redis.url, reload_interval_s=0.1)
    settings = settings.model_copy(update={"experiments": PINNED_ARM})
    async with serving(settings) as (_address, server):
        tracks = TRACKS[service](server)
        old = tracks["current"]
        assert tracks["1"] is old  # one copy to begin with
        shutil.rmtree(model_dir / "1")
        put(retrained, model_dir / "1")
        deadline = time.monotonic() + 60
        while any(copy is old for copy in TRACKS[service](server).values()):
            assert time.monotonic() < deadline, "the old build of version 1 still serves"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # a second copy, if loading, is swapped in by now
        tracks = TRACKS[service](server)
    assert tracks["current"] is tracks["1"], "each track keeps its own copy of one build"


@pytest.fixture(scope="module")
def other_lists(train_version, tmp_path_factory) -> Path:
    """Version 1 trained again on other data: other top lists, as a retrain's usually are."""
    return train_version(tmp_path_factory.mktemp("other-lists"), seed=1, epochs=1, data_seed=1)


async def top_country(ch: grpc.aio.Channel) -> list[str]:
    stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
    user = {"user_id": "cold-reused", "features": {"country": "us"}}
    request = retrieval_pb2.RetrieveRequest(user=user, budget=50, sources=["top_country"])
    r = await stub.Retrieve(request, timeout=5)
    assert not r.degraded, r.source_reports
    return [c.item_id for c in r.candidates]


async def test_a_rebuilt_version_serves_its_own_top_lists_once_published(
    trained_version, other_lists, tmp_path, rel_redis
):
    """The watcher loads a rebuilt version before ``recsys publish`` writes its lists (the
    trainer renames it in first): its top-list copy was made from the old build's lists
    and kept them for good, while a replica started afterwards served the new ones."""
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    put(trained_version, model_dir / "1")
    publish_into(rel_redis.url, model_dir / "1")
    settings = retrieval_settings(model_dir, rel_redis.url, reload_interval_s=0.1)
    async with (
        serving_retrieval(settings) as (address, app),
        grpc.aio.insecure_channel(address) as ch,
    ):
        old_similar, old_tops = await similar_items(ch), await top_country(ch)
        shutil.rmtree(model_dir / "1")
        put(other_lists, model_dir / "1")
        deadline = time.monotonic() + 60
        while await similar_items(ch) == old_similar:
            assert time.monotonic() < deadline, "the old build of version 1 still serves"
            await asyncio.sleep(0.1)
        # Redis holds the old build's lists until the publish: those are read.
        assert await top_country(ch) == old_tops
        publish_into(rel_redis.url, model_dir / "1")
        deadline = time.monotonic() + 20
        # Read from Redis at once; copied again at the next poll.
        while (now := await top_country(ch)) == old_tops or not app.engine.served.top_cache.trusted:
            assert time.monotonic() < deadline, "the old build's top lists still serve"
            await asyncio.sleep(0.1)
        served = app.engine.served
        assert served.top_cache.build == served.model.digest and len(served.top_cache) > 0
        assert await top_country(ch) == now  # from the copy
        async with (
            serving_retrieval(settings) as (fresh, _),
            grpc.aio.insecure_channel(fresh) as fch,
        ):
            assert await top_country(fch) == now  # what a replica started now serves
