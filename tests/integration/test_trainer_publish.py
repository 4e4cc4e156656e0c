"""recsys publish against a real Redis: keys, pointer switch, cleanup, parity."""

from __future__ import annotations

import json
import re
import shutil
import time

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

import trainer.publish as publish_module
from recsys import redis_keys
from recsys.artifacts import ModelVersion
from recsys.features import user_feature_vector
from recsys.user_store import load_user, record_interaction
from trainer.publish import OlderThanServed, publish
from trainer.synthetic import generate


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def test_publish_writes_top_lists_users_and_pointer(published_version, client):
    mv = ModelVersion.open(published_version)
    v = mv.version
    assert client.get(redis_keys.CURRENT_VERSION) == v
    assert client.zscore(redis_keys.VERSIONS, v) is not None
    popular = mv.top_lists["popular"]
    stored = client.zrevrange(redis_keys.top_popular(v), 0, 4)
    assert stored == [e[0] for e in popular[:5]]
    for g, entries in mv.top_lists["genre"].items():
        assert client.zcard(redis_keys.top_genre(v, g)) == len(entries)
    for c in mv.spec.countries:
        assert client.zcard(redis_keys.top_country(v, c)) > 0
    users = mv.users
    row = int(np.argmax([len(h) for h in users["history"]]))
    uid = users["user_id"][row]
    history = users["watched"][row]
    # Everything the user rated, the held-out fifth included: the watched
    # filter must not pass items the user already rated.
    data = generate(300, 250, 15_000, 3, 0)  # the conftest's trained_version data
    u = data.user_ids.index(uid)
    rated = {data.item_ids[i] for i in data.rating_item[data.rating_user == u]}
    assert set(history) == rated and set(users["history"][row]) < rated
    assert client.smembers(redis_keys.user_watched(uid)) == rated
    recent = client.lrange(redis_keys.user_recent(uid), 0, -1)
    assert recent == list(reversed(history))[: len(recent)]
    assert recent and recent[0] == history[-1]


async def test_serve_time_features_equal_train_time(published_version, redis_url):
    """The trainer's user_features.npy row equals the vector serving builds from Redis."""
    mv = ModelVersion.open(published_version)
    ids = mv.users["user_id"]
    r = aioredis.Redis.from_url(redis_url)
    try:
        rows = list(range(0, len(ids), max(1, len(ids) // 25)))
        for row in rows:
            stored = await load_user(r, mv.spec, ids[row], recent_n=10)
            assert stored.known
            served = user_feature_vector(mv.spec, stored.profile, stored.aggregates)
            np.testing.assert_array_equal(served, mv.user_features[row])
    finally:
        await r.aclose()


async def test_republish_keeps_online_interactions(published_version, redis_url, client):
    mv = ModelVersion.open(published_version)
    uid = mv.users["user_id"][0]
    unseen = next(i for i in mv.item_ids if i not in set(mv.users["history"][0]))
    r = aioredis.Redis.from_url(redis_url)
    try:
        await record_interaction(
            r,
            mv.spec,
            uid,
            unseen,
            mv.item_genre_names(mv.item_index[unseen]),
            5.0,
            history_length=50,
        )
    finally:
        await r.aclose()
    trained = len(mv.users["history"][0])
    assert int(client.hget(redis_keys.user_state(uid), "n")) == trained + 1
    report = publish(published_version, client, quiet=True)
    assert client.lindex(redis_keys.user_recent(uid), 0) == unseen
    assert unseen in client.smembers(redis_keys.user_watched(uid))
    # The same snapshot again (every `recsys up` start): nothing newer to replace
    # the aggregates with, so the recorded interaction still counts.
    assert report.users_replaced == 0
    assert int(client.hget(redis_keys.user_state(uid), "n")) == trained + 1


def test_a_newer_version_replaces_the_aggregates_an_older_one_does_not(
    client, trained_version, tmp_path
):
    """Training data is the source of truth up to its snapshot: the newest snapshot."""
    v1, v2 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2))
    mv = ModelVersion.open(v1)
    uid = str(mv.users["user_id"][0])
    state = redis_keys.user_state(uid)
    assert publish(v1, client, quiet=True).users_replaced == len(mv.users["user_id"])
    client.hset(state, "n", 999)  # stands in for online interactions since
    assert publish(v2, client, quiet=True).users_replaced == len(mv.users["user_id"])
    assert int(client.hget(state, "n")) == len(mv.users["history"][0])
    assert client.hget(state, "pv") == "2"
    client.hset(state, "n", 999)
    # A rollback to 1 serves 1's model; the users' newer facts stay.
    report = publish(v1, client, quiet=True, rollback=True)
    assert report.switched and report.users_replaced == 0
    assert int(client.hget(state, "n")) == 999


def test_publish_switches_and_cleans_old_versions(redis_url, client, trained_version, tmp_path):
    # Copies of one version under new numbers stand in for retrains (same content, new ids).
    dirs = []
    for n in (1, 2, 3):
        d = tmp_path / str(n)
        shutil.copytree(trained_version, d)
        m = json.loads((d / "manifest.json").read_text())
        m["version"] = str(n)
        (d / "manifest.json").write_text(json.dumps(m))
        dirs.append(d)
    for d in dirs:
        publish(d, client, keep=2, quiet=True)
        assert client.get(redis_keys.CURRENT_VERSION) == d.name
    assert client.zrange(redis_keys.VERSIONS, 0, -1) == ["2", "3"]
    assert not list(client.scan_iter(match=redis_keys.version_pattern("1")))
    assert client.exists(redis_keys.top_popular("2"))
    assert client.exists(redis_keys.top_popular("3"))


def test_publish_keeps_the_versions_the_config_pins(client, trained_version, tmp_path):
    from recsys.config import ExperimentSettings, load_settings
    from trainer.publish import pinned_versions

    settings = load_settings(
        ranking={"pinned_version": "2"},
        experiments=ExperimentSettings(
            name="ab",
            variants=[{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5,
                                                   "model_version": "1"}],
        ),
    )  # fmt: skip
    assert pinned_versions(settings) == {"1", "2"}
    assert pinned_versions(load_settings()) == set()
    for n in (1, 2, 3, 4):
        d = tmp_path / str(n)
        shutil.copytree(trained_version, d)
        m = json.loads((d / "manifest.json").read_text())
        m["version"] = str(n)
        (d / "manifest.json").write_text(json.dumps(m))
        publish(d, client, keep=1, quiet=True, protect=pinned_versions(settings))
    # keep=1 would leave only "4"; the variant's "1" and the rollback pin "2" stay.
    assert client.zrange(redis_keys.VERSIONS, 0, -1) == ["1", "2", "4"]
    assert not list(client.scan_iter(match=redis_keys.version_pattern("3")))
    for v in ("1", "2", "4"):
        assert client.exists(redis_keys.top_popular(v))


def test_publish_refuses_incomplete_version(redis_url, client, trained_version, tmp_path):
    broken = tmp_path / "broken" / trained_version.name
    shutil.copytree(trained_version, broken)
    (broken / "top_lists.json").write_text("{}")
    with pytest.raises(Exception, match=r"top_lists\.json"):
        publish(broken, client, quiet=True)
    assert client.get(redis_keys.CURRENT_VERSION) is None
    with pytest.raises(ValueError, match="keep"):
        publish(trained_version, client, keep=0, quiet=True)


def test_publish_refuses_a_copy_whose_name_is_not_its_version(client, trained_version, tmp_path):
    """models/5 holding version 1 would publish pointer 1 while the copy sits at 5."""
    copy = tmp_path / "5"
    shutil.copytree(trained_version, copy)
    with pytest.raises(Exception, match=r"version 5 but its manifest says version '1'"):
        publish(copy, client, quiet=True)
    assert client.get(redis_keys.CURRENT_VERSION) is None


def _before_first_user(monkeypatch, then) -> list[bool]:
    """Runs ``then`` (another publish, usually) just before a publish writes its first user."""
    seed = publish_module.seed_user_commands
    raced: list[bool] = []

    def racing_seed(*args, **kwargs):
        if not raced:
            raced.append(True)
            then()
        return seed(*args, **kwargs)

    monkeypatch.setattr(publish_module, "seed_user_commands", racing_seed)
    return raced


def _numbered_copy(src, root, n: int, created_at: str | None = None):
    d = root / str(n)
    shutil.copytree(src, d)
    m = json.loads((d / "manifest.json").read_text())
    m["version"] = str(n)
    if created_at is not None:
        m["created_at"] = created_at
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_a_reused_version_number_with_a_later_snapshot_replaces_the_aggregates(
    client, trained_version, tmp_path
):
    """A deleted version's number comes back with the next training: that is a new snapshot."""
    old = _numbered_copy(trained_version, tmp_path / "old", 2, "2026-01-01T00:00:00+00:00")
    mv = ModelVersion.open(old)
    uid = str(mv.users["user_id"][0])
    state = redis_keys.user_state(uid)
    trained = len(mv.users["history"][0])
    publish(old, client, quiet=True)
    assert client.hmget(state, "pv", "pt") == ["2", "1767225600"]
    client.hset(state, "n", 999)  # the deleted snapshot's facts (and online ones since)
    # Version 2 deleted, the model dir trained again: a new "2", made later.
    new = _numbered_copy(trained_version, tmp_path / "new", 2, "2026-01-02T00:00:00+00:00")
    assert publish(new, client, quiet=True).users_replaced == len(mv.users["user_id"])
    assert int(client.hget(state, "n")) == trained
    # The model dir emptied and trained from 1 again: a lower number, a later snapshot.
    client.hset(state, "n", 999)
    one = _numbered_copy(trained_version, tmp_path / "one", 1, "2026-01-03T00:00:00+00:00")
    report = publish(one, client, quiet=True, rollback=True)
    assert report.users_replaced == len(mv.users["user_id"])
    assert int(client.hget(state, "n")) == trained
    assert client.hmget(state, "pv", "pt") == ["1", "1767398400"]
    # Republishing it (every `recsys up` start) keeps what was recorded since.
    client.hset(state, "n", 999)
    assert publish(one, client, quiet=True).users_replaced == 0
    assert int(client.hget(state, "n")) == 999


def test_a_higher_version_from_a_clock_behind_still_replaces_the_aggregates(
    client, trained_version, tmp_path
):
    """Version 4 trained after 3 on a machine whose clock runs two minutes behind."""
    v3 = _numbered_copy(trained_version, tmp_path / "a", 3, "2026-01-01T00:02:00+00:00")
    v4 = _numbered_copy(trained_version, tmp_path / "b", 4, "2026-01-01T00:00:00+00:00")
    mv = ModelVersion.open(v3)
    state = redis_keys.user_state(str(mv.users["user_id"][0]))
    publish(v3, client, quiet=True)
    client.hset(state, "n", 999)
    assert publish(v4, client, quiet=True).users_replaced == len(mv.users["user_id"])
    assert client.hmget(state, "pv", "pt") == ["4", "1767225600"]


def test_a_version_without_a_creation_time_is_ordered_by_number(client, trained_version, tmp_path):
    v1 = _numbered_copy(trained_version, tmp_path / "a", 1, "2026-01-01T00:00:00+00:00")
    v2 = _numbered_copy(trained_version, tmp_path / "b", 2, "not a time")
    mv = ModelVersion.open(v1)
    state = redis_keys.user_state(str(mv.users["user_id"][0]))
    publish(v1, client, quiet=True)
    client.hset(state, "n", 999)
    assert publish(v2, client, quiet=True).users_replaced == len(mv.users["user_id"])
    assert int(client.hget(state, "n")) != 999
    assert client.hget(state, "pt") == "0"
    # Stamped without a time, so a rollback to the timed 1 is older by number.
    client.hset(state, "n", 999)
    assert publish(v1, client, quiet=True, rollback=True).users_replaced == 0
    assert int(client.hget(state, "n")) == 999


def test_a_hash_stamped_before_creation_times_is_ordered_by_number(
    client, trained_version, tmp_path
):
    """Hashes written before ``pt`` existed keep the number rule until a publish restamps them."""
    v2 = _numbered_copy(trained_version, tmp_path, 2)
    mv = ModelVersion.open(v2)
    uids = [str(u) for u in mv.users["user_id"][:2]]
    client.hset(redis_keys.user_state(uids[0]), mapping={"pv": "3", "n": 999})
    client.hset(redis_keys.user_state(uids[1]), mapping={"pv": "1", "n": 999})
    publish(v2, client, quiet=True)
    assert int(client.hget(redis_keys.user_state(uids[0]), "n")) == 999, "3 is newer than 2"
    assert int(client.hget(redis_keys.user_state(uids[1]), "n")) == len(mv.users["history"][1])


def test_publish_moves_the_pointer_back_only_when_asked(client, trained_version, tmp_path):
    from trainer.publish import OlderThanServed

    v1, v2 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2))
    publish(v2, client, quiet=True)
    with pytest.raises(OlderThanServed, match="Redis serves version 2, newer than 1"):
        publish(v1, client, quiet=True)
    assert client.get(redis_keys.CURRENT_VERSION) == "2"
    assert not client.exists(redis_keys.top_popular("1")), "refused before writing"
    report = publish(v1, client, quiet=True, rollback=True)
    assert report.switched and client.get(redis_keys.CURRENT_VERSION) == "1"


