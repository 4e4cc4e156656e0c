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


def _seed(
    client, mv: ModelVersion, row: int, version: str, cutoff_ms: int, log_length: int | None = None
) -> list:
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
        log_length=log_length,
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
    # A cutoff with most of the log after it (an older export): the shorter
    # side, before it, is read and taken off the sums; the same result.
    cutoff = int(ids[1].split("-")[0])
    assert _seed(client, mv, 0, "3", cutoff)[1] == 3
    np.testing.assert_allclose(
        _stored(client, mv, uid).flat(), _expected(mv, 0, items[1:], ratings[1:]).flat()
    )
    # Trained again without the export (no cutoff): every entry is replayed.
    assert _seed(client, mv, 0, "4", 0)[1] == 4
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


def _summed(client, uid: str) -> dict[str, dict[str, float]]:
    """The log's entries summed in Python, by kind, as the sums hashes should hold them."""
    out: dict[str, dict[str, float]] = {"watches": {}, "ratings": {}}
    for _, f in client.xrange(redis_keys.user_log(uid)):
        names = list(f)
        incs = names[names.index("i") + 1 :]
        into = out["ratings" if f["r"] else "watches"]
        for name in incs:
            into[name] = into.get(name, 0.0) + float(f[name])
    return {k: {n: v for n, v in d.items() if v} for k, d in out.items()}


def _log_keys_left(client, uid: str) -> int:
    """How many of the user's log, sums and retired-watch keys exist."""
    kinds = ("watches", "ratings")
    return client.exists(
        redis_keys.user_log(uid),
        *(redis_keys.user_log_sums(uid, k) for k in kinds),
        redis_keys.user_retired_watches(uid),
    )


def _sums_match(client, uid: str) -> bool:
    """The sums hashes hold what the log's entries add up to (floats to rounding)."""
    got, want = _sums(client, uid), _summed(client, uid)
    return all(
        got[k].keys() == want[k].keys() and got[k] == pytest.approx(want[k], abs=1e-9) for k in want
    )


def _sums(client, uid: str) -> dict[str, dict[str, float]]:
    out = {}
    for kind in ("watches", "ratings"):
        stored = client.hgetall(redis_keys.user_log_sums(uid, kind))
        out[kind] = {k: float(v) for k, v in stored.items() if float(v)}
    return out


def test_the_sums_follow_the_log_as_the_cap_drops_its_oldest(client, redis_url, two_versions):
    mv, _ = two_versions
    uid = str(mv.users["user_id"][0])
    items = _unseen(mv, 0, 9)
    ratings = [4.0, None, 2.5, None, None, 5.0, 1.0, None, 3.5]
    for item, rating in zip(items, ratings, strict=True):
        _record(redis_url, mv, uid, [item], [rating], log_length=4)
        assert _sums_match(client, uid)
    assert [f["item"] for _, f in client.xrange(redis_keys.user_log(uid))] == items[5:]
    assert _sums(client, uid)["watches"]["n"] == 1 and _sums(client, uid)["ratings"]["n"] == 3


def test_sums_edited_or_lost_by_hand_are_rebuilt_from_the_log(client, redis_url, two_versions):
    mv, v2 = two_versions
    uid = str(mv.users["user_id"][0])
    items = _unseen(mv, 0, 4)
    _record(redis_url, mv, uid, items[:2], [4.0, None], log_length=10)
    client.hset(redis_keys.user_log_sums(uid, "ratings"), "sum", "lots")
    client.delete(redis_keys.user_log_sums(uid, "watches"))
    _record(redis_url, mv, uid, items[2:3], [2.0], log_length=10)
    assert _sums_match(client, uid)
    client.set(redis_keys.user_log_sums(uid, "watches"), "junk")  # another type
    client.hset(redis_keys.user_log_sums(uid, "ratings"), "n", 7)  # counts that do not add up
    report = publish(v2, client, quiet=True)
    assert report.interactions_replayed == 3
    np.testing.assert_allclose(
        _stored(client, mv, uid).flat(), _expected(mv, 0, items[:3], [4.0, None, 2.0]).flat()
    )
    # The log deleted by hand: the sums it leaves describe nothing.
    client.delete(redis_keys.user_log(uid))
    publish(_numbered_copy(v2, v2.parent / "more", 3), client, quiet=True)
    np.testing.assert_allclose(_stored(client, mv, uid).flat(), mv.user_aggregates[0])


