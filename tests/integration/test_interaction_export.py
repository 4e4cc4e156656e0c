"""The feedback loop through the CLI: record online, export, train, publish (real Redis)."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import time

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from recsys import redis_keys
from recsys.artifacts import ModelVersion
from recsys.cli import main
from recsys.errors import UserFacingError
from recsys.features import UserAggregates, decode_user_state
from recsys.user_store import record_interaction
from trainer.dataset import DataError
from trainer.interactions import (
    HEADER,
    complete_exports,
    export_interactions,
    merge_interactions,
    user_of_log_key,
)
from trainer.loaders import load_dataset

DATA = "synthetic:users=300,items=250,ratings=15000,seed=3"
TRAIN = ["--epochs", "1", "--hidden-units", "32,16", "--annoy-trees", "3", "--quiet", "--no-plots"]
H = ",".join(HEADER)  # an export's ratings.csv header


def _record(url: str, mv: ModelVersion, uid: str, item: str, rating: float | None) -> None:
    async def run():
        r = aioredis.Redis.from_url(url)
        try:
            await record_interaction(
                r, mv.spec, uid, item, mv.item_genre_names(mv.item_index[item]), rating,
                history_length=50, log_length=100,
            )  # fmt: skip
        finally:
            await r.aclose()

    asyncio.run(run())


def _add(agg: UserAggregates, mv: ModelVersion, item: str, rating: float | None) -> None:
    names = set(mv.item_genre_names(mv.item_index[item]))
    agg.add(np.array([g in names for g in mv.spec.genres]), rating)


@pytest.mark.parametrize("uid", ["7", "a}:b\\c", "}x", "u:log"])
def test_a_log_key_names_its_user_back(uid):
    assert user_of_log_key(redis_keys.user_log(uid)) == uid


@pytest.mark.parametrize(
    "key",
    ["recsys:user:{u}:event:a}:log", "recsys:user:{u}:recent", "other:{u}:log", "recsys:user:{u}"],
)
def test_a_key_that_only_looks_like_a_log_is_none(key):
    assert user_of_log_key(key) is None


def test_ratings_recorded_online_train_the_next_version_and_count_once(redis_url, tmp_path, capsys):
    models = tmp_path / "models"
    assert main(["train", "--data", DATA, "--model-dir", str(models), *TRAIN]) == 0
    assert main(["publish", "--model-dir", str(models), "--redis-url", redis_url]) == 0
    v1 = ModelVersion.open(models / "1")
    row = 5
    uid = str(v1.users["user_id"][row])
    seen = set(v1.users["watched"][row])
    rated, watched, later = [str(i) for i in v1.item_ids if i not in seen][:3]
    _record(redis_url, v1, uid, rated, 4.5)
    _record(redis_url, v1, uid, watched, None)
    # A user the data does not have: trained with unknown side features.
    _record(redis_url, v1, "only-online", rated, 2.0)
    out = tmp_path / "export"
    capsys.readouterr()

    assert main(["export-interactions", str(out), "--redis-url", redis_url, "--quiet"]) == 0
    (export,) = complete_exports(out)
    meta = json.loads((export / "export.json").read_text())
    assert export.name == str(meta["cutoff_ms"])
    with (export / "ratings.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["userId", "movieId", "rating", "timestamp", "logId"]
    # No event time was given: each row carries the second its entry was recorded.
    assert sorted(r[:3] for r in rows[1:]) == sorted([[uid, rated, "4.5"],
                                                      ["only-online", rated, "2.0"]])  # fmt: skip
    assert all(abs(int(r[3]) - time.time()) < 120 for r in rows[1:])
    assert all(int(r[4].split("-")[0]) // 1000 == int(r[3]) for r in rows[1:])
    assert (meta["rows"], meta["users"], meta["watches_left_out"], meta["malformed"]) == (
        2,
        2,
        1,
        0,
    )
    _record(redis_url, v1, uid, later, 1.0)  # after the export: not in it

    rc = main(["train", "--data", DATA, "--interactions", str(out), "--model-dir", str(models),
               *TRAIN])  # fmt: skip
    assert rc == 0
    v2 = ModelVersion.open(models / "2")
    merged = v2.manifest["dataset"]["interactions"]
    assert (merged["rows"], merged["new_users"], merged["cutoff_ms"]) == (
        2,
        1,
        meta["cutoff_ms"],
    )
    assert v2.logged_user_ids() == ["only-online"]
    new_row = v2.users["user_id"].index("only-online")
    assert new_row == len(v1.users["user_id"])  # after the dataset's own users
    assert [v2.users[f][new_row] for f in ("age", "gender", "occupation", "country")] == [
        None,
        None,
        None,
        "",
    ]
    only_online = UserAggregates.empty(v1.spec)
    _add(only_online, v1, rated, 2.0)
    np.testing.assert_allclose(v2.user_aggregates[new_row], only_online.flat())
    assert merged["directory"] == str(export.resolve())
    assert v2.log_cutoff_ms == meta["cutoff_ms"]
    # The dataset's own split is unchanged, so the batch values are v1's plus the export.
    want = UserAggregates.from_flat(v1.user_aggregates[row], len(v1.spec.genres))
    _add(want, v1, rated, 4.5)
    np.testing.assert_allclose(v2.user_aggregates[row], want.flat())

    assert main(["publish", "--model-dir", str(models), "--redis-url", redis_url]) == 0
    assert "2 online interactions replayed" in capsys.readouterr().out
    client = redis.Redis.from_url(redis_url)
    try:
        decoded = decode_user_state(v2.spec, client.hgetall(redis_keys.user_state(uid)))
    finally:
        client.close()
    assert decoded is not None
    # The exported rating once (from training), the watch and the later rating replayed.
    _add(want, v1, watched, None)
    _add(want, v1, later, 1.0)
    np.testing.assert_allclose(decoded[1].flat(), want.flat())
    # The new user is seeded like any other: the rating it trained on counts once.
    client = redis.Redis.from_url(redis_url)
    try:
        stored = decode_user_state(v2.spec, client.hgetall(redis_keys.user_state("only-online")))
    finally:
        client.close()
    assert stored is not None and stored[0].country is None
    np.testing.assert_allclose(stored[1].flat(), only_online.flat())

    # evaluate rebuilds the training data from the version, which keeps the merged ratings.
    shutil.rmtree(out)
    assert main(["evaluate", "--model-dir", str(models), "--version", "2", "--json"]) == 0


def _write_export(out, *rows: str) -> None:
    """An export of ``rows`` (userId,movieId,rating,timestamp,logId) in directory ``out``."""
    out.mkdir()
    (out / "export.json").write_text(json.dumps({"format": 2, "cutoff_ms": 5}))
    (out / "ratings.csv").write_text("\n".join([",".join(HEADER), *rows]) + "\n")


def test_merged_ratings_train_and_leave_the_datasets_split_alone(tmp_path):
    data = load_dataset(DATA)
    out = tmp_path / "export"
    users, items = data.user_ids, data.item_ids
    _write_export(out, f"{users[0]},{items[0]},3,10,1-0", f"{users[1]},{items[1]},4.5,11,2-0",
                  f"nobody,{items[1]},4,12,3-0", f"{users[1]},no-such-item,4,13,4-0",
                  f"{users[2]},{items[2]},99,14,5-0")  # fmt: skip

    merged, info = merge_interactions(data, out)

    assert (info.rows, info.new_users, info.unknown_items, info.out_of_range) == (3, 1, 1, 1)
    assert merged.logged_rows == 3 and merged.n_ratings == data.n_ratings + 3
    # "nobody" joins after the dataset's users, without side features.
    assert merged.user_ids == [*users, "nobody"] and merged.logged_user_ids() == ["nobody"]
    assert merged.rating_user[-1] == data.n_users and merged.user_country[-1] == ""
    assert np.isnan(merged.user_age[-1]) and merged.user_gender[-1] is None
    train, test = merged.split(0.2, 0)
    base_train, base_test = data.split(0.2, 0)
    np.testing.assert_array_equal(test, base_test)
    logged = [data.n_ratings, data.n_ratings + 1, data.n_ratings + 2]
    np.testing.assert_array_equal(train, np.concatenate([base_train, logged]))
    assert merged.rating[-2] == 4.5 and merged.timestamp[-2] == 11
    # The dataset's hash is of its own rows (they alone decide the split).
    assert merged.sha256() == data.sha256() and info.sha256 == merged.logged_sha256()
    assert info.sha256 != data.logged_sha256()


def test_a_logged_rating_of_a_held_out_pair_trains_on_neither_side(tmp_path, capsys):
    """Trained on, the pair's held-out rating would score the model on a rating it learnt."""
    data = load_dataset(DATA)
    base_train, base_test = data.split(0.2, 0)
    held = int(base_test[0])
    u, i = int(data.rating_user[held]), int(data.rating_item[held])
    rated = set(data.rating_item[data.rating_user == u].tolist())
    unrated = next(j for j in range(data.n_items) if j not in rated)
    uid, items = data.user_ids[u], data.item_ids
    out = tmp_path / "export"
    _write_export(out, f"{uid},{items[i]},1,10,1-0", f"{uid},{items[unrated]},2,11,2-0")

    merged, _ = merge_interactions(data, out)
    train, test = merged.split(0.2, 0)

    np.testing.assert_array_equal(test, base_test)
    np.testing.assert_array_equal(train, np.concatenate([base_train, [data.n_ratings + 1]]))
    models = tmp_path / "models"
    capsys.readouterr()
    argv = ["train", "--data", DATA, "--interactions", str(out), "--model-dir", str(models)]
    assert main([*argv, *(a for a in TRAIN if a != "--quiet")]) == 0
    info = ModelVersion.open(models / "1").manifest["dataset"]
    assert (info["interactions"]["rows"], info["interactions"]["held_out_pairs"]) == (2, 1)
    assert info["split"]["n_train"] == len(base_train) + 1
    assert "1 of those not trained on" in capsys.readouterr().err