def test_an_older_publish_finishing_last_does_not_move_the_pointer_back(
    client, trained_version, tmp_path, monkeypatch
):
    """Version 2 is published while version 1's (slower) publish is writing its users."""

    v1, v2 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2))
    # Version 1's first user: version 2 is published meanwhile.
    raced = _before_first_user(monkeypatch, lambda: publish(v2, client, quiet=True))
    report = publish(v1, client, quiet=True)
    assert raced and not report.switched
    assert client.get(redis_keys.CURRENT_VERSION) == "2"
    # Nothing reads the loser's top lists: they are gone, the winner's are not.
    assert report.removed_versions == ["1"] and report.removed_keys > 0
    assert not list(client.scan_iter(match=redis_keys.version_pattern("1")))
    assert client.zscore(redis_keys.VERSIONS, "1") is None
    assert client.exists(redis_keys.top_popular("2"))


class _CutAfter:
    """A TCP hop to Redis that forwards whole commands and hangs up after the n-th
    one matching ``key``: a publisher killed, or its network lost, mid-publish."""

    def __init__(self, port: int, key: re.Pattern[bytes], n: int):
        import socket
        import threading

        self.port, self.key, self.n, self.cut = port, key, n, False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            s = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._down, args=(s, c), daemon=True).start()
            threading.Thread(target=self._up, args=(c, s), daemon=True).start()

    @staticmethod
    def _down(src, dst) -> None:
        with __import__("contextlib").suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    def _up(self, c, s) -> None:
        buf, seen = b"", 0
        try:
            while data := c.recv(65536):
                buf += data
                while (cmd := _one_command(buf)) is not None:
                    s.sendall(buf[:cmd])
                    named = self.key.search(buf[:cmd]) is not None
                    buf = buf[cmd:]
                    seen += named
                    if named and seen >= self.n:
                        self.cut = True
                        s.close()
                        c.close()
                        return
        except OSError:
            pass


