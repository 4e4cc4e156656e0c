"""The per-user interaction log: RecordInteraction writes it, publish replays it (real Redis)."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

import trainer.publish as publish_module
from recsys import redis_keys
from recsys.artifacts import ModelVersion
from recsys.features import UserAggregates, decode_user_state
from recsys.user_store import CorruptUserState, record_interaction, seed_user_commands
from trainer.publish import publish


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def _numbered_copy(src, root, n: int):
    d = root / str(n)
    shutil.copytree(src, d)
    m = json.loads((d / "manifest.json").read_text())
    m["version"] = str(n)
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def _record(redis_url, mv: ModelVersion, uid: str, items, ratings, **kw) -> list:
    """Records ``items`` for ``uid`` one by one, as the retrieval service does."""

    async def run():
        r = aioredis.Redis.from_url(redis_url)
        try:
            return [
                await record_interaction(
                    r,
                    mv.spec,
                    uid,
                    item,
                    mv.item_genre_names(mv.item_index[item]),
                    rating,
                    history_length=50,
                    **kw,
                )
                for item, rating in zip(items, ratings, strict=True)
            ]
        finally:
            await r.aclose()

    return asyncio.run(run())


def _stored(client, mv: ModelVersion, uid: str) -> UserAggregates:
    decoded = decode_user_state(mv.spec, client.hgetall(redis_keys.user_state(uid)))
    assert decoded is not None
    return decoded[1]


def _expected(mv: ModelVersion, row: int, items, ratings) -> UserAggregates:
    """The batch aggregates of ``row`` with ``items`` added, as UserAggregates.add does."""
    agg = UserAggregates.from_flat(mv.user_aggregates[row], len(mv.spec.genres))
    for item, rating in zip(items, ratings, strict=True):
        names = set(mv.item_genre_names(mv.item_index[item]))
        agg.add(np.array([g in names for g in mv.spec.genres]), rating)
    return agg


def _unseen(mv: ModelVersion, row: int, n: int) -> list[str]:
    seen = set(mv.users["watched"][row])
    return [str(i) for i in mv.item_ids if i not in seen][:n]


@pytest.fixture
def two_versions(client, trained_version, tmp_path):
    """Versions 1 and 2 of one build; 1 is published."""
    v1, v2 = (_numbered_copy(trained_version, tmp_path, n) for n in (1, 2))
    publish(v1, client, quiet=True)
    return ModelVersion.open(v1), v2


def test_a_newer_version_keeps_the_logged_interactions_in_the_aggregates(
    client, redis_url, two_versions
):
    mv, v2 = two_versions
    uid, other = (str(u) for u in mv.users["user_id"][:2])
    items = _unseen(mv, 0, 3)
    ratings = [5.0, None, 2.0]
    _record(redis_url, mv, uid, items, ratings, log_length=100)
    # Unlogged (the log turned off): the newer batch values replace these.
    _record(redis_url, mv, other, _unseen(mv, 1, 2), [4.0, None], log_length=0)
    assert client.xlen(redis_keys.user_log(uid)) == 3
    assert not client.exists(redis_keys.user_log(other))

    report = publish(v2, client, quiet=True, log_length=100)

    assert report.users_replaced == len(mv.users["user_id"])
    assert report.interactions_replayed == 3 and report.full_logs == 0
    want = _expected(mv, 0, items, ratings)
    np.testing.assert_allclose(_stored(client, mv, uid).flat(), want.flat())
    assert _stored(client, mv, uid).watch_count == len(mv.users["history"][0]) + 3
    np.testing.assert_allclose(_stored(client, mv, other).flat(), mv.user_aggregates[1])
    # Replayed, not consumed: a later snapshot trained without them needs them again.
    assert client.xlen(redis_keys.user_log(uid)) == 3


def test_the_log_keeps_what_the_interaction_was(client, redis_url, two_versions):
    mv, _ = two_versions
    uid = str(mv.users["user_id"][0])
    item = _unseen(mv, 0, 1)[0]
    _record(redis_url, mv, uid, [item, item], [3.5, 3.5], log_length=10, timestamp=1_700_000_000,
            event_id="e1")  # fmt: skip
    entries = client.xrange(redis_keys.user_log(uid))
    assert len(entries) == 1, "a retried event is logged once"
    fields = entries[0][1]
    assert (fields["item"], fields["ts"], fields["r"]) == (item, "1700000000", "3.5")
    assert fields["n"] == "1" and fields["nr"] == "1" and float(fields["sum"]) == 3.5
    _record(redis_url, mv, uid, [item], [None], log_length=10)
    assert client.xrange(redis_keys.user_log(uid))[-1][1]["r"] == ""


def test_the_log_is_capped_and_publish_says_when_it_is_full(client, redis_url, two_versions):
    mv, v2 = two_versions
    uid = str(mv.users["user_id"][0])
    items = _unseen(mv, 0, 5)
    _record(redis_url, mv, uid, items, [4.0] * 5, log_length=3)
    assert [f["item"] for _, f in client.xrange(redis_keys.user_log(uid))] == items[2:]
    report = publish(v2, client, quiet=True, log_length=3)
    assert report.interactions_replayed == 3 and report.full_logs == 1
    np.testing.assert_allclose(
        _stored(client, mv, uid).flat(), _expected(mv, 0, items[2:], [4.0] * 3).flat()
    )


def _seed(client, mv: ModelVersion, row: int, version: str, cutoff_ms: int) -> list:
    pipe = client.pipeline(transaction=False)
    seed_user_commands(
        pipe,
        mv.spec,
        str(mv.users["user_id"][row]),
        publish_module._profile(mv.users, row),
        UserAggregates.from_flat(mv.user_aggregates[row], len(mv.spec.genres)),
        [str(i) for i in mv.users["watched"][row]],
        history_length=50,
        version=version,
        created_at=mv.created_epoch_s,
        log_cutoff_ms=cutoff_ms,
    )
    return pipe.execute()[0]


def test_ratings_before_the_cutoff_are_not_replayed_and_watches_are(
    client, redis_url, two_versions
):
    """A snapshot's training data holds the log's ratings before its cutoff, no watches."""
    mv, _ = two_versions
    uid = str(mv.users["user_id"][0])
    items = _unseen(mv, 0, 4)
    ratings = [4.0, None, 3.0, 5.0]
    ids = []
    for item, rating in zip(items, ratings, strict=True):
        _record(redis_url, mv, uid, [item], [rating], log_length=10)
        ids.append(client.xrange(redis_keys.user_log(uid))[-1][0])
        while client.time()[0] * 1000 + client.time()[1] // 1000 <= int(ids[-1].split("-")[0]):
            pass  # the next entry in a later millisecond, so a cutoff can fall between them
    cutoff = int(ids[3].split("-")[0])  # the first three are before it, the last one not

    flags, replayed, left = _seed(client, mv, 0, "2", cutoff)

    assert flags & 1 and (replayed, left) == (2, 4)
    assert [e for e, _ in client.xrange(redis_keys.user_log(uid))] == ids, "the log is kept"
    np.testing.assert_allclose(
        _stored(client, mv, uid).flat(),
        _expected(mv, 0, [items[1], items[3]], [None, 5.0]).flat(),
    )
    # Trained again without the export (no cutoff): every entry is replayed.
    assert _seed(client, mv, 0, "3", 0)[1] == 4
    np.testing.assert_allclose(
        _stored(client, mv, uid).flat(), _expected(mv, 0, items, ratings).flat()
    )


def test_a_log_entry_no_recording_wrote_is_skipped(client, redis_url, two_versions):
    mv, v2 = two_versions
    uid = str(mv.users["user_id"][0])
    log_key = redis_keys.user_log(uid)
    items = _unseen(mv, 0, 2)
    _record(redis_url, mv, uid, items[:1], [4.0], log_length=10)
    client.xadd(log_key, {"item": "x", "i": "1", "n": "1.5"})  # not an integer count
    client.xadd(log_key, {"item": "x", "i": "0", "sum": "nan"})
    client.xadd(log_key, {"item": "x", "n": "1"})  # no field count
    client.xadd(log_key, {"item": "x", "i": "1", "n": "1", "sum": "bad"})
    _record(redis_url, mv, uid, items[1:], [None], log_length=10)

    report = publish(v2, client, quiet=True)

    assert report.interactions_replayed == 2
    np.testing.assert_allclose(
        _stored(client, mv, uid).flat(), _expected(mv, 0, items, [4.0, None]).flat()
    )


def test_a_log_key_of_another_type_fails_the_record_and_not_the_publish(
    client, redis_url, two_versions
):
    mv, v2 = two_versions
    uid = str(mv.users["user_id"][0])
    state = redis_keys.user_state(uid)
    client.set(redis_keys.user_log(uid), "junk")
    before = client.hgetall(state)
    with pytest.raises(CorruptUserState, match="log is a string, not a stream"):
        _record(redis_url, mv, uid, _unseen(mv, 0, 1), [4.0], log_length=10)
    assert client.hgetall(state) == before, "nothing written"
    publish(v2, client, quiet=True)
    assert not client.exists(redis_keys.user_log(uid))
    np.testing.assert_allclose(_stored(client, mv, uid).flat(), mv.user_aggregates[0])


def test_an_interaction_recorded_as_publish_reaches_the_user_counts_once(
    client, redis_url, two_versions, monkeypatch
):
    mv, v2 = two_versions
    uid = str(mv.users["user_id"][0])
    item = _unseen(mv, 0, 1)[0]
    seed = publish_module.seed_user_commands

    def record_first(pipe, spec, user_id, *args, **kwargs):
        if user_id == uid:
            _record(redis_url, mv, uid, [item], [5.0], log_length=10)
        return seed(pipe, spec, user_id, *args, **kwargs)

    monkeypatch.setattr(publish_module, "seed_user_commands", record_first)
    publish(v2, client, quiet=True)
    np.testing.assert_allclose(
        _stored(client, mv, uid).flat(), _expected(mv, 0, [item], [5.0]).flat()
    )