def test_an_entry_with_a_count_in_a_sum_field_does_not_stop_the_publish(
    client, redis_url, two_versions
):
    """A hand-written entry whose 'sum' sat where counts go failed HINCRBY mid-script."""
    mv, v2 = two_versions
    uid = str(mv.users["user_id"][0])
    log_key = redis_keys.user_log(uid)
    client.xadd(log_key, {"item": "x", "r": "", "i": "1", "sum": "1"})
    items = _unseen(mv, 0, 2)
    _record(redis_url, mv, uid, items, [4.0, None], log_length=10)
    report = publish(v2, client, quiet=True)
    assert report.switched and client.get(redis_keys.CURRENT_VERSION) == "2"
    assert report.interactions_replayed == 2
    np.testing.assert_allclose(
        _stored(client, mv, uid).flat(), _expected(mv, 0, items, [4.0, None]).flat()
    )
    assert [f["item"] for _, f in client.xrange(log_key)] == items, "the stray entry is dropped"


def test_publish_cuts_the_logs_to_the_configured_length(client, redis_url, two_versions, tmp_path):
    mv, v2 = two_versions
    uid = str(mv.users["user_id"][0])
    items = _unseen(mv, 0, 6)
    ratings = [4.0, None, 2.0, 5.0, None, 3.0]
    _record(redis_url, mv, uid, items, ratings, log_length=100)
    report = publish(v2, client, quiet=True, log_length=2)  # the setting lowered since
    # The two kept, and the watch that left (no training data holds a watch).
    assert (report.interactions_replayed, report.full_logs) == (3, 1)
    assert [f["item"] for _, f in client.xrange(redis_keys.user_log(uid))] == items[4:]
    assert _sums_match(client, uid)
    np.testing.assert_allclose(
        _stored(client, mv, uid).flat(),
        _expected(mv, 0, [items[1], *items[4:]], [None, *ratings[4:]]).flat(),
    )
    # Turned off: the next publish frees the logs.
    publish(_numbered_copy(v2, tmp_path / "more", 3), client, quiet=True, log_length=0)
    assert not _log_keys_left(client, uid)


def test_full_logs_are_reported_only_for_hashes_publish_replaced(client, redis_url, two_versions):
    mv, _ = two_versions
    uid = str(mv.users["user_id"][0])
    _record(redis_url, mv, uid, _unseen(mv, 0, 3), [4.0] * 3, log_length=3)
    # Version 1 again: the hash it finds holds the online interactions, nothing is replaced.
    report = publish(mv.path, client, quiet=True, log_length=3)
    assert (report.users_replaced, report.full_logs, report.interactions_replayed) == (0, 0, 0)


def test_a_full_redis_refuses_a_record_without_an_event_id_whole(client, redis_url, two_versions):
    """A script that has written goes on past maxmemory: its first write must be refused."""
    from redis.exceptions import ResponseError

    mv, _ = two_versions
    uid = str(mv.users["user_id"][0])
    before = {k: client.dump(k) for k in client.keys(f"*{{{uid}}}*")}
    client.config_set("maxmemory", "1")
    try:
        with pytest.raises(ResponseError, match="OOM"):  # the service answers UNAVAILABLE
            _record(redis_url, mv, uid, _unseen(mv, 0, 1), [4.0], log_length=10)
    finally:
        client.config_set("maxmemory", "0")
    assert {k: client.dump(k) for k in client.keys(f"*{{{uid}}}*")} == before


def test_a_log_cut_by_fewer_than_it_keeps_takes_the_leavers_off_the_sums(
    client, redis_url, two_versions
):
    mv, _ = two_versions
    uid = str(mv.users["user_id"][0])
    items = _unseen(mv, 0, 6)
    ratings = [3.3, None, 4.7, 2.9, None, 3.1]  # sums that seldom come back to exactly 0
    _record(redis_url, mv, uid, items, ratings, log_length=100)
    flags, replayed, left = _seed(client, mv, 0, "2", 0, log_length=4)
    assert flags & 1
    assert (replayed, left) == (5, 4) and _sums_match(client, uid)
    np.testing.assert_allclose(
        _stored(client, mv, uid).flat(),
        _expected(mv, 0, items[1:], ratings[1:]).flat(),  # the rating that left is lost
    )
    # Watches push every rating out: no rating sums are left, not a residue of them.
    _record(redis_url, mv, uid, _unseen(mv, 0, 10)[6:], [None] * 4, log_length=4)
    assert not client.exists(redis_keys.user_log_sums(uid, "ratings"))
    assert _sums_match(client, uid)