def _one_command(buf: bytes) -> int | None:
    """Length of the first whole RESP command in ``buf``, or None."""
    if not buf.startswith(b"*"):
        return None
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    at = end + 2
    for _ in range(int(buf[1:end])):
        end = buf.find(b"\r\n", at)
        if end < 0:
            return None
        at = end + 2 + int(buf[at + 1 : end]) + 2
        if at > len(buf):
            return None
    return at


def test_a_publish_cut_off_mid_write_leaves_every_user_a_state(
    client, redis_server, trained_version, tmp_path
):
    """Redis runs each whole command it got: a user's state must be replaced in one."""
    import time

    v1, v2 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2))
    publish(v1, client, quiet=True)
    users = [str(u) for u in ModelVersion.open(v1).users["user_id"]]
    port = redis.Redis.from_url(redis_server.url).connection_pool.connection_kwargs["port"]
    # Commands on a user's state hash (not its :watched / :recent keys). An odd
    # count below the number of users: were there a delete and a write per user,
    # the cut falls between them.
    hop = _CutAfter(port, re.compile(rb"recsys:user:\{[^}]*\}\r\n"), 151)
    via = redis.Redis(host="127.0.0.1", port=hop.address[1], socket_timeout=5)
    with pytest.raises(redis.RedisError):
        publish(v2, via, quiet=True)
    assert hop.cut
    time.sleep(0.2)  # Redis runs what reached it before the hang-up
    assert client.get(redis_keys.CURRENT_VERSION) == "1"
    assert [u for u in users if not client.exists(redis_keys.user_state(u))] == []
    # The cut publish wrote version 2's top lists but never switched: later
    # publishes clean them up like any old version's.
    assert client.exists(redis_keys.top_popular("2"))
    assert client.zscore(redis_keys.VERSIONS_PENDING, "2") is not None
    assert client.zscore(redis_keys.VERSIONS, "2") is None  # never counted toward keep
    for n in (3, 4):
        # (A dead publish is cleaned up once it is old: here at once.)
        v = _numbered_copy(trained_version, tmp_path, n)
        publish(v, client, quiet=True, keep=2, pending_timeout_s=0)
    assert not list(client.scan_iter(match=redis_keys.version_pattern("2")))
    assert client.zrange(redis_keys.VERSIONS, 0, -1) == ["3", "4"]


def test_versions_are_ordered_as_numbers(client, trained_version, tmp_path):
    """As strings, "9" > "10": version 10 would be refused after 9."""
    v9, v10 = (_numbered_copy(trained_version, tmp_path, n) for n in (9, 10))
    publish(v9, client, quiet=True)
    assert publish(v10, client, quiet=True).switched
    assert client.get(redis_keys.CURRENT_VERSION) == "10"
    with pytest.raises(OlderThanServed):
        publish(v9, client, quiet=True)


def test_prune_keeps_the_newest_the_pinned_and_the_unpublished(tmp_path):
    from trainer.publish import prune_version_dirs

    for v in ("1", "2", "3", "4", "5", "6"):
        (tmp_path / v).mkdir()
        (tmp_path / v / "manifest.json").write_text("{}")
    (tmp_path / "7").mkdir()  # no manifest: a copy in progress, not a version
    removed = prune_version_dirs(tmp_path, "5", 2, protect={"1"})
    assert removed == ["2", "3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "4", "5", "6", "7"]
    with pytest.raises(ValueError):
        prune_version_dirs(tmp_path, "5", 0)


def test_publish_keep_dirs_from_the_command_line(redis_url, trained_version, tmp_path, capsys):
    from recsys.cli import main

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    for n in (1, 2, 3):
        shutil.move(_numbered_copy(trained_version, tmp_path, n), model_dir / str(n))
    argv = ["publish", "--model-dir", str(model_dir), "--redis-url", redis_url, "--keep-dirs", "2"]
    assert main(argv) == 0
    assert "removed version directories 1" in capsys.readouterr().out
    assert sorted(p.name for p in model_dir.iterdir()) == ["2", "3"]


def test_publish_that_cannot_delete_directories_still_succeeds(
    redis_url, trained_version, tmp_path, capsys, monkeypatch
):
    """The switch is done: a read-only model volume is a warning, not a failed Job."""
    from recsys.cli import main

    def read_only(path, *_a, **_kw):
        raise OSError(30, "Read-only file system", str(path))

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    for n in (1, 2):
        shutil.move(_numbered_copy(trained_version, tmp_path, n), model_dir / str(n))
    monkeypatch.setattr(publish_module.shutil, "rmtree", read_only)
    argv = ["publish", "--model-dir", str(model_dir), "--redis-url", redis_url, "--keep-dirs", "1"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "could not delete old version directories" in out.err and "Read-only" in out.err
    assert redis.Redis.from_url(redis_url).get(redis_keys.CURRENT_VERSION) == b"2"


def test_republishing_a_version_replaces_its_top_lists(published_version, client):
    """A list left by an earlier publish of the same number (a retrained 3) must not mix in."""
    key = redis_keys.top_popular(published_version.name)
    client.zadd(key, {"stale-item": 1e9})
    publish(published_version, client, quiet=True)
    assert "stale-item" not in client.zrange(key, 0, -1)


class _DiesBeforeSwitch(redis.Redis):
    """A publisher killed after writing its keys, before the pointer switch."""

    def eval(self, script, *args, **kwargs):
        if script == publish_module._SWITCH_SCRIPT:
            raise redis.ConnectionError("publisher killed")
        return super().eval(script, *args, **kwargs)


def _dies_after_its_lists(version_dir, redis_url, monkeypatch, before_lists) -> None:
    """Publishes ``version_dir`` and dies at its switch.

    ``before_lists`` runs just before the publish writes its top lists.
    """
    lists_of = publish_module._top_list_keys

    def hooked(mv):
        before_lists()
        return lists_of(mv)

    monkeypatch.setattr(publish_module, "_top_list_keys", hooked)
    dying = _DiesBeforeSwitch.from_url(redis_url)
    with pytest.raises(redis.ConnectionError):
        publish(version_dir, dying, quiet=True)
    dying.close()
    monkeypatch.undo()


def test_a_publish_that_dies_after_its_mark_was_taken_leaves_its_lists_listed(
    client, redis_url, trained_version, tmp_path, monkeypatch
):
    """Another publish of 2 took the shared mark; this one wrote its lists and died.

    Listed nowhere, its lists were never deleted by any later clean-up.
    """
    v1, v2, v3 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3))
    publish(v1, client, quiet=True)
    # The mark goes as the other publish's end takes it.
    _dies_after_its_lists(
        v2, redis_url, monkeypatch, lambda: client.zrem(redis_keys.VERSIONS_PENDING, "2")
    )
    assert client.zscore(redis_keys.VERSIONS_PENDING, "2") is not None
    publish(v3, client, quiet=True, keep=1, pending_timeout_s=0)
    assert not list(client.scan_iter(match=redis_keys.version_pattern("2")))


def test_a_publish_writing_its_lists_during_a_claim_keeps_them_listed(
    client, redis_url, trained_version, tmp_path, monkeypatch
):
    """A clean-up claimed 2 (its mark set to 0) as this publish wrote its lists, then released.

    The release removes a 0 mark: this publish, dying before its switch, left
    lists listed nowhere.
    """
    v1, v2, v3 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3))
    publish(v1, client, quiet=True)
    keys = [
        redis_keys.CURRENT_VERSION, redis_keys.VERSIONS_PENDING, redis_keys.removing("2"),
        redis_keys.removals("2"),
    ]  # fmt: skip

    def claimed():
        # A clean-up that took this publish for dead (pending_timeout_s=0).
        assert client.eval(
            publish_module._CLAIM_SCRIPT, 4, *keys, "2", repr(time.time()), 600, 600, "tok"
        )
        assert client.zscore(redis_keys.VERSIONS_PENDING, "2") == 0

    _dies_after_its_lists(v2, redis_url, monkeypatch, claimed)
    released = client.eval(
        publish_module._HELD_RELEASE, 3, redis_keys.removing("2"), redis_keys.VERSIONS,
        redis_keys.VERSIONS_PENDING, "tok", "2",
    )  # fmt: skip
    assert released and client.zscore(redis_keys.VERSIONS_PENDING, "2") is not None
    publish(v3, client, quiet=True, keep=1, pending_timeout_s=0)
    assert not list(client.scan_iter(match=redis_keys.version_pattern("2")))


