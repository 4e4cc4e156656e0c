"""The feedback loop through the CLI: record online, export, train, publish (real Redis)."""

from __future__ import annotations

import asyncio
import csv
import json

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from recsys import redis_keys
from recsys.artifacts import ModelVersion
from recsys.cli import main
from recsys.features import UserAggregates, decode_user_state
from recsys.user_store import record_interaction
from trainer.interactions import merge_interactions, user_of_log_key
from trainer.loaders import load_dataset

DATA = "synthetic:users=300,items=250,ratings=15000,seed=3"
TRAIN = ["--epochs", "1", "--hidden-units", "32,16", "--annoy-trees", "3", "--quiet", "--no-plots"]


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
    _record(redis_url, v1, "only-online", rated, 2.0)  # no side features to train with
    out = tmp_path / "export"
    capsys.readouterr()

    assert main(["export-interactions", str(out), "--redis-url", redis_url, "--quiet"]) == 0
    meta = json.loads((out / "export.json").read_text())
    with (out / "ratings.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["userId", "movieId", "rating", "timestamp"]
    assert sorted(rows[1:]) == sorted([[uid, rated, "4.5", rows[1][3]], ["only-online", rated,
                                       "2.0", rows[2][3]]])  # fmt: skip
    assert (meta["rows"], meta["users"], meta["watches_left_out"]) == (2, 2, 1)
    _record(redis_url, v1, uid, later, 1.0)  # after the export: not in it

    rc = main(["train", "--data", DATA, "--interactions", str(out), "--model-dir", str(models),
               *TRAIN])  # fmt: skip
    assert rc == 0
    v2 = ModelVersion.open(models / "2")
    merged = v2.manifest["dataset"]["interactions"]
    assert (merged["rows"], merged["unknown_users"], merged["cutoff_ms"]) == (
        1,
        1,
        meta["cutoff_ms"],
    )
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

    # evaluate reloads the data with the same export merged (its sha256 matches)...
    assert main(["evaluate", "--model-dir", str(models), "--version", "2", "--json"]) == 0
    # ...and says so when the export is gone.
    (out / "export.json").unlink()
    capsys.readouterr()
    assert main(["evaluate", "--model-dir", str(models), "--version", "2"]) == 2
    assert "export.json: no such file" in capsys.readouterr().err


def test_merged_ratings_always_train_and_leave_the_datasets_split_alone(tmp_path):
    data = load_dataset(DATA)
    out = tmp_path / "export"
    out.mkdir()
    (out / "export.json").write_text(json.dumps({"format": 1, "cutoff_ms": 5}))
    users, items = data.user_ids, data.item_ids
    lines = ["userId,movieId,rating,timestamp", f"{users[0]},{items[0]},3,10",
             f"{users[1]},{items[1]},4.5,11", f"nobody,{items[1]},4,12",
             f"{users[1]},no-such-item,4,13", f"{users[2]},{items[2]},99,14"]  # fmt: skip
    (out / "ratings.csv").write_text("\n".join(lines) + "\n")

    merged, info = merge_interactions(data, out)

    assert (info.rows, info.unknown_users, info.unknown_items, info.out_of_range) == (2, 1, 1, 1)
    assert merged.logged_rows == 2 and merged.n_ratings == data.n_ratings + 2
    train, test = merged.split(0.2, 0)
    base_train, base_test = data.split(0.2, 0)
    np.testing.assert_array_equal(test, base_test)
    logged = [data.n_ratings, data.n_ratings + 1]
    np.testing.assert_array_equal(train, np.concatenate([base_train, logged]))
    assert merged.rating[-1] == 4.5 and merged.timestamp[-1] == 11


@pytest.mark.parametrize(
    "meta, csv_text, message",
    [
        (None, "userId,movieId,rating,timestamp\n", "export.json: no such file"),
        ({"format": 2, "cutoff_ms": 5}, "userId,movieId,rating,timestamp\n", "not an export"),
        ({"format": 1}, "userId,movieId,rating,timestamp\n", "cutoff_ms"),
        ({"format": 1, "cutoff_ms": 5}, "user,item,rating,timestamp\n", "line 1: the header"),
        ({"format": 1, "cutoff_ms": 5}, "userId,movieId,rating,timestamp\n1,2,x,3\n", "line 2"),
        ({"format": 1, "cutoff_ms": 5}, "userId,movieId,rating,timestamp\n1,2\n", "2 fields"),
    ],
)
def test_a_bad_export_is_refused_naming_the_file(tmp_path, meta, csv_text, message):
    from trainer.dataset import DataError

    if meta is not None:
        (tmp_path / "export.json").write_text(json.dumps(meta))
    (tmp_path / "ratings.csv").write_text(csv_text)
    with pytest.raises(DataError, match=message):
        merge_interactions(load_dataset(DATA), tmp_path)


def test_an_export_cut_short_leaves_no_cutoff_to_train_with(redis_url, tmp_path, monkeypatch):
    """A cut-off export must not pair the last export's cutoff with newer ratings."""
    import trainer.interactions as interactions
    from trainer.dataset import DataError

    client = redis.Redis.from_url(redis_url)
    try:
        interactions.export_interactions(client, tmp_path, quiet=True)
        assert (tmp_path / "export.json").is_file()

        def dies(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(interactions, "_export_logs", dies)
        with pytest.raises(OSError):
            interactions.export_interactions(client, tmp_path, quiet=True)
    finally:
        client.close()
    with pytest.raises(DataError, match=r"export\.json: no such file"):
        merge_interactions(load_dataset(DATA), tmp_path)