def test_the_log_turned_off_goes_with_the_next_record(client, redis_url, two_versions):
    mv, _ = two_versions
    uid = str(mv.users["user_id"][0])
    items = _unseen(mv, 0, 3)
    _record(redis_url, mv, uid, items[:2], [4.0, None], log_length=10)
    _record(redis_url, mv, uid, items[2:], [5.0], log_length=0)
    assert not _log_keys_left(client, uid)


def test_a_full_redis_still_lets_publish_cut_the_logs(client, redis_url, two_versions):
    """The cut's first write must be one Redis allows past maxmemory (XTRIM, not HINCRBY)."""
    mv, _ = two_versions
    uid = str(mv.users["user_id"][0])
    items = _unseen(mv, 0, 8)
    _record(redis_url, mv, uid, items, [4.0, None] * 4, log_length=100)
    client.config_set("maxmemory", "1")
    try:
        flags, _, left = _seed(client, mv, 0, "1", 0, log_length=6)  # not newer: no replace
    finally:
        client.config_set("maxmemory", "0")
    assert not flags & 1 and left == 6
    assert _sums_match(client, uid)


def _retired(client, uid: str) -> dict[str, int]:
    return {k: int(v) for k, v in client.hgetall(redis_keys.user_retired_watches(uid)).items()}


def _watch_counts(mv: ModelVersion, items) -> dict[str, int]:
    """What ``items`` watched add to ``n`` and the ``gw:`` counts."""
    out = {"n": len(items)}
    for item in items:
        for g in mv.item_genre_names(mv.item_index[item]):
            out[f"gw:{g}"] = out.get(f"gw:{g}", 0) + 1
    return out


def test_watches_the_cap_pushes_out_still_count_at_every_publish(client, redis_url, two_versions):
    """An active user's oldest watches used to vanish from the aggregates at the next publish."""
    mv, v2 = two_versions
    uid = str(mv.users["user_id"][0])
    items = _unseen(mv, 0, 9)
    ratings = [None, 4.0, None, None, 2.0, None, None, 5.0, None]
    _record(redis_url, mv, uid, items, ratings, log_length=3)
    left_log = [i for i, r in zip(items[:6], ratings[:6], strict=True) if r is None]
    assert _retired(client, uid) == _watch_counts(mv, left_log)
    assert _sums_match(client, uid)

    report = publish(v2, client, quiet=True, log_length=3)
    # Every watch (4 that left, 2 in the log) and the ratings still in the log.
    assert report.interactions_replayed == 4 + 3
    watched = [(i, r) for i, r in zip(items, ratings, strict=True) if r is None or i in items[6:]]
    want = _expected(mv, 0, [i for i, _ in watched], [r for _, r in watched])
    np.testing.assert_allclose(_stored(client, mv, uid).flat(), want.flat())
    # Again with a later snapshot: still every watch, once.
    publish(_numbered_copy(v2, v2.parent / "later", 3), client, quiet=True, log_length=3)
    np.testing.assert_allclose(_stored(client, mv, uid).flat(), want.flat())


def test_a_log_cut_to_less_than_half_retires_its_watches_too(client, redis_url, two_versions):
    """More leave than stay: the sums are rebuilt, and the watches that left are the difference."""
    mv, _ = two_versions
    uid = str(mv.users["user_id"][0])
    items = _unseen(mv, 0, 8)
    ratings = [None, 3.0, None, None, 4.5, None, 2.0, None]
    _record(redis_url, mv, uid, items, ratings, log_length=100)
    flags, replayed, left = _seed(client, mv, 0, "2", 0, log_length=2)
    assert flags & 1 and left == 2 and _sums_match(client, uid)
    gone = [i for i, r in zip(items[:6], ratings[:6], strict=True) if r is None]
    assert _retired(client, uid) == _watch_counts(mv, gone)
    assert replayed == len(gone) + 2