def test_a_dead_publish_does_not_cost_the_served_version_its_grace(
    client, redis_url, trained_version, tmp_path
):
    v1, v2, v3, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3, 4))
    publish(v1, client, quiet=True)
    publish(v2, client, quiet=True)
    dying = _DiesBeforeSwitch.from_url(redis_url)
    with pytest.raises(redis.ConnectionError):
        publish(v3, dying, quiet=True)
    dying.close()
    publish(v4, client, quiet=True, keep=2)
    # keep=2 keeps 2, the version replicas served a moment ago; 3 waits for its timeout.
    assert client.get(redis_keys.CURRENT_VERSION) == "4"
    assert client.exists(redis_keys.top_popular("2")) and client.exists(redis_keys.top_popular("3"))


class _SlowPublisher(redis.Redis):
    """Runs ``other`` (another publish, usually) just before this client runs ``before``.

    ``before`` is the pointer switch unless set to another script of the publish.
    """

    other = None
    before = publish_module._SWITCH_SCRIPT

    def eval(self, script, *args, **kwargs):
        if self.other is not None and script == self.before:
            other, self.other = self.other, None
            other()
        return super().eval(script, *args, **kwargs)


def test_a_racing_publish_does_not_delete_the_keys_of_the_one_that_wins(
    client, redis_url, trained_version, tmp_path
):
    v1, v2, v3 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3))
    publish(v1, client, quiet=True, keep=1)
    slow = _SlowPublisher.from_url(redis_url)
    # Version 3 is being written when version 2's publish (keep=1) finishes.
    slow.other = lambda: publish(v2, client, quiet=True, keep=1)
    report = publish(v3, slow, quiet=True, keep=1)
    slow.close()
    assert report.switched and client.get(redis_keys.CURRENT_VERSION) == "3"
    assert client.exists(redis_keys.top_popular("3"))


def test_a_rollback_racing_a_publish_keeps_the_lists_it_switches_to(
    client, redis_url, trained_version, tmp_path
):
    """The nightly publish of 4 cleans up between the rollback's writes and its switch.

    Version 2, one publish from ageing out, was counted as an old version:
    its lists were deleted and the pointer still moved to it.
    """
    v1, v2, v3, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3, 4))
    for v in (v1, v2, v3):
        publish(v, client, quiet=True, keep=2)
    slow = _SlowPublisher.from_url(redis_url)
    slow.other = lambda: publish(v4, client, quiet=True, keep=2)
    report = publish(v2, slow, quiet=True, rollback=True)
    slow.close()
    assert report.switched and client.get(redis_keys.CURRENT_VERSION) == "2"
    assert client.exists(redis_keys.top_popular("2"))


def test_a_publish_whose_version_was_removed_meanwhile_does_not_switch(
    client, redis_url, trained_version, tmp_path
):
    """A publish slower than the pending timeout: another's clean-up removed its keys."""
    v1, v2, v3, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3, 4))
    for v in (v1, v2, v3):
        publish(v, client, quiet=True, keep=2)
    slow = _SlowPublisher.from_url(redis_url)
    slow.other = lambda: publish(v4, client, quiet=True, keep=2, pending_timeout_s=0)
    with pytest.raises(publish_module.RemovedWhilePublishing, match="publish 2 again"):
        publish(v2, slow, quiet=True, rollback=True)
    slow.close()
    assert client.get(redis_keys.CURRENT_VERSION) == "4"
    # Listed pending again, as a publish that died: its leftovers go once it is old.
    assert client.zscore(redis_keys.VERSIONS_PENDING, "2") is not None
    client.zadd(redis_keys.top_popular("2"), {"written-after-the-removal": 1.0})
    removed, _ = publish_module.cleanup_versions(client, 2, pending_timeout_s=0)
    assert removed == ["2"] and not client.exists(redis_keys.top_popular("2"))


def test_two_publishes_of_one_version_at_once_both_succeed(
    client, redis_url, trained_version, tmp_path
):
    """The one that switched first took the pending mark: not a removal, no "publish again"."""
    v1, v2 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2))
    publish(v1, client, quiet=True)
    slow = _SlowPublisher.from_url(redis_url)
    slow.other = lambda: publish(v2, client, quiet=True)
    report = publish(v2, slow, quiet=True)
    slow.close()
    assert report.switched and client.get(redis_keys.CURRENT_VERSION) == "2"
    assert client.exists(redis_keys.top_popular("2"))
    assert client.zscore(redis_keys.VERSIONS_PENDING, "2") is None


def test_two_publishes_of_one_version_agree_whatever_their_clocks(
    client, redis_url, trained_version, tmp_path, monkeypatch
):
    """The one that switches first runs on a host 30 s behind: no time is compared."""
    import types

    v1, v2 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2))
    publish(v1, client, quiet=True)
    slow = _SlowPublisher.from_url(redis_url)

    def other_host():
        behind = types.SimpleNamespace(
            time=lambda: time.time() - 30, perf_counter=time.perf_counter
        )
        monkeypatch.setattr(publish_module, "time", behind)
        try:
            publish(v2, client, quiet=True)
        finally:
            monkeypatch.setattr(publish_module, "time", time)

    slow.other = other_host
    report = publish(v2, slow, quiet=True)
    slow.close()
    assert report.switched and client.get(redis_keys.CURRENT_VERSION) == "2"


def test_a_removal_refuses_every_publish_that_marked_before_it(
    client, redis_url, trained_version, tmp_path
):
    """Two rollbacks to 2 and the nightly publish of 4, whose clean-up removes 2 under both.

    The first refused rollback put 2's pending mark back, and the second,
    finding it, switched to a version without top lists.
    """
    v1, v2, v3, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3, 4))
    for v in (v1, v2, v3):
        publish(v, client, quiet=True, keep=2)
    first, second = (_SlowPublisher.from_url(redis_url) for _ in range(2))
    refused = []

    def second_rollback():
        with pytest.raises(publish_module.RemovedWhilePublishing, match="publish 2 again"):
            publish(v2, second, quiet=True, rollback=True)
        refused.append(2)

    second.other = lambda: publish(v4, client, quiet=True, keep=1, pending_timeout_s=0)
    first.other = second_rollback
    with pytest.raises(publish_module.RemovedWhilePublishing, match="publish 2 again"):
        publish(v2, first, quiet=True, rollback=True)
    first.close()
    second.close()
    assert refused == [2] and client.get(redis_keys.CURRENT_VERSION) == "4"


def test_a_clean_up_that_died_half_way_still_refuses_the_switch(
    client, redis_url, trained_version, tmp_path
):
    """Its claim expired and it never got to its last step: the counter moved at the claim."""
    v1, v2 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2))
    publish(v1, client, quiet=True)
    slow = _SlowPublisher.from_url(redis_url)

    def died_half_way():
        client.zrem(redis_keys.VERSIONS_PENDING, "2")  # as another publish of 2 finishing does
        claimed = client.eval(
            publish_module._CLAIM_SCRIPT, 4, redis_keys.CURRENT_VERSION,
            redis_keys.VERSIONS_PENDING, redis_keys.removing("2"), redis_keys.removals("2"),
            "2", repr(time.time()), 600, 600, "token",
        )  # fmt: skip
        assert claimed
        client.delete(redis_keys.top_popular("2"), redis_keys.removing("2"))

    slow.other = died_half_way
    with pytest.raises(publish_module.RemovedWhilePublishing, match="publish 2 again"):
        publish(v2, slow, quiet=True)
    slow.close()
    assert client.get(redis_keys.CURRENT_VERSION) == "1"


