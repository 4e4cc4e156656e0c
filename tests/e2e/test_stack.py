"""End to end: the real stack (embedded Redis, both services as subprocesses).

Exercises what a backend team relies on through the public client only:
distinct, unwatched, attributed recommendations; interactions that change
the next answer; "more like this"; degradation when Redis dies; and a clean
shutdown that leaves no process or port behind.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import redis

from recsys import redis_keys
from recsys.artifacts import open_version
from recsys.client import RecommenderClient
from recsys.config import load_settings
from recsys.stack import start_stack
from tests.conftest import ipv6_loopback

pytestmark = pytest.mark.slow


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, int(port))) == 0


def _stack(model_dir: Path, tmp: Path, monkeypatch):
    monkeypatch.delenv("RECSYS_REDIS_URL", raising=False)
    settings = load_settings(model_dir=model_dir)
    # Free ports: `up` refuses the default ones while a developer's stack holds them.
    settings.retrieval.port = 0
    settings.ranking.port = 0
    return start_stack(settings, quiet=True, log_dir=tmp / "logs", health_timeout_s=180)


@pytest.fixture(scope="module")
def stack(trained_version: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    model_dir = tmp / "models"
    model_dir.mkdir()
    shutil.copytree(trained_version, model_dir / trained_version.name)
    mp = pytest.MonkeyPatch()
    s = _stack(model_dir, tmp, mp)
    yield s
    s.stop()
    mp.undo()


@pytest.fixture(scope="module")
def client(stack):
    with RecommenderClient(stack.ranking_address, stack.retrieval_address, timeout_s=10) as c:
        yield c


@pytest.fixture(scope="module")
def version(stack):
    return open_version(stack.model_dir)


def _watched(stack, user_id: str) -> set[str]:
    r = redis.Redis.from_url(stack.redis_url)
    try:
        return {m.decode() for m in r.smembers(redis_keys.user_watched(user_id))}
    finally:
        r.close()


def test_recommend_returns_distinct_unwatched_attributed_items(stack, client, version):
    for uid in version.users["user_id"][:5]:
        recs = client.recommend(uid, k=10)
        ids = [i.item_id for i in recs.items]
        assert len(ids) == 10 and len(set(ids)) == 10
        assert not set(ids) & _watched(stack, uid), "already-watched item recommended"
        assert all(i.sources for i in recs.items), "every item names its sources"
        assert all(i.item_id in version.item_index for i in recs.items)
        assert recs.model_version == version.version
        assert {r.status for r in recs.source_reports} == {"OK"}
        scores = [i.score for i in recs.items]
        assert scores == sorted(scores, reverse=True)


def test_recorded_item_disappears_and_history_steers_similar_source(stack, client, version):
    uid = version.users["user_id"][7]
    first = client.recommend(uid, k=10)
    target = first.items[0].item_id
    before = client.recommend(uid, k=50, sources=["similar_to_recent"])
    client.record(uid, target, rating=5.0)
    after = client.recommend(uid, k=10)
    assert target not in {i.item_id for i in after.items}
    # The newest watch is now a seed of similar_to_recent: its nearest
    # neighbours (by the Annoy index) show up among that source's candidates.
    neighbours = {n.item_id for n in client.similar(target, k=10)}
    steered = client.recommend(uid, k=50, sources=["similar_to_recent"])
    new_ids = {i.item_id for i in steered.items}
    assert new_ids != {i.item_id for i in before.items}
    assert new_ids & neighbours


def test_similar_items_share_genres_more_than_chance(client, version):
    genres = np.asarray(version.item_genres, dtype=bool)
    rng = np.random.default_rng(0)
    items = rng.choice(len(version.item_ids), size=20, replace=False)
    shared, baseline = [], []
    for row in items:
        sims = client.similar(version.item_ids[row], k=10)
        assert len(sims) == 10 and version.item_ids[row] not in {s.item_id for s in sims}
        rows = [version.item_index[s.item_id] for s in sims]
        shared += [bool((genres[row] & genres[r]).any()) for r in rows]
        random_rows = rng.choice(len(version.item_ids), size=10)
        baseline += [bool((genres[row] & genres[r]).any()) for r in random_rows]
    assert np.mean(shared) > np.mean(baseline) + 0.1


def test_cold_start_user_gets_recommendations(client):
    recs = client.recommend("never-seen-user-xyz", k=5, features={"genre_ratings": {"Comedy": 5}})
    assert len(recs.items) == 5


def test_redis_death_degrades_instead_of_failing_then_recovers(stack, client, version):
    uid = version.users["user_id"][3]
    assert stack.redis is not None
    stack.redis.stop()
    try:
        recs = client.recommend(uid, k=10)
        assert len(recs.items) > 0
        assert any(r.status != "OK" for r in recs.source_reports), recs.source_reports
    finally:
        stack.redis.start()
    # Both services reconnect by themselves once Redis is back.
    for _ in range(50):
        recs = client.recommend(uid, k=10)
        if all(r.status == "OK" for r in recs.source_reports):
            break
    assert all(r.status == "OK" for r in recs.source_reports)


def test_stopping_the_stack_leaves_nothing_behind(
    trained_version: Path, tmp_path: Path, monkeypatch
):
    model_dir = tmp_path / "models"
    shutil.copytree(trained_version, model_dir / trained_version.name)
    s = _stack(model_dir, tmp_path, monkeypatch)
    procs = list(s.procs)
    redis_proc = s.redis.proc
    addresses = [s.retrieval_address, s.ranking_address, s.redis_url.split("//")[1].split("/")[0]]
    assert all(_port_open(a) for a in addresses)
    s.stop()
    assert all(p.poll() is not None for p in procs)
    assert redis_proc.poll() is not None
    assert not any(_port_open(a) for a in addresses)


@pytest.mark.movielens
def test_real_movielens_100k_path(ml100k_dir: Path, tmp_path: Path, monkeypatch):
    from trainer.loaders import load_dataset
    from trainer.train import TrainConfig, train

    data = load_dataset(f"movielens-100k:{ml100k_dir}")
    cfg = TrainConfig(epochs=2, hidden_units=(64, 32), annoy_trees=10, patience=0)
    train(data, tmp_path / "models", cfg, evaluate=False, quiet=True)
    s = _stack(tmp_path / "models", tmp_path, monkeypatch)
    try:
        with RecommenderClient(s.ranking_address, s.retrieval_address, timeout_s=10) as c:
            recs = c.recommend("1", k=10)
            assert len({i.item_id for i in recs.items}) == 10
            assert not {i.item_id for i in recs.items} & _watched(s, "1")
            toy_story = c.similar("1", k=10)
            assert len(toy_story) == 10
            assert all(i.title for i in recs.items)
    finally:
        s.stop()


def test_up_serves_a_model_dir_emptied_and_trained_again(
    trained_version: Path, tmp_path: Path, monkeypatch
):
    """Its own embedded Redis still named version 2, so publishing the new 1 was refused."""
    import json

    def numbered(root: Path, n: int) -> None:
        shutil.copytree(trained_version, root / str(n))
        manifest = json.loads((root / str(n) / "manifest.json").read_text())
        manifest["version"] = str(n)
        (root / str(n) / "manifest.json").write_text(json.dumps(manifest))

    model_dir = tmp_path / "var" / "models"
    model_dir.mkdir(parents=True)
    numbered(model_dir, 2)
    _stack(model_dir, tmp_path, monkeypatch).stop()
    shutil.rmtree(model_dir)
    model_dir.mkdir()
    numbered(model_dir, 1)
    stack = _stack(model_dir, tmp_path, monkeypatch)
    try:
        assert redis.Redis.from_url(stack.redis_url).get(redis_keys.CURRENT_VERSION) == b"1"
    finally:
        stack.stop()


def _own_copy(trained_version: Path, tmp_path: Path, monkeypatch):
    """Settings for a stack of its own: a copy of the trained version, an embedded Redis."""
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    shutil.copytree(trained_version, model_dir / trained_version.name)
    monkeypatch.delenv("RECSYS_REDIS_URL", raising=False)
    return load_settings(model_dir=model_dir)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_up_serves_the_configured_host_where_the_client_dials(
    trained_version: Path, tmp_path: Path, monkeypatch
):
    """``up`` bound 127.0.0.1 whatever the config said; ``recommend`` dialled [::1]."""
    from recsys.embedded_redis import free_port

    settings = _own_copy(trained_version, tmp_path, monkeypatch)
    model_dir = settings.model_dir
    for server in (settings.retrieval, settings.ranking):
        server.host, server.port = "::1", free_port()
    stack = start_stack(settings, quiet=True, log_dir=tmp_path / "logs", health_timeout_s=180)
    try:
        assert stack.ranking_address == f"[::1]:{settings.ranking.port}"
        # What `recsys recommend` does with the same config.
        with RecommenderClient.from_settings(settings, timeout_s=10) as c:
            assert c.recommend(str(open_version(model_dir).users["user_id"][0]), k=5).items
    finally:
        stack.stop()


def test_the_demo_moves_off_a_busy_configured_port(
    trained_version: Path, tmp_path: Path, monkeypatch
):
    """Only ``up`` without ``--demo`` refuses: the demo's client asks the stack where it is."""
    settings = _own_copy(trained_version, tmp_path, monkeypatch)
    model_dir = settings.model_dir
    settings.retrieval.port = 0
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        settings.ranking.port = busy = other.getsockname()[1]
        stack = start_stack(
            settings,
            quiet=True,
            log_dir=tmp_path / "logs",
            health_timeout_s=180,
            any_free_port=True,
        )
        try:
            assert not stack.ranking_address.endswith(f":{busy}")
            with RecommenderClient(stack.ranking_address, stack.retrieval_address) as c:
                assert c.recommend(str(open_version(model_dir).users["user_id"][0]), k=5).items
        finally:
            stack.stop()