@pytest.mark.parametrize(
    "meta, csv_text, message",
    [
        (None, f"{H}\n", "export.json: no such file"),
        ({"format": 3, "cutoff_ms": 5}, f"{H}\n", "not an export"),
        ({"format": 2}, f"{H}\n", "cutoff_ms"),
        # Before rows carried their log id: export again rather than lose what left the logs.
        ({"format": 1, "cutoff_ms": 5}, f"{H}\n", "an export of format 1"),
        ({"format": 2, "cutoff_ms": 5}, "userId,movieId,rating,timestamp\n", "line 1: the header"),
        ({"format": 2, "cutoff_ms": 5}, f"{H}\n1,2,x,3,1-0\n", "line 2"),
        ({"format": 2, "cutoff_ms": 5}, f"{H}\n1,2\n", "2 fields, not 5"),
    ],
)
def test_a_bad_export_is_refused_naming_the_file(tmp_path, meta, csv_text, message):
    if meta is not None:
        (tmp_path / "export.json").write_text(json.dumps(meta))
    (tmp_path / "ratings.csv").write_text(csv_text)
    with pytest.raises(DataError, match=message):
        merge_interactions(load_dataset(DATA), tmp_path)


def test_an_export_cut_short_leaves_the_last_one_whole(redis_url, tmp_path, monkeypatch):
    """A cut-off export leaves nothing behind: training takes the last whole one."""
    import trainer.interactions as interactions

    client = redis.Redis.from_url(redis_url)
    try:
        first = interactions.export_interactions(client, tmp_path, quiet=True)

        def dies(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(interactions, "_export_logs", dies)
        time.sleep(0.01)
        with pytest.raises(OSError):
            interactions.export_interactions(client, tmp_path, quiet=True)
    finally:
        client.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", first.directory.name]
    _, info = merge_interactions(load_dataset(DATA), tmp_path)
    assert info.cutoff_ms == first.cutoff_ms


class _ScanTwice(redis.Redis):
    """A client whose SCAN returns every key a second time, in later steps.

    Redis does that when the keyspace shrinks during a scan (SCAN promises
    every key at least once), which a test cannot time: this replays the
    keys the real SCAN returned.
    """

    def scan_iter(self, *args, **kwargs):
        keys = list(super().scan_iter(*args, **kwargs))
        yield from keys
        yield from keys


def test_a_log_the_scan_returns_twice_is_exported_once(redis_url, tmp_path):
    data = load_dataset(DATA)
    client = _ScanTwice.from_url(redis_url)
    try:
        for uid in data.user_ids[:3]:
            client.xadd(
                redis_keys.user_log(uid), {"item": data.item_ids[0], "ts": "0", "r": "4", "i": "0"}
            )
        time.sleep(0.01)  # an entry of the cutoff's own millisecond is left to publish
        report = export_interactions(client, tmp_path, scan_count=2, quiet=True)
    finally:
        client.close()
    assert (report.users, report.rows) == (3, 3)
    _, info = merge_interactions(data, tmp_path)
    assert info.rows == 3


def test_a_rating_once_exported_stays_in_every_later_export(redis_url, tmp_path, capsys):
    """The logs are capped: a rating newer interactions push out of its log still trains."""
    data = load_dataset(DATA)
    uid, items = data.user_ids[0], data.item_ids
    client = redis.Redis.from_url(redis_url)

    def log(*entries: tuple[str, str]) -> None:  # as RecordInteraction does with log_length 3
        for item, rating in entries:
            fields = {"item": item, "ts": "0", "r": rating, "i": "0"}
            client.xadd(redis_keys.user_log(uid), fields, maxlen=3, approximate=False)

    def export():
        time.sleep(0.01)  # an entry of the cutoff's own millisecond is left to publish
        report = export_interactions(client, tmp_path)
        return report, merge_interactions(data, tmp_path)[1]

    try:
        log((items[0], "5"))
        first, _ = export()
        log((items[1], "4"), (items[2], ""))  # the first rating is still in the log
        second, merged = export()
        assert merged.rows == 2
        log(*[(items[3 + n], "") for n in range(3)])  # three watches push both ratings out
        third, merged = export()
    finally:
        client.close()
    assert merged.rows == 2
    got = [(r.previous, r.carried, r.new) for r in (first, second, third)]
    assert got == [(None, 0, 1), (first.directory, 1, 1), (second.directory, 2, 0)]
    # Carried rows come from the export, so each export begins with the one before.
    text = [(r.directory / "ratings.csv").read_text() for r in (first, second, third)]
    assert text[1].startswith(text[0]) and text[2] == text[1]
    meta = json.loads((third.directory / "export.json").read_text())
    assert (meta["rows"], meta["previous"], meta["carried"], meta["new"]) == (
        2,
        second.directory.name,
        2,
        0,
    )
    assert f"2 ratings (2 carried from export {second.directory.name}; 0 new" in (
        capsys.readouterr().err
    )


def test_an_export_after_one_of_the_old_format_starts_over(redis_url, tmp_path, capsys):
    """Old rows lack log ids, so which of them the logs still hold is unknown: none is carried."""
    old = tmp_path / "5"
    old.mkdir()
    (old / "export.json").write_text(json.dumps({"format": 1, "cutoff_ms": 5}))
    (old / "ratings.csv").write_text("userId,movieId,rating,timestamp\nu,i,4,1\n")
    data = load_dataset(DATA)
    client = redis.Redis.from_url(redis_url)
    try:
        client.xadd(redis_keys.user_log(data.user_ids[0]),
                    {"item": data.item_ids[0], "ts": "0", "r": "4", "i": "0"})  # fmt: skip
        time.sleep(0.01)
        report = export_interactions(client, tmp_path)
        assert (report.started_over, report.previous, report.rows) == (old, None, 1)
        assert "export 5 is of format 1, without log ids" in capsys.readouterr().err
        # A broken previous export is refused: starting over would lose what left the logs.
        (report.directory / "ratings.csv").write_text("userId,movieId\n")
        time.sleep(0.01)
        with pytest.raises(DataError, match=r"ratings\.csv: line 1: the header"):
            export_interactions(client, tmp_path, quiet=True)
    finally:
        client.close()
    assert len(complete_exports(tmp_path)) == 2


def test_nightly_versions_stay_comparable_and_evaluate_without_their_export(redis_url, tmp_path):
    from trainer.compare import compare_versions
    from trainer.evaluate import evaluate_version

    models, out = tmp_path / "models", tmp_path / "models" / "interactions"
    assert main(["train", "--data", DATA, "--model-dir", str(models), *TRAIN]) == 0
    v1 = ModelVersion.open(models / "1")
    for night in range(2):  # two nights, the CronJob's steps, more ratings each day
        for row in range(0, 300, 10):
            unseen = [i for i in v1.item_ids if i not in set(v1.users["watched"][row])]
            for item in unseen[night * 5 : night * 5 + 5]:
                _record(redis_url, v1, str(v1.users["user_id"][row]), item, 5.0)
        time.sleep(0.01)
        assert main(["export-interactions", str(out), "--redis-url", redis_url, "--quiet"]) == 0
        assert main(["train", "--data", DATA, "--interactions", str(out),
                     "--model-dir", str(models), *TRAIN]) == 0  # fmt: skip
    shutil.rmtree(out)  # the versions keep the ratings they trained on
    infos = [ModelVersion.open(models / v).manifest["dataset"] for v in "123"]
    # One dataset, one split: the merged ratings have their own hash.
    assert len({info["sha256"] for info in infos}) == 1 and "interactions" not in infos[0]
    assert [info["interactions"]["rows"] for info in infos[1:]] == [150, 300]
    assert infos[1]["interactions"]["sha256"] != infos[2]["interactions"]["sha256"]
    assert (models / "2" / "logged").is_dir() and not (models / "1" / "logged").exists()

    alone = {v: evaluate_version(models / v) for v in "123"}
    for a, b in (("2", "3"), ("1", "3")):
        m = compare_versions(models / a, models / b)["metrics"]
        # Each version is scored as it is alone: its own training data's features.
        for side, v in (("base", a), ("other", b)):
            assert m["rmse"][side] == pytest.approx(alone[v]["model"]["rmse"], abs=1e-9)
            for name in ("recall@10", "ndcg@10"):
                assert m[name][side] == pytest.approx(alone[v]["top10"]["model"][name])

    # A version trained on an export before versions kept its ratings says so.
    manifest = json.loads((models / "2" / "manifest.json").read_text())
    del manifest["dataset"]["interactions"]["sha256"]
    (models / "2" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserFacingError, match="train it again"):
        evaluate_version(models / "2")


def test_a_training_run_reads_one_export_whatever_another_writes(redis_url, tmp_path, monkeypatch):
    """An export landing while a merge reads must not pair one's cutoff with another's ratings."""
    import pathlib

    data = load_dataset(DATA)
    uid, item = data.user_ids[0], data.item_ids[0]
    client = redis.Redis.from_url(redis_url)
    try:
        first = export_interactions(client, tmp_path, quiet=True)  # no ratings yet
        client.xadd(redis_keys.user_log(uid), {"item": item, "ts": "0", "r": "4.0", "i": "0"})
        time.sleep(0.01)
        real_open = pathlib.Path.open

        def racing_open(self, *args, **kwargs):
            if self.name == "ratings.csv" and not racing_open.done:
                racing_open.done = True  # a second export (a manual Job) lands meanwhile
                export_interactions(client, tmp_path, quiet=True)
            return real_open(self, *args, **kwargs)

        racing_open.done = False
        monkeypatch.setattr(pathlib.Path, "open", racing_open)
        _, info = merge_interactions(data, tmp_path)
        monkeypatch.undo()
        _, after = merge_interactions(data, tmp_path)
    finally:
        client.close()
    # The rating is newer than the first export's cutoff: publish replays it, so
    # only the second export may hold it.
    assert (info.cutoff_ms, info.rows) == (first.cutoff_ms, 0)
    assert after.cutoff_ms > first.cutoff_ms and after.rows == 1


def test_the_newest_exports_are_kept_and_killed_ones_cleared(redis_url, tmp_path, capsys):
    from recsys.artifacts import STALE_TEMP_S

    killed, running = tmp_path / ".tmp-killed", tmp_path / ".tmp-running"
    killed.mkdir()
    running.mkdir()
    old = time.time() - STALE_TEMP_S - 60
    os.utime(killed, (old, old))
    client = redis.Redis.from_url(redis_url)
    try:
        cutoffs = []
        for _ in range(4):
            cutoffs.append(export_interactions(client, tmp_path, keep=3, quiet=True).cutoff_ms)
            time.sleep(0.002)  # one export a millisecond
    finally:
        client.close()
    kept = complete_exports(tmp_path)
    assert [int(p.name) for p in kept] == cutoffs[1:]
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {p.name for p in kept} | {running.name, ".lock"}
    # --interactions takes the newest export in the directory, or the one it names.
    data = load_dataset(DATA)
    assert merge_interactions(data, tmp_path)[1].cutoff_ms == cutoffs[-1]
    assert merge_interactions(data, kept[0])[1].cutoff_ms == cutoffs[1]
    capsys.readouterr()
    argv = ["export-interactions", str(tmp_path), "--keep", "0", "--redis-url", redis_url]
    assert main(argv) == 2
    assert "--keep must be 1 or more" in capsys.readouterr().err


def test_a_malformed_log_entry_is_skipped_and_counted(redis_url, tmp_path, capsys):
    data = load_dataset(DATA)
    uid, item = data.user_ids[0], data.item_ids[0]
    client = redis.Redis.from_url(redis_url)
    try:
        for fields in (
            {"item": item, "ts": "0", "r": "x", "i": "0"},  # not a number
            {"item": item, "ts": "0", "r": "inf", "i": "0"},  # not finite
            {"ts": "0", "r": "4.0", "i": "0"},  # no item
            {"item": item, "ts": "0", "r": "4.0", "i": "0"},
        ):
            client.xadd(redis_keys.user_log(uid), fields)
        time.sleep(0.01)
        report = export_interactions(client, tmp_path)
    finally:
        client.close()
    _, info = merge_interactions(data, tmp_path)  # one bad entry used to fail every training
    assert info.rows == report.rows == 1
    assert report.malformed == 3
    assert json.loads((report.directory / "export.json").read_text())["malformed"] == 3
    assert "3 malformed entries skipped" in capsys.readouterr().err


def test_overlapping_exports_run_one_after_the_other(redis_url, tmp_path, monkeypatch):
    """A 'train now' Job beside the nightly one: the later export must carry the earlier.

    Unserialised, export A read a rating, the rating then left its capped log,
    export B read the logs without it and, landing as the newest, became what
    every later export carried: the rating was lost for good.
    """
    import threading

    import trainer.interactions as interactions

    data = load_dataset(DATA)
    uid, items = data.user_ids[0], data.item_ids
    client = redis.Redis.from_url(redis_url)

    def log(item: str) -> None:
        fields = {"item": item, "ts": "0", "r": "4", "i": "0"}
        client.xadd(redis_keys.user_log(uid), fields, maxlen=1, approximate=False)
        time.sleep(0.005)  # the next entry, or an export's cutoff, in a later millisecond

    a_read, go_on = threading.Event(), threading.Event()
    real = interactions._read_logs

    def hold_a(*args, **kwargs):
        real(*args, **kwargs)
        if threading.current_thread().name == "A":  # A has read the logs; it lands later
            a_read.set()
            go_on.wait(10)

    monkeypatch.setattr(interactions, "_read_logs", hold_a)
    reports = {}

    def export(name: str) -> None:
        reports[name] = export_interactions(redis.Redis.from_url(redis_url), tmp_path, quiet=True)

    try:
        log(items[0])
        a = threading.Thread(name="A", target=export, args=("A",))
        a.start()
        assert a_read.wait(10)
        log(items[1])  # the first rating leaves its log (cap 1)
        b = threading.Thread(name="B", target=export, args=("B",))
        b.start()
        b.join(0.5)
        assert b.is_alive(), "B waits for A"
        go_on.set()
        a.join(10)
        b.join(10)
    finally:
        go_on.set()
        client.close()
    assert reports["B"].previous == reports["A"].directory
    newest = complete_exports(tmp_path)[-1]
    with (newest / "ratings.csv").open(newline="") as fh:
        assert [r[1] for r in list(csv.reader(fh))[1:]] == [items[0], items[1]]


def test_an_export_whose_ratings_file_is_missing_is_refused_not_retried(redis_url, tmp_path):
    """It spun at full CPU, taking the missing file for an export pruned meanwhile."""
    client = redis.Redis.from_url(redis_url)
    try:
        first = export_interactions(client, tmp_path, quiet=True)
        (first.directory / "ratings.csv").unlink()  # a partial restore, a copy cut short
        time.sleep(0.005)
        with pytest.raises(DataError, match=r"ratings\.csv: no such file"):
            export_interactions(client, tmp_path, quiet=True)
    finally:
        client.close()


def test_a_version_whose_kept_users_are_gone_is_refused_by_name(tmp_path):
    """Without the users only the logs knew, the kept ratings point past the dataset's users."""
    from trainer.interactions import version_training_data

    data = load_dataset(DATA)
    out = tmp_path / "export"
    _write_export(out, f"newcomer,{data.item_ids[0]},4,10,1-0")
    models = tmp_path / "models"
    argv = ["train", "--data", DATA, "--interactions", str(out), "--model-dir", str(models)]
    assert main([*argv, *TRAIN]) == 0
    mv = ModelVersion.open(models / "1")
    assert version_training_data(mv, data).logged_user_ids() == ["newcomer"]
    mv.manifest["files"].pop("logged/user_ids.json")
    with pytest.raises(UserFacingError, match="do not fit its dataset"):
        version_training_data(mv, data)


@pytest.fixture(scope="module")
def with_and_without_new_users(tmp_path_factory):
    """Version 1 trained on the data alone, version 2 with one user only the logs know."""
    tmp = tmp_path_factory.mktemp("new-users")
    data = load_dataset(DATA)
    models = tmp / "models"
    assert main(["train", "--data", DATA, "--model-dir", str(models), *TRAIN]) == 0
    out = tmp / "export"
    items = data.item_ids
    _write_export(out, f"newcomer,{items[0]},4,10,1-0", f"newcomer,{items[1]},5,11,1-1")
    argv = ["train", "--data", DATA, "--interactions", str(out), "--model-dir", str(models)]
    assert main([*argv, *TRAIN]) == 0
    return models


@pytest.mark.parametrize("base, other", [("1", "2"), ("2", "1")])
def test_versions_with_and_without_new_users_compare(with_and_without_new_users, base, other):
    """Per-user arrays were sized by each version's users: 301 against 300 failed the matmul."""
    from trainer.compare import compare_versions

    models = with_and_without_new_users
    metrics = compare_versions(models / base, models / other)["metrics"]
    assert np.isfinite(metrics["rmse"]["base"]) and np.isfinite(metrics["rmse"]["other"])
    args = ["evaluate", "--model-dir", str(models), "--version", base, "--compare", other]
    assert main([*args, "--json"]) == 0


def test_new_users_leave_the_input_scaling_of_the_dataset_alone(with_and_without_new_users):
    """Every user of the data has an age: age_missing stays a column the tower ignores.

    With one new user (no age) in the scaling, the column's tiny variance
    scaled that user's 1 (and every cold-start request's) to an extreme.
    """
    import tensorflow as tf

    mv = ModelVersion.open(with_and_without_new_users / "2")
    col = mv.spec.user_feature_names.index("age_missing")
    rows = np.asarray(mv.user_features[:50], np.float32)
    assert not rows[:, col].any()
    flipped = rows.copy()
    flipped[:, col] = 1.0
    serve = mv.load_tower().signatures["serving_default"]
    a, b = (serve(features=tf.constant(x))["embedding"].numpy() for x in (rows, flipped))
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_new_user_whose_id_the_services_refuse_is_left_out(tmp_path, monkeypatch, capsys):
    """One such id in a cumulative export used to fail every later training."""
    data = load_dataset(DATA)
    out = tmp_path / "export"
    long_id = "u" * 100
    items = data.item_ids
    _write_export(out, f"{long_id},{items[0]},4,10,1-0", f"{long_id},{items[1]},3,11,1-1",
                  f"fine,{items[2]},5,12,2-0")  # fmt: skip
    monkeypatch.setenv("RECSYS_RANKING__MAX_ID_BYTES", "64")
    models = tmp_path / "models"
    argv = ["train", "--data", DATA, "--interactions", str(out), "--model-dir", str(models)]
    capsys.readouterr()
    assert main([*argv, *(a for a in TRAIN if a != "--quiet")]) == 0
    mv = ModelVersion.open(models / "1")
    merged = mv.manifest["dataset"]["interactions"]
    assert (merged["rows"], merged["new_users"], merged["refused_ids"]) == (1, 1, 2)
    assert mv.logged_user_ids() == ["fine"]
    assert "2 of new users whose id the services refuse" in capsys.readouterr().err


@pytest.mark.parametrize("new_users", [False, True])
def test_the_scaling_sample_with_negatives(monkeypatch, new_users):
    """Without new users it is every fit row, negatives included, as before they existed."""
    import trainer.model as model_module
    from trainer.prepare import prepare
    from trainer.train import TrainConfig, fit

    data = load_dataset("synthetic:users=80,items=60,ratings=2000,seed=0")
    if new_users:
        data = data.with_logged(
            ["newcomer"], rating_user=[data.n_users] * 2, rating_item=[0, 1],
            rating=[4.0, 2.0], timestamp=[1, 2],
        )  # fmt: skip
    train_rows, test_rows = data.split(0.2, 0)
    seen = {}
    real = model_module.build_two_tower

    def spy(spec, **kw):
        seen["user"], seen["item"] = kw["user_sample"], kw["item_sample"]
        return real(spec, **kw)

    monkeypatch.setattr(model_module, "build_two_tower", spy)
    cfg = TrainConfig(objective="binary", negatives=3, epochs=1, hidden_units=(16,), patience=0)
    fit(prepare(data, train_rows, test_rows), cfg, quiet=True)
    n_fit = len(train_rows)  # no validation split with patience 0
    assert len(seen["item"]) > n_fit  # the negatives are there
    # With new users: the positives of the dataset's own users only.
    assert len(seen["user"]) == (n_fit - 2 if new_users else len(seen["item"]))