class _RacesTheCleanUp(redis.Redis):
    """Runs ``other`` inside this client's clean-up, at the point ``at`` names.

    ``"chosen"``: once the clean-up has read what to remove; ``"deleting"``:
    as it starts deleting version 2's keys.
    """

    other = None
    at = "chosen"

    def _reach(self, point: str) -> None:
        if self.other is not None and self.at == point:
            other, self.other = self.other, None
            other()

    def zrange(self, name, *args, **kwargs):
        answer = super().zrange(name, *args, **kwargs)
        if name == redis_keys.VERSIONS_PENDING:
            self._reach("chosen")
        return answer

    def scan_iter(self, match=None, **kwargs):
        if match == redis_keys.version_pattern("2"):
            self._reach("deleting")
        return super().scan_iter(match=match, **kwargs)


def test_a_clean_up_stalled_past_its_claim_leaves_a_rollback_alone(
    client, redis_url, trained_version, tmp_path, monkeypatch
):
    """The nightly publish of 4 claims 2, then stalls (a paused pod) past the claim's TTL.

    A rollback to 2 marked, wrote and switched meanwhile; the clean-up woke and
    deleted the lists the pointer named.
    """
    monkeypatch.setattr(publish_module, "REMOVING_TTL_S", 1)  # stands for 600 s
    v1, v2, v3, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3, 4))
    for v in (v1, v2, v3):
        publish(v, client, quiet=True, keep=2)
    rolled_back = []

    def stall_then_rollback():
        time.sleep(1.5)
        rolled_back.append(publish(v2, client, quiet=True, rollback=True, keep=2).switched)

    nightly = _RacesTheCleanUp.from_url(redis_url)
    nightly.at, nightly.other = "deleting", stall_then_rollback
    report = publish(v4, nightly, quiet=True, keep=2)
    nightly.close()
    assert rolled_back == [True] and client.get(redis_keys.CURRENT_VERSION) == "2"
    assert client.exists(redis_keys.top_popular("2"))
    assert client.zscore(redis_keys.VERSIONS, "2") is not None
    assert "lost the claim" in (report.cleanup_error or "")


def test_a_lost_race_whose_clean_up_lost_its_claim_is_finished_later(
    client, redis_url, trained_version, tmp_path, monkeypatch
):
    """2 lost the race to 3 and was never served; its clean-up stalled past the claim.

    Listed in neither versions set once the claim was lost, its keys were
    never deleted by any later clean-up.
    """
    monkeypatch.setattr(publish_module, "REMOVING_TTL_S", 1)  # stands for 600 s
    v1, v2, v3, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3, 4))
    publish(v1, client, quiet=True)

    class _Stalls(redis.Redis):
        def scan_iter(self, match=None, **kwargs):
            if match == redis_keys.version_pattern("2"):
                time.sleep(1.5)  # the claim (EX 1) lapses
            return super().scan_iter(match=match, **kwargs)

    _before_first_user(monkeypatch, lambda: publish(v3, client, quiet=True))
    slow = _Stalls.from_url(redis_url)
    report = publish(v2, slow, quiet=True)
    slow.close()
    assert not report.switched and "lost the claim" in report.cleanup_error
    monkeypatch.undo()
    publish(v4, client, quiet=True, keep=1, pending_timeout_s=0)
    assert not list(client.scan_iter(match=redis_keys.version_pattern("2")))


def test_a_lost_race_whose_publish_dies_before_removing_it_is_finished_later(
    client, redis_url, trained_version, tmp_path, monkeypatch
):
    """2 lost the race to 3; its publish unmarked it, then died before claiming it.

    Listed nowhere, its keys were never deleted by any later clean-up.
    """
    v1, v2, v3, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3, 4))
    publish(v1, client, quiet=True)

    class _DiesAtTheClaim(redis.Redis):
        def eval(self, script, *args, **kwargs):
            if script == publish_module._CLAIM_SCRIPT:
                raise redis.ConnectionError("the publish's pod was killed")
            return super().eval(script, *args, **kwargs)

    _before_first_user(monkeypatch, lambda: publish(v3, client, quiet=True))
    dying = _DiesAtTheClaim.from_url(redis_url)
    report = publish(v2, dying, quiet=True)
    dying.close()
    assert not report.switched and "killed" in (report.cleanup_error or "")
    assert client.zscore(redis_keys.VERSIONS_PENDING, "2") is not None
    monkeypatch.undo()
    publish(v4, client, quiet=True, keep=1)
    assert not list(client.scan_iter(match=redis_keys.version_pattern("2")))
    assert client.zscore(redis_keys.VERSIONS_PENDING, "2") is None


def test_a_release_that_lost_its_claim_is_no_removal(
    client, redis_url, trained_version, tmp_path, monkeypatch
):
    """A rollback to 2 switched between the clean-up's last batch and its release."""
    monkeypatch.setattr(publish_module, "REMOVING_TTL_S", 1)  # stands for 600 s
    v1, v2, v3, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3, 4))
    for v in (v1, v2, v3):
        publish(v, client, quiet=True, keep=2)

    def paused_then_rollback():
        time.sleep(1.5)  # a paused pod: the claim lapses
        publish(v2, client, quiet=True, rollback=True, keep=2)

    nightly = _SlowPublisher.from_url(redis_url)
    nightly.before, nightly.other = publish_module._HELD_RELEASE, paused_then_rollback
    report = publish(v4, nightly, quiet=True, keep=2)
    nightly.close()
    assert client.get(redis_keys.CURRENT_VERSION) == "2"
    assert client.exists(redis_keys.top_popular("2"))
    assert "2" not in report.removed_versions and "lost the claim" in report.cleanup_error


def test_a_switch_refused_inside_a_clean_up_keeps_its_mark_through_the_release(
    client, redis_url, trained_version, tmp_path
):
    """A rollback to 2 past the pending timeout refused between a clean-up's last batch and release.

    The refused switch kept 2's pending mark; the release removed it, so
    what the rollback wrote after the last batch was listed nowhere and never
    deleted.
    """
    v1, v2, v3 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3))
    for v in (v1, v2, v3):
        publish(v, client, quiet=True, keep=3)

    class _SwitchesInsideTheCleanUp(redis.Redis):
        def eval(self, script, *args, **kwargs):
            if script != publish_module._SWITCH_SCRIPT:
                return super().eval(script, *args, **kwargs)
            answer = []

            def late_write_then_switch():
                client.zadd(redis_keys.top_popular("2"), {"written-after-the-last-batch": 1.0})
                answer.append(super(_SwitchesInsideTheCleanUp, self).eval(script, *args))

            nightly = _SlowPublisher.from_url(redis_url)
            nightly.before, nightly.other = publish_module._HELD_RELEASE, late_write_then_switch
            assert publish_module.remove_version(nightly, "2", pending_timeout_s=0) is not None
            nightly.close()
            return answer[0]

    slow = _SwitchesInsideTheCleanUp.from_url(redis_url)
    with pytest.raises(publish_module.RemovedWhilePublishing, match="publish 2 again"):
        publish(v2, slow, quiet=True, rollback=True)
    slow.close()
    assert client.get(redis_keys.CURRENT_VERSION) == "3"
    assert client.zscore(redis_keys.VERSIONS_PENDING, "2") is not None
    removed, _ = publish_module.cleanup_versions(client, 3, pending_timeout_s=0)
    assert removed == ["2"] and not client.exists(redis_keys.top_popular("2"))


