"""``recsys train`` / ``recsys evaluate`` / ``recsys publish`` through the real CLI entry point."""

from __future__ import annotations

import json

import pytest
import redis

from recsys import redis_keys
from recsys.artifacts import ModelVersion, list_versions
from recsys.cli import main

DATA = "synthetic:users=300,items=250,ratings=15000,seed=3"


@pytest.fixture(scope="module")
def cli_model_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("cli_models")
    rc = main(
        ["train", "--data", DATA, "--model-dir", str(model_dir), "--epochs", "2",
         "--hidden-units", "32,16", "--annoy-trees", "3", "--quiet", "--no-plots"]
    )  # fmt: skip
    assert rc == 0
    return model_dir


def test_train_writes_a_version_and_prints_the_report(cli_model_dir, capsys):
    assert list_versions(cli_model_dir) == ["1"]
    mv = ModelVersion.open(cli_model_dir / "1")
    assert mv.manifest["dataset"]["spec"] == DATA
    assert mv.manifest["model"]["hidden_units"] == [32, 16]
    assert not (cli_model_dir / "1" / "retrieval_curve.png").exists()


def test_evaluate_reproduces_the_training_report(cli_model_dir, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--model-dir", str(cli_model_dir), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    stored = ModelVersion.open(cli_model_dir / "1").manifest["metrics"]
    # SavedModel + exported vectors give the same figures as the in-memory model did.
    assert again["model"]["rmse"] == pytest.approx(stored["model"]["rmse"], abs=1e-5)
    for name, v in stored["top10"].items():
        assert again["top10"][name]["recall@10"] == pytest.approx(v["recall@10"], abs=1e-6)
    assert again["version"] == "1"


def test_evaluate_refuses_other_data(cli_model_dir, capsys):
    rc = main(["evaluate", "--model-dir", str(cli_model_dir), "--data", "synthetic:users=300,"
               "items=250,ratings=15000,seed=4"])  # fmt: skip
    assert rc == 2
    assert "not the data version 1 was trained on" in capsys.readouterr().err


def test_bad_flags_are_clear_errors(tmp_path, capsys):
    rc = main(["train", "--data", DATA, "--model-dir", str(tmp_path), "--hidden-units", "64,x"])
    assert rc == 2
    assert "--hidden-units" in capsys.readouterr().err
    rc = main(["train", "--data", DATA, "--model-dir", str(tmp_path), "--negatives", "4"])
    assert rc == 2
    assert "--negatives 4 needs --objective binary" in capsys.readouterr().err
    rc = main(["train", "--data", DATA, "--model-dir", str(tmp_path), "--dropout", "1.5"])
    assert rc == 2
    assert "--dropout: Input should be less than 1" in capsys.readouterr().err
    rc = main(["evaluate", "--model-dir", str(tmp_path / "empty")])
    assert rc == 2
    assert "no complete model version" in capsys.readouterr().err


def test_publish_cli_makes_latest_current(cli_model_dir, redis_url, capsys):
    assert main(["publish", "--model-dir", str(cli_model_dir), "--redis-url", redis_url]) == 0
    assert "published version 1" in capsys.readouterr().out
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert client.get(redis_keys.CURRENT_VERSION) == "1"
    finally:
        client.close()


def test_publish_takes_a_version_name_from_the_model_dir(
    cli_model_dir, redis_url, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # no ./1 here: `1` is the model dir's version 1
    argv = ["publish", "1", "--model-dir", str(cli_model_dir), "--redis-url", redis_url]
    assert main(argv) == 0, capsys.readouterr().err
    assert "published version 1" in capsys.readouterr().out


def test_train_publish_keeps_the_versions_the_config_pins(
    cli_model_dir, redis_url, tmp_path, monkeypatch, capsys
):
    """``train --publish`` keeps a pinned version's lists, as ``recsys publish`` does."""
    import shutil

    model_dir = tmp_path / "models"
    for n in ("1", "2"):
        shutil.copytree(cli_model_dir / "1", model_dir / n)
        manifest = json.loads((model_dir / n / "manifest.json").read_text())
        manifest["version"] = n
        (model_dir / n / "manifest.json").write_text(json.dumps(manifest))
        main(["publish", str(model_dir / n), "--model-dir", str(model_dir),
              "--redis-url", redis_url])  # fmt: skip
    monkeypatch.setenv("RECSYS_RANKING__PINNED_VERSION", "1")  # a rollback pin
    rc = main(
        ["train", "--data", DATA, "--model-dir", str(model_dir), "--epochs", "1",
         "--hidden-units", "16,8", "--annoy-trees", "2", "--quiet", "--no-plots",
         "--publish", "--redis-url", redis_url]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "published version 3" in capsys.readouterr().out
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        # keep=2 alone would leave "2" and "3"; the pin keeps "1" and its lists.
        assert client.zrange(redis_keys.VERSIONS, 0, -1) == ["1", "2", "3"]
        assert client.exists(redis_keys.top_popular("1"))
    finally:
        client.close()


def test_evaluate_finds_data_given_by_a_relative_path_from_elsewhere(tmp_path, monkeypatch, capsys):
    """The manifest keeps the resolved directory, so evaluate works from any directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["generate-data", "data", "--users", "120", "--items", "90",
                 "--ratings", "3000"]) == 0  # fmt: skip
    models = tmp_path / "models"
    assert main(["train", "--data", "csv:data", "--model-dir", str(models), "--epochs", "1",
                 "--hidden-units", "16,8", "--annoy-trees", "2", "--quiet",
                 "--no-plots"]) == 0  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    rc = main(["evaluate", "--model-dir", str(models), "--json"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["model"]["rmse"] > 0


def test_publish_if_unpublished_finishes_a_failed_first_run_only(cli_model_dir, redis_url, capsys):
    """The bootstrap's retry: publish the version on disk unless Redis already names one."""
    args = ["publish", "--if-unpublished", "--model-dir", str(cli_model_dir),
            "--redis-url", redis_url]  # fmt: skip
    assert main(args) == 0
    assert "published version 1" in capsys.readouterr().out
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert client.get(redis_keys.CURRENT_VERSION) == "1"
        assert main(args) == 0  # the bootstrap's retry after a published first run
        assert "already serves version 1; nothing published" in capsys.readouterr().out
        # A model store recreated while Redis kept its data: the pointer names a
        # version the store does not hold, and the services would serve the
        # store's newest without its top lists. The store's version goes over it.
        client.set(redis_keys.CURRENT_VERSION, "7")
        uid = str(ModelVersion.open(cli_model_dir / "1").users["user_id"][0])
        client.hset(redis_keys.user_state(uid), "pv", "7")  # the old store's users
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "names version 7, which" in out and "published version 1" in out
        assert client.hget(redis_keys.user_state(uid), "pv") == "1", "users start over too"
        assert client.get(redis_keys.CURRENT_VERSION) == "1"
    finally:
        client.close()


def test_a_diverged_training_exports_nothing(tmp_path, capsys):
    """Non-finite vectors: every reader refuses the version, so it must not become the newest."""
    tiny = "synthetic:users=60,items=50,ratings=1500,seed=1"
    argv = ["train", "--data", tiny, "--model-dir", str(tmp_path), "--epochs", "1", "--quiet"]
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert main([*argv, "--learning-rate", "1e30", "--no-plots"]) == 2
    assert "training diverged" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the trainer's own handler is gone
    assert [p.name for p in tmp_path.iterdir()] == []  # no version, no temporary left


def test_a_killed_writers_temporary_directory_is_removed_by_the_next(tmp_path):
    import os
    import time

    from recsys.artifacts import STALE_TEMP_S, VersionWriter

    stale, fresh = tmp_path / ".tmp-killed", tmp_path / ".tmp-running"
    for d in (stale, fresh):
        d.mkdir()
        (d / "item_vectors.npy").write_bytes(b"x" * 10)
    old = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    with VersionWriter(tmp_path):
        assert not stale.exists() and fresh.exists()


def test_evaluate_takes_a_version_number_from_the_model_dir_not_the_working_one(
    cli_model_dir, tmp_path, monkeypatch, capsys
):
    (tmp_path / "1").mkdir()  # a directory named like the version, where evaluate runs
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--model-dir", str(cli_model_dir), "--json"]) == 0


def test_train_refuses_a_seed_numpy_cannot_take(tmp_path, capsys):
    assert main(["train", "--data", DATA, "--model-dir", str(tmp_path), "--seed", "-1"]) == 2
    assert "--seed: Input should be greater than or equal to 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--embedding-dim", "1"], "--embedding-dim: Input should be greater than or equal to 2"),
        (["--objective", "binary", "--negatives", "200"], "--negatives: Input should be less"),
        (["--learning-rate", "nan"], "--learning-rate: Input should be a finite number"),
        (["--learning-rate", "inf"], "--learning-rate: Input should be a finite number"),
        (["--lr-plateau-factor", "0.5"], "lr_plateau_factor > 0 needs patience > 0"),
    ],
)
def test_train_flags_are_checked_like_the_trainer_section(
    tmp_path, capsys, monkeypatch, flags, message
):
    """Flags skipped the section's bounds: a traceback after loading, or a silent no-op."""
    monkeypatch.setenv("RECSYS_TRAINER__PATIENCE", "0")
    assert main(["train", "--data", DATA, "--model-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_refuses_an_id_the_services_would_refuse(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    long_id = "https://example.com/" + "x" * 300
    (data / "ratings.csv").write_text(
        f"userId,movieId,rating,timestamp\n1,{long_id},4,1\n2,10,3,2\n1,10,5,3\n"
    )
    (data / "movies.csv").write_text(
        f"movieId,title,genres\n{long_id},Long (1999),Drama\n10,Ten (2001),Comedy\n"
    )
    argv = ["train", "--data", f"csv:{data}", "--model-dir", str(tmp_path / "m"), "--epochs", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "item id 'https://example.com/" in err and "at most 256 allowed" in err
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


@pytest.mark.parametrize("code", ["EPERM", "ENOSPC", "EROFS"])
def test_a_model_dir_that_refuses_the_new_version_is_one_clear_error(
    tmp_path, capsys, monkeypatch, code
):
    """Every rename failure was taken for a lost race: 100 tries, then a traceback."""
    import errno
    import os

    real = os.rename
    tries: list[str] = []

    def refuse(src, dst, *a, **kw):
        if os.path.basename(str(dst)).isdigit():
            tries.append(str(dst))
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", refuse)
    model_dir = tmp_path / "m"
    argv = ["train", "--data", DATA, "--model-dir", str(model_dir), "--epochs", "1", "--no-plots"]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "could not write the new version under" in err and "could not move" in err
    assert os.strerror(getattr(errno, code)) in err and "Traceback" not in err
    assert len(tries) == 1
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".tmp-")]
