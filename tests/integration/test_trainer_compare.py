"""``recsys evaluate --compare``: two real versions on one held-out split, bootstrap CIs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recsys.cli import main
from recsys.errors import UserFacingError

# The data the session's ``trained_version`` fixture was trained on (conftest defaults).
SPEC = "synthetic:users=300,items=250,ratings=15000,countries=3,seed=0"


@pytest.fixture(scope="module")
def worse_version(train_version, tmp_path_factory):
    """Same data as ``trained_version``, but one epoch of a tiny tower: clearly worse."""
    return train_version(
        tmp_path_factory.mktemp("worse"), epochs=1, hidden_units=(4,), embedding_dim=2
    )


@pytest.fixture(scope="module")
def good_vs_worse(trained_version, worse_version):
    from trainer.compare import compare_versions

    return compare_versions(trained_version, worse_version, data_spec=SPEC)


def test_clearly_worse_version_is_detected(good_vs_worse):
    m = good_vs_worse["metrics"]
    assert list(m) == ["rmse", "mae", "recall@10", "ndcg@10"]
    rmse = m["rmse"]
    assert rmse["other"] > rmse["base"]
    assert rmse["diff"] == pytest.approx(rmse["other"] - rmse["base"])
    lo, hi = rmse["ci"]
    # The interval brackets the point estimate and lies wholly above zero.
    assert 0 < lo <= rmse["diff"] <= hi
    assert rmse["significant"] and m["mae"]["significant"] and m["mae"]["ci"][0] > 0
    assert good_vs_worse["bootstrap"] == {
        "resamples": 1000, "confidence": 0.95, "seed": 0, "unit": "user", "paired": True,
    }  # fmt: skip
    assert good_vs_worse["test_users"] <= 300 and good_vs_worse["ranking_users"] > 0


def test_point_estimates_match_recsys_evaluate(good_vs_worse, trained_version):
    from trainer.evaluate import evaluate_version

    alone = evaluate_version(trained_version, SPEC)
    m = good_vs_worse["metrics"]
    assert m["rmse"]["base"] == pytest.approx(alone["model"]["rmse"], abs=1e-9)
    assert m["mae"]["base"] == pytest.approx(alone["model"]["mae"], abs=1e-9)
    assert m["recall@10"]["base"] == pytest.approx(alone["top10"]["model"]["recall@10"])
    assert m["ndcg@10"]["base"] == pytest.approx(alone["top10"]["model"]["ndcg@10"])


def test_version_against_itself_is_no_difference(trained_version):
    from trainer.compare import compare_versions

    same = compare_versions(trained_version, trained_version, data_spec=SPEC)
    for m in same["metrics"].values():
        assert m["diff"] == 0.0
        lo, hi = m["ci"]
        assert lo <= 0.0 <= hi and not m["significant"]


def test_bootstrap_is_seeded_and_narrows_with_confidence(trained_version, worse_version):
    from trainer.compare import bootstrap_compare
    from trainer.evaluate import load_for_evaluation

    mv_a, p, ua = load_for_evaluation(trained_version, SPEC)
    mv_b, _, ub = load_for_evaluation(worse_version, SPEC, prepared=p)
    a = (ua, np.asarray(mv_a.item_vectors), mv_a.target)
    b = (ub, np.asarray(mv_b.item_vectors), mv_b.target)
    r1 = bootstrap_compare(p, a, b, resamples=200, seed=7)
    r2 = bootstrap_compare(p, a, b, resamples=200, seed=7)
    r3 = bootstrap_compare(p, a, b, resamples=200, seed=8)
    r80 = bootstrap_compare(p, a, b, resamples=200, seed=7, confidence=0.8)
    assert r1["metrics"]["rmse"]["ci"] == r2["metrics"]["rmse"]["ci"]
    assert r1["metrics"]["rmse"]["ci"] != r3["metrics"]["rmse"]["ci"]
    lo95, hi95 = r1["metrics"]["rmse"]["ci"]
    lo80, hi80 = r80["metrics"]["rmse"]["ci"]
    assert lo95 < lo80 < hi80 < hi95
    # Swapping the versions mirrors the interval.
    swapped = bootstrap_compare(p, b, a, resamples=200, seed=7)["metrics"]["rmse"]["ci"]
    assert swapped == pytest.approx([-hi95, -lo95])


def test_other_data_is_refused(trained_version, train_version, tmp_path):
    from trainer.compare import compare_versions

    other = train_version(tmp_path, epochs=1, hidden_units=(4,), data_seed=1)
    with pytest.raises(UserFacingError, match="different data"):
        compare_versions(trained_version, other, data_spec=SPEC)


def test_cli_json_and_table(trained_version, worse_version, capsys):
    base = ["evaluate", "--version", str(trained_version), "--compare", str(worse_version)]
    assert main([*base, "--data", SPEC, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["rmse"]["ci"][0] > 0
    assert result["base"]["path"] == str(trained_version)
    assert main([*base, "--data", SPEC]) == 0
    table = capsys.readouterr().out
    assert "95% CI" in table and "B worse" in table and str(worse_version) in table
    rmse = result["metrics"]["rmse"]
    assert f"{rmse['diff']:+.4f}" in table
    rc = main(["evaluate", "--version", str(trained_version), "--compare", "no-such-version"])
    assert rc == 2
    assert "no-such-version not found" in capsys.readouterr().err