def test_a_dead_publishs_version_leaves_pending_once_cleaned_up(client, trained_version, tmp_path):
    """The claim sets a dead publish's mark to 0 and the release removes only a 0: both needed."""
    v1, v2 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2))
    publish(v1, client, quiet=True)
    publish(v2, client, quiet=True)
    client.zadd(redis_keys.VERSIONS_PENDING, {"3": time.time() - 10 * 3600})  # died 10 h ago
    client.zadd(redis_keys.top_popular("3"), {"x": 1.0})
    removed, _ = publish_module.cleanup_versions(client, 2)
    assert removed == ["3"] and not client.exists(redis_keys.top_popular("3"))
    assert client.zscore(redis_keys.VERSIONS_PENDING, "3") is None


def test_the_removals_counter_lasts_as_long_as_a_publish_that_read_it(
    client, redis_url, trained_version, tmp_path, monkeypatch
):
    """Its TTL ran from the last claim: lapsing mid-publish, it read as moved (0, not 1)."""
    monkeypatch.setattr(publish_module, "REMOVALS_TTL_S", 6)  # stands for 7 days
    v1, v2, v3 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3))
    for v in (v1, v2, v3):
        publish(v, client, quiet=True, keep=1)  # 3's clean-up removes 2
    assert client.get(redis_keys.removals("2")) == "1"
    time.sleep(4)  # the rollback starts 2 s before the counter would lapse
    slow = _SlowPublisher.from_url(redis_url)
    slow.other = lambda: time.sleep(3)  # and switches after that
    report = publish(v2, slow, quiet=True, rollback=True)
    slow.close()
    assert report.switched and client.get(redis_keys.CURRENT_VERSION) == "2"


def test_a_publish_beside_the_current_one_is_refused_after_a_removal(
    client, redis_url, trained_version, tmp_path
):
    """An A/B arm's version, listed as published (switch=False) though a clean-up removed it."""
    v1, v3, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 3, 4))
    publish(v1, client, quiet=True)
    publish(v3, client, quiet=True, keep=1)

    arm = _SlowPublisher.from_url(redis_url)
    arm.before = publish_module._BESIDE_SCRIPT
    # A clean-up past the pending timeout, whose config lacks the arm's pin.
    arm.other = lambda: publish(v4, client, quiet=True, keep=1, pending_timeout_s=0)
    with pytest.raises(publish_module.RemovedWhilePublishing, match="publish 1 again"):
        publish(v1, arm, quiet=True, keep=1, protect={"1"}, switch=False)
    arm.close()
    assert client.zscore(redis_keys.VERSIONS, "1") is None


def test_a_refused_switch_keeps_a_fresher_mark_of_the_same_version(client):
    """Its start time over another publish's later mark made that live publish look dead."""
    client.zadd(redis_keys.VERSIONS_PENDING, {"2": 2000.0})  # another publish, started later
    client.set(redis_keys.removals("2"), 1)  # a removal since this publish's mark (0)
    keys = [
        redis_keys.CURRENT_VERSION, redis_keys.VERSIONS, redis_keys.VERSIONS_PENDING,
        redis_keys.removing("2"), redis_keys.removals("2"),
    ]  # fmt: skip
    args = ["2", "0", "3000.0", "1000.0", 0]
    assert client.eval(publish_module._SWITCH_SCRIPT, len(keys), *keys, *args) is None
    assert client.zscore(redis_keys.VERSIONS_PENDING, "2") == 2000.0
    client.zrem(redis_keys.VERSIONS_PENDING, "2")  # gone: put back, as a dead publish's
    assert client.eval(publish_module._SWITCH_SCRIPT, len(keys), *keys, *args) is None
    assert client.zscore(redis_keys.VERSIONS_PENDING, "2") == 1000.0


def test_a_rollback_between_a_clean_ups_choice_and_its_deletion_keeps_its_lists(
    client, redis_url, trained_version, tmp_path
):
    """The nightly publish of 4 chose version 2 to remove, then a rollback to 2 finished.

    The deletion went on: the pointer named a version without top lists.
    """
    v1, v2, v3, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3, 4))
    for v in (v1, v2, v3):
        publish(v, client, quiet=True, keep=2)
    nightly = _RacesTheCleanUp.from_url(redis_url)
    nightly.other = lambda: publish(v2, client, quiet=True, rollback=True, keep=2)
    report = publish(v4, nightly, quiet=True, keep=2)
    nightly.close()
    assert "2" not in report.removed_versions
    assert client.get(redis_keys.CURRENT_VERSION) == "2"
    assert client.exists(redis_keys.top_popular("2"))


def test_a_rollback_while_a_clean_up_deletes_its_version_is_refused(
    client, redis_url, trained_version, tmp_path
):
    """A rollback to 2 ran while the nightly publish of 4 was deleting 2's keys.

    It switched to 2, and the deletion went on under it.
    """
    v1, v2, v3, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3, 4))
    for v in (v1, v2, v3):
        publish(v, client, quiet=True, keep=2)

    def rollback():
        with pytest.raises(publish_module.RemovedWhilePublishing, match="publish 2 again"):
            publish(v2, client, quiet=True, rollback=True, keep=2)
        # A clean-up that dies holding the claim holds the version for a while only.
        assert 0 < client.ttl(redis_keys.removing("2")) <= publish_module.REMOVING_TTL_S

    nightly = _RacesTheCleanUp.from_url(redis_url)
    nightly.at, nightly.other = "deleting", rollback
    report = publish(v4, nightly, quiet=True, keep=2)
    nightly.close()
    assert report.removed_versions == ["2"] and nightly.other is None
    assert client.get(redis_keys.CURRENT_VERSION) == "4"
    assert not client.exists(redis_keys.removing("2"))
    # Once the clean-up is done, publishing it again rolls back.
    publish(v2, client, quiet=True, rollback=True, keep=2)
    assert client.get(redis_keys.CURRENT_VERSION) == "2"
    assert client.exists(redis_keys.top_popular("2"))


def test_a_publish_whose_version_a_clean_up_claimed_meanwhile_does_not_switch(
    client, redis_url, trained_version, tmp_path
):
    """A publish slower than the pending timeout switching while a clean-up deletes its keys.

    Its pending mark was still there (the clean-up removes it last).
    """
    v1, v2 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2))
    publish(v1, client, quiet=True)
    slow = _SlowPublisher.from_url(redis_url)
    slow.other = lambda: client.set(redis_keys.removing("2"), "1", ex=60)
    with pytest.raises(publish_module.RemovedWhilePublishing, match="publish 2 again"):
        publish(v2, slow, quiet=True)
    slow.close()
    assert client.get(redis_keys.CURRENT_VERSION) == "1"


def test_a_removal_keeps_a_version_a_publish_started_writing(published_version, client):
    """A publish's mark added after the clean-up chose its version, before the deletion."""
    version = published_version.name
    client.set(redis_keys.CURRENT_VERSION, "elsewhere")
    client.zadd(redis_keys.VERSIONS_PENDING, {version: time.time()})
    assert publish_module.remove_version(client, version) is None
    assert client.exists(redis_keys.top_popular(version))
    assert not client.exists(redis_keys.removing(version))