@pytest.mark.parametrize("junk", ["type", "lots", "01", "-0", "name"])
def test_retired_watches_edited_by_hand_are_dropped_not_fatal(
    client, redis_url, two_versions, junk
):
    """Nothing holds what such a hash counted, and a record or publish must not fail half-way.

    A leading zero or -0 passed the check though HINCRBY refuses it.
    """
    mv, _ = two_versions
    uid = str(mv.users["user_id"][0])
    items = _unseen(mv, 0, 8)
    key = redis_keys.user_retired_watches(uid)

    def spoil():
        if junk == "type":
            client.delete(key)
            client.set(key, "junk")
        elif junk == "name":
            client.hset(key, "sum", "2.5")  # a watch has no rating sum
        else:
            client.hset(key, "n", junk)

    _record(redis_url, mv, uid, items[:4], [None] * 4, log_length=2)
    assert _retired(client, uid)["n"] == 2
    spoil()
    # A record at the cap neither fails nor writes half of itself; it checks
    # the fields it adds to, so a stray field stays until the next publish.
    _record(redis_url, mv, uid, items[4:5], [None], log_length=2)
    assert client.xlen(redis_keys.user_log(uid)) == 2 and _sums_match(client, uid)
    if junk != "name":
        assert _retired(client, uid) == _watch_counts(mv, items[2:3])
    _record(redis_url, mv, uid, items[5:8], [None] * 3, log_length=100)
    spoil()
    # Publish checks the hash whole and drops it, then retires what its cut takes.
    flags, replayed, left = _seed(client, mv, 0, "2", 0, log_length=3)
    assert flags & 1 and left == 3
    assert _retired(client, uid) == _watch_counts(mv, items[3:5])
    assert replayed == 3 + 2


def test_a_log_of_length_one_still_keeps_every_watch(client, redis_url, two_versions):
    """Each record cuts to 0 before adding its entry: that is no log turned off."""
    mv, v2 = two_versions
    uid = str(mv.users["user_id"][0])
    items = _unseen(mv, 0, 4)
    _record(redis_url, mv, uid, items, [None] * 4, log_length=1)
    assert _retired(client, uid) == _watch_counts(mv, items[:3])
    report = publish(v2, client, quiet=True, log_length=1)
    assert report.interactions_replayed == 4
    np.testing.assert_allclose(
        _stored(client, mv, uid).flat(), _expected(mv, 0, items, [None] * 4).flat()
    )


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("n", "100000000000000000", "is not a number"),
        ("sum", "1e300", "is not a number"),
        ("sum", "-2e15", "is not a number"),
        # At the bound itself: readable, but one more record would pass it.
        ("n", "1000000000000000", "would pass the bound readers keep to"),
        ("sum", "999999999999999", "would pass the bound readers keep to"),
    ],
)
def test_a_state_number_beyond_the_readers_bound_fails_the_record_whole(
    client, redis_url, two_versions, field, value, problem
):
    """Readers refuse numbers beyond MAX_STATE_NUMBER, so the record must not add to one."""
    mv, _ = two_versions
    uid = str(mv.users["user_id"][0])
    state = redis_keys.user_state(uid)
    client.hset(state, field, value)
    recent = client.lrange(redis_keys.user_recent(uid), 0, -1)
    with pytest.raises(CorruptUserState, match=f"field {field} {problem}"):
        _record(redis_url, mv, uid, _unseen(mv, 0, 1), [4.0], log_length=10)
    assert client.lrange(redis_keys.user_recent(uid), 0, -1) == recent
    assert client.hget(state, field) == value


def test_a_state_counter_redis_would_refuse_fails_the_record_whole(client, redis_url, two_versions):
    mv, _ = two_versions
    uid = str(mv.users["user_id"][0])
    state = redis_keys.user_state(uid)
    client.hset(state, "n", "0" + client.hget(state, "n"))
    recent = client.lrange(redis_keys.user_recent(uid), 0, -1)
    with pytest.raises(CorruptUserState, match="field n is not a number"):
        _record(redis_url, mv, uid, _unseen(mv, 0, 1), [None], log_length=10)
    assert client.lrange(redis_keys.user_recent(uid), 0, -1) == recent
    assert not _log_keys_left(client, uid)