class _OneCommandAtATime(redis.Redis):
    """Sends a pipeline's commands one at a time and calls ``look`` after each.

    Without MULTI, Redis may run other clients' commands between any two of a
    pipeline's: ``look`` reads what each of them could have read.
    """

    look = None

    def pipeline(self, transaction=True, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        run_whole = pipe.execute

        def execute(raise_on_error=True):
            if pipe.scripts:  # the users' seed scripts: not what is looked at
                return run_whole(raise_on_error)
            results = []
            for args, options in pipe.command_stack:
                results.append(self.execute_command(*args, **options))
                self.look()
            pipe.reset()
            return results

        pipe.execute = execute
        return pipe


def test_a_republished_served_versions_lists_are_never_read_short(
    published_version, client, redis_url, monkeypatch
):
    """A republish deleted each list, then added it back in ZADD_CHUNK parts."""
    monkeypatch.setattr(publish_module, "ZADD_CHUNK", 100)  # 250-entry lists in 3 parts
    keys = list(publish_module._top_list_keys(ModelVersion.open(published_version)))
    full = {k: client.zcard(k) for k in keys}
    short: list[dict[str, int]] = []

    def look() -> None:
        reader = client.pipeline(transaction=False)
        for k in keys:
            reader.zcard(k)
        seen = dict(zip(keys, reader.execute(), strict=True))
        if seen != full:
            short.append({k: n for k, n in seen.items() if n != full[k]})

    stepped = _OneCommandAtATime.from_url(redis_url)
    stepped.look = look
    publish(published_version, stepped, quiet=True)
    stepped.close()
    assert short == []
    assert not list(client.scan_iter(match="*:staging:*")), "every copy was renamed over its list"


def test_a_republish_cut_off_mid_list_leaves_it_whole_and_its_copy_to_the_clean_up(
    client, redis_server, trained_version, tmp_path, monkeypatch
):
    """Redis runs each whole command it got: the served list must not be left partial."""
    import time

    monkeypatch.setattr(publish_module, "ZADD_CHUNK", 100)
    v1, v2, v3 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3))
    publish(v1, client, quiet=True)
    popular = redis_keys.top_popular("1")
    full = client.zrange(popular, 0, -1)
    port = redis.Redis.from_url(redis_server.url).connection_pool.connection_kwargs["port"]
    hop = _CutAfter(port, re.compile(re.escape(popular.encode())), 2)
    via = redis.Redis(host="127.0.0.1", port=hop.address[1], socket_timeout=5)
    with pytest.raises(redis.RedisError):
        publish(v1, via, quiet=True)  # the served version, republished
    assert hop.cut
    time.sleep(0.2)  # Redis runs what reached it before the hang-up
    assert client.zrange(popular, 0, -1) == full
    assert list(client.scan_iter(match="*:staging:*")), "the cut copy"
    for v in (v2, v3):
        # (The cut publish's pending mark keeps version 1 until it is old: here at once.)
        publish(v, client, quiet=True, keep=2, pending_timeout_s=0)
    # Version 1 aged out: its keys, the cut copy among them, went with it.
    assert not list(client.scan_iter(match=redis_keys.version_pattern("1")))


def test_a_served_version_republished_and_losing_a_race_keeps_its_keys(
    client, trained_version, tmp_path, monkeypatch
):
    """Version 1 is served, republished, and 2 wins meanwhile: 1 keeps its grace period."""

    v1, v2 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2))
    publish(v1, client, quiet=True)
    raced = _before_first_user(monkeypatch, lambda: publish(v2, client, quiet=True))
    report = publish(v1, client, quiet=True)
    assert raced and not report.switched and client.get(redis_keys.CURRENT_VERSION) == "2"
    # Replicas still on 1 until they reload: its top lists stay (keep=2).
    assert "1" not in report.removed_versions and client.exists(redis_keys.top_popular("1"))


def test_a_version_older_code_listed_but_never_switched_is_not_kept(
    client, trained_version, tmp_path
):
    """Publishes before the pending set listed a version as published before writing it."""
    import time

    v1, v2, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 4))
    publish(v1, client, quiet=True)
    publish(v2, client, quiet=True)
    # What an older publish of version 3 left when it died before its switch.
    client.zadd(redis_keys.VERSIONS, {"3": time.time()})
    client.zadd(redis_keys.top_popular("3"), {"an-item": 1.0})
    report = publish(v4, client, quiet=True, keep=2, pending_timeout_s=0)
    assert client.zrange(redis_keys.VERSIONS, 0, -1) == ["2", "4"]
    assert client.exists(redis_keys.top_popular("2")), "the version served a moment ago"
    assert "3" in report.removed_versions and not client.exists(redis_keys.top_popular("3"))


def test_a_redis_error_in_the_clean_up_after_the_switch_is_a_warning(
    redis_url, trained_version, tmp_path, capsys, monkeypatch
):
    """The pointer moved: failing the Job would have its retry train and publish again."""
    from recsys.cli import main

    def cut(*_a, **_kw):
        raise redis.ConnectionError("connection lost")

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    for n in (1, 2):
        shutil.move(_numbered_copy(trained_version, tmp_path, n), model_dir / str(n))
    monkeypatch.setattr(publish_module, "cleanup_versions", cut)
    argv = ["publish", "--model-dir", str(model_dir), "--redis-url", redis_url, "--keep-dirs", "1"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "not cleaned up (ConnectionError: connection lost)" in out.err
    assert redis.Redis.from_url(redis_url).get(redis_keys.CURRENT_VERSION) == b"2"
    assert sorted(p.name for p in model_dir.iterdir()) == ["2"]  # --keep-dirs still ran


def test_a_publish_switching_while_another_starts_stays_published(
    client, trained_version, tmp_path, monkeypatch
):
    """The pointer read and the move of never-switched entries are one step."""

    v1, v2, v3, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3, 4))
    publish(v1, client, quiet=True)
    publish(v2, client, quiet=True)
    read = publish_module.current_version
    raced: list[bool] = []

    def racing_read(redis_client):
        seen = read(redis_client)
        if not raced:
            # Version 4 switches in right after version 3's publish read "2".
            raced.append(True)
            publish(v4, client, quiet=True)
        return seen

    monkeypatch.setattr(publish_module, "current_version", racing_read)
    report = publish(v3, client, quiet=True, keep=3)
    assert raced and not report.switched and client.get(redis_keys.CURRENT_VERSION) == "4"
    assert "4" in client.zrange(redis_keys.VERSIONS, 0, -1), "the served version left the set"
    assert client.zscore(redis_keys.VERSIONS_PENDING, "4") is None


def test_an_older_publish_losing_a_race_keeps_the_newer_versions_user_state(
    client, trained_version, tmp_path, monkeypatch
):
    """Only the pointer switch was compare-and-set: the loser overwrote every user after."""
    v1, v2 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2))
    mv = ModelVersion.open(v2)

    def newer_wins() -> None:
        publish(v2, client, quiet=True)
        for uid in mv.users["user_id"]:  # marks what version 2 wrote
            client.hset(redis_keys.user_state(str(uid)), "n", 777)

    raced = _before_first_user(monkeypatch, newer_wins)
    report = publish(v1, client, quiet=True)
    assert raced and not report.switched and report.users_replaced == 0
    for uid in mv.users["user_id"]:
        assert client.hget(redis_keys.user_state(str(uid)), "n") == "777"


def test_an_interaction_recorded_during_a_publish_is_kept_once_within_the_cap(
    client, redis_url, trained_version, tmp_path, monkeypatch
):
    """The recent list was checked for in one pass and pushed in another."""
    import asyncio

    v1 = _numbered_copy(trained_version, tmp_path, 1)
    mv = ModelVersion.open(v1)
    row = max(range(len(mv.users["user_id"])), key=lambda r: len(mv.users["watched"][r]))
    uid = str(mv.users["user_id"][row])
    item = str(mv.users["watched"][row][0])
    cap = 10
    assert len(mv.users["watched"][row]) > cap
    seed = publish_module.seed_user_commands
    recorded: list[bool] = []

    def record_first(pipe, spec, user_id, *args, **kwargs):
        if user_id == uid and not recorded:
            recorded.append(True)

            async def record():
                r = aioredis.Redis.from_url(redis_url)
                try:
                    await record_interaction(
                        r, spec, uid, item, mv.item_genre_names(mv.item_index[item]), None,
                        history_length=cap,
                    )  # fmt: skip
                finally:
                    await r.aclose()

            asyncio.run(record())
        return seed(pipe, spec, user_id, *args, **kwargs)

    monkeypatch.setattr(publish_module, "seed_user_commands", record_first)
    publish(v1, client, quiet=True, history_length=cap)
    recent = client.lrange(redis_keys.user_recent(uid), 0, -1)
    assert recorded and recent == [item], "the online list is kept as it is, not appended to"


def test_a_pinned_version_gets_its_top_lists_beside_the_current_one(
    client, trained_version, tmp_path
):
    """An A/B arm pinned to version 1 while 3 is current: publishing 1 was refused,
    and --rollback (or a newer candidate) moved every user's arm."""
    v1, v3, v4 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 3, 4))
    mv = ModelVersion.open(v1)
    uid = str(mv.users["user_id"][0])
    publish(v1, client, quiet=True)
    publish(v3, client, quiet=True, keep=1)
    assert not client.exists(redis_keys.top_popular("1"))
    client.hset(redis_keys.user_state(uid), "n", 555)  # recorded online since
    report = publish(v1, client, quiet=True, keep=1, protect={"1"}, switch=False)
    assert not report.switched and report.users == 0
    assert client.get(redis_keys.CURRENT_VERSION) == "3"
    assert client.exists(redis_keys.top_popular("1"))
    assert client.hget(redis_keys.user_state(uid), "n") == "555"
    assert client.zscore(redis_keys.VERSIONS_PENDING, "1") is None
    # Kept by later publishes while pinned, like any protected version.
    publish(v4, client, quiet=True, keep=1, protect={"1"})
    assert client.exists(redis_keys.top_popular("1"))
    assert client.zrange(redis_keys.VERSIONS, 0, -1) == ["1", "4"]


def test_no_switch_needs_a_pin_and_a_published_version(
    redis_url, trained_version, tmp_path, capsys, monkeypatch
):
    from recsys.cli import main

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    shutil.move(_numbered_copy(trained_version, tmp_path, 1), model_dir / "1")
    argv = [
        "publish",
        str(model_dir / "1"),
        "--model-dir",
        str(model_dir),
        "--redis-url",
        redis_url,
    ]
    assert main([*argv, "--no-switch"]) == 2
    assert "is not pinned by the config" in capsys.readouterr().err
    monkeypatch.setenv("RECSYS_RANKING__PINNED_VERSION", "1")
    assert main([*argv, "--no-switch"]) == 2
    assert "nothing is published yet" in capsys.readouterr().err
    assert redis.Redis.from_url(redis_url).get(redis_keys.CURRENT_VERSION) is None


def test_publish_with_one_wrong_typed_user_hash_still_publishes(client, trained_version, tmp_path):
    """A corrupt (wrong-typed) user key is replaced by the batch state, not a failed publish."""
    v1 = _numbered_copy(trained_version, tmp_path, 1)
    mv = ModelVersion.open(v1)
    uid = str(mv.users["user_id"][0])
    client.set(redis_keys.user_state(uid), "not a hash")
    client.set(redis_keys.user_watched(uid), "not a set")
    client.set(redis_keys.user_recent(uid), "not a list")
    publish(v1, client, quiet=True)
    assert client.get(redis_keys.CURRENT_VERSION) == "1"
    assert client.type(redis_keys.user_state(uid)) == "hash"
    assert client.type(redis_keys.user_watched(uid)) == "set"
    assert client.type(redis_keys.user_recent(uid)) == "list"


def test_no_switch_keeps_the_previous_versions_grace(client, trained_version, tmp_path):
    """--keep 2 keeps the version before the current one; --no-switch should not take its place."""
    v1, v2, v3 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2, 3))
    publish(v1, client, quiet=True)
    publish(v2, client, quiet=True)
    publish(v3, client, quiet=True)  # keeps 2 (grace) and 3
    assert client.exists(redis_keys.top_popular("2"))
    publish(v1, client, quiet=True, protect={"1"}, switch=False)
    assert client.exists(redis_keys.top_popular("1"))
    assert client.exists(redis_keys.top_popular("2")), client.zrange(redis_keys.VERSIONS, 0, -1)


def test_up_on_an_emptied_model_dir_writes_the_new_datas_users(client, trained_version, tmp_path):
    """`recsys up` keeps its Redis in var/redis: a model dir emptied and trained on
    other data is version 1 again, below the pv=2 its users carry; up passes
    replace_users after it trains, so the new data's users are written."""
    from tests.conftest import _train_version

    old = _numbered_copy(trained_version, tmp_path, 2)  # data_seed 0
    new = _train_version(tmp_path / "models", data_seed=7, n_countries=5)  # other data: version 1
    assert new.name == "1"
    publish(old, client, quiet=True)
    report = publish(new, client, quiet=True, rollback=True, replace_users=True)  # as up runs it
    mv = ModelVersion.open(new)
    uid = str(mv.users["user_id"][0])
    want = str(mv.users["country"][0])
    assert report.switched
    assert client.hget(redis_keys.user_state(uid), "pv") == "1", report
    assert client.hget(redis_keys.user_state(uid), "country") == want


@pytest.mark.parametrize(
    "flag", [["--rollback"], ["--replace-user-state"], ["--keep-dirs", "1"], ["--if-unpublished"]]
)
def test_no_switch_refuses_flags_it_would_ignore(
    redis_url, trained_version, tmp_path, capsys, flag
):
    from recsys.cli import main

    argv = ["publish", str(trained_version), "--redis-url", redis_url, "--no-switch", *flag]
    assert main(argv) == 2
    assert f"{flag[0]} cannot apply to it" in capsys.readouterr().err


def test_a_published_recent_list_is_the_newest_history_length_items(
    client, trained_version, tmp_path
):
    """Exactly ``history_length`` entries, newest first: the cap is not one off."""
    v1 = _numbered_copy(trained_version, tmp_path, 1)
    mv = ModelVersion.open(v1)
    row = max(range(len(mv.users["user_id"])), key=lambda r: len(mv.users["watched"][r]))
    watched = [str(i) for i in mv.users["watched"][row]]
    cap = 7
    assert len(watched) > cap + 1
    publish(v1, client, quiet=True, history_length=cap)
    recent = client.lrange(redis_keys.user_recent(str(mv.users["user_id"][row])), 0, -1)
    assert recent == watched[::-1][:cap]


def test_a_version_trained_again_is_named_as_its_build_with_its_lists_only(
    client, redis_url, trained_version, tmp_path
):
    """``recsys:v:<ver>:build`` says whose lists Redis holds under a reused number: retrieval
    copies a served build's lists only while it names that build. It must not name the new
    build before every list of it is in."""
    old = _numbered_copy(trained_version, tmp_path / "old", 1)
    new = _numbered_copy(trained_version, tmp_path / "new", 1, "2030-01-01T00:00:00+00:00")
    build = redis_keys.version_build("1")
    publish(old, client, quiet=True)
    assert client.get(build) == ModelVersion.open(old).digest
    digest = ModelVersion.open(new).digest
    early: list[list[str]] = []

    def look() -> None:
        if client.get(build) == digest and (copies := list(client.scan_iter("*:staging:*"))):
            early.append(copies)  # the new build named over lists not renamed in yet

    stepped = _OneCommandAtATime.from_url(redis_url)
    stepped.look = look
    publish(new, stepped, quiet=True)
    stepped.close()
    assert client.get(build) == digest and early == []
