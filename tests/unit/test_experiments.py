"""Variant bucketing, forced variants, config validation and source overrides."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from recsys.config import ConfigError, ExperimentSettings, RecsysSettings, load_settings
from recsys.experiments import (
    DEFAULT_VARIANT,
    Experiment,
    UnknownVariant,
    bucket,
    source_entries,
)


def experiment(*shares: float, name: str = "exp1", **variant_extra) -> Experiment:
    variants = [
        {"name": f"v{i}", "share": s, **variant_extra.get(f"v{i}", {})}
        for i, s in enumerate(shares)
    ]
    return Experiment(ExperimentSettings(name=name, variants=variants))


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.1, 0.3, 0.6), (0.05, 0.95)])
def test_shares_within_two_percent_over_100k_users(shares):
    exp = experiment(*shares)
    counts = dict.fromkeys(exp.names, 0)
    n = 100_000
    for u in range(n):
        counts[exp.assign(f"user-{u}").name] += 1
    for v, share in zip(exp.names, shares, strict=True):
        assert abs(counts[v] / n - share) < 0.02, (v, counts[v] / n, share)


def test_a_request_without_a_user_gets_the_default_variant():
    """The empty id hashed to one bucket: every anonymous Rank went to that arm."""
    exp = experiment(0.9, 0.1, name="exp-24")
    assert bucket("exp-24", "") > 0.9, "the empty id's bucket lies in v1's slice"
    assert exp.assign("").name == exp.resolve("").name == "v0" == exp.default.name
    assert exp.resolve("", "v1").name == "v1", "forcing still works"


def test_assignment_is_deterministic_and_sticky():
    a, b = experiment(0.5, 0.5), experiment(0.5, 0.5)
    users = [f"u{i}" for i in range(2000)]
    first = [a.assign(u).name for u in users]
    assert first == [b.assign(u).name for u in users]  # a new instance agrees
    assert first == [a.assign(u).name for u in users]  # and asking twice does too
    assert len(set(first)) == 2


def test_bucket_is_stable_across_processes_and_hash_seeds():
    users = ["1", "42", "alice", "ünïcode", ""]
    here = [bucket("exp1", u) for u in users]
    code = (
        f"from recsys.experiments import bucket;print(repr([bucket('exp1', u) for u in {users!r}]))"
    )
    for seed in ("1", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        assert json.loads(out) == here


def test_experiment_name_salts_the_bucket():
    users = [f"u{i}" for i in range(1000)]
    a = [experiment(0.5, 0.5, name="one").assign(u).name for u in users]
    b = [experiment(0.5, 0.5, name="two").assign(u).name for u in users]
    # Independent hashes: about half the users change variant.
    changed = sum(x != y for x, y in zip(a, b, strict=True)) / len(users)
    assert 0.4 < changed < 0.6


def test_bucket_range():
    values = [bucket("e", str(i)) for i in range(10_000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert min(values) < 0.01 and max(values) > 0.99


def test_zero_share_variant_gets_nobody_but_can_be_forced():
    exp = experiment(1.0, 0.0)
    assert {exp.assign(f"u{i}").name for i in range(5000)} == {"v0"}
    assert exp.resolve("u1", "v1").name == "v1"


def test_forced_and_unknown_variants():
    exp = experiment(0.5, 0.5)
    for u in ("a", "b", "c"):
        assert exp.resolve(u, "v1").name == "v1"
        assert exp.resolve(u).name == exp.assign(u).name
    with pytest.raises(UnknownVariant) as err:
        exp.resolve("a", "nope")
    assert str(err.value).startswith("user.variant: unknown variant 'nope'")
    assert "v0, v1" in str(err.value)


def test_no_experiment_is_variant_default():
    exp = Experiment()
    assert not exp.active
    assert exp.assign("anyone").name == DEFAULT_VARIANT
    assert exp.resolve("x", DEFAULT_VARIANT).name == DEFAULT_VARIANT
    assert exp.model_tracks() == {"current": [DEFAULT_VARIANT]}
    with pytest.raises(UnknownVariant):
        exp.resolve("x", "treatment")


def test_model_tracks_group_variants_by_version():
    exp = Experiment(
        ExperimentSettings(
            variants=[
                {"name": "a", "share": 0.4},
                {"name": "b", "share": 0.3, "model_version": "7"},
                {"name": "c", "share": 0.3, "model_version": "7"},
            ]
        )
    )
    assert exp.model_tracks() == {"current": ["a"], "7": ["b", "c"]}
    assert exp.by_name["b"].pinned_version == "7"
    assert exp.by_name["a"].pinned_version is None


@pytest.mark.parametrize(
    ("variants", "needle"),
    [
        ([{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}], "variants[*].share"),
        ([{"name": "a", "share": 0.6}, {"name": "b", "share": 0.6}], "sum to 1.2"),
        ([{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}], "variants[1].name"),
        ([{"name": "a", "share": 1.0, "sources": {"x": {"budget": 0}}}], "budget"),
        ([{"name": "a", "share": 1.0, "sources": {"x": {"bugdet": 5}}}], "bugdet"),
        ([{"name": "Bad Name", "share": 1.0}], "name"),
    ],
)
def test_invalid_experiment_config_names_the_field(tmp_path, variants, needle):
    lines = ['[experiments]\nname = "e"\n']
    for v in variants:
        lines.append("[[experiments.variants]]\n")
        for key, value in v.items():
            if key == "sources":
                continue
            lines.append(f"{key} = {value!r}\n".replace("'", '"'))
        for src, over in v.get("sources", {}).items():
            lines.append(f"[experiments.variants.sources.{src}]\n")
            lines.extend(f"{k} = {val}\n" for k, val in over.items())
    path = tmp_path / "c.toml"
    path.write_text("".join(lines))
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "experiments" in str(err.value)
    assert needle in str(err.value)


def test_valid_experiment_config_from_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[experiments]\nname = "ab1"\n'
        '[[experiments.variants]]\nname = "control"\nshare = 0.7\n'
        '[[experiments.variants]]\nname = "treatment"\nshare = 0.3\nmodel_version = "2"\n'
        "[experiments.variants.sources.top_country]\nenabled = false\n"
        "[experiments.variants.sources.similar_to_recent]\nbudget = 300\nweight = 2.5\n"
    )
    s = load_settings(path)
    exp = Experiment(s.experiments)
    assert exp.names == ["control", "treatment"]
    t = exp.by_name["treatment"]
    entries = source_entries(s.retrieval.sources, t)
    names = [e["name"] for e in entries]
    assert "top_country" not in names
    assert names == [e["name"] for e in s.retrieval.sources if e["name"] != "top_country"]
    sim = next(e for e in entries if e["name"] == "similar_to_recent")
    base = next(e for e in s.retrieval.sources if e["name"] == "similar_to_recent")
    assert sim["budget"] == 300 and sim["weight"] == 2.5
    assert sim["timeout_ms"] == base["timeout_ms"] and sim["type"] == base["type"]
    # The control variant has no overrides: the base list, unchanged.
    assert source_entries(s.retrieval.sources, exp.by_name["control"]) == s.retrieval.sources


def test_override_of_an_unknown_source_is_a_config_error():
    s = RecsysSettings(
        experiments={"variants": [{"name": "a", "share": 1, "sources": {"nosuch": {}}}]}
    )
    exp = Experiment(s.experiments)
    with pytest.raises(ConfigError, match=r"experiments\.variants\[name='a'\]\.sources\.nosuch"):
        source_entries(s.retrieval.sources, exp.by_name["a"])


def test_disabling_every_source_is_a_config_error():
    s = RecsysSettings()
    off = {e["name"]: {"enabled": False} for e in s.retrieval.sources}
    s = RecsysSettings(experiments={"variants": [{"name": "a", "share": 1, "sources": off}]})
    with pytest.raises(ConfigError, match="disables every retrieval source"):
        source_entries(s.retrieval.sources, Experiment(s.experiments).by_name["a"])


def test_rounding_slack_goes_to_the_last_variant_with_a_share(monkeypatch):
    """Shares summing to just under 1 must not give a trailing zero-share arm a slice."""
    import recsys.experiments as experiments

    exp = experiment(0.5, 0.4999995, 0.0)
    # A user whose bucket falls in the gap between the shares' sum and 1.
    monkeypatch.setattr(experiments, "bucket", lambda name, user: 0.9999997)
    assert exp.assign("in-the-gap").name == "v1"


def test_the_highest_digest_still_buckets_below_one(monkeypatch):
    """64 bits over 2**64 rounded to 1.0, which landed in a trailing zero-share arm."""
    import hashlib

    from recsys import experiments

    class Top:
        def digest(self) -> bytes:
            return b"\xff" * 8

    monkeypatch.setattr(hashlib, "blake2b", lambda *a, **kw: Top())
    assert experiments.bucket("e", "u") < 1.0


@pytest.mark.parametrize("pin", ["Current", "latest", "v7", "01", " 1", "../1", "0"])
def test_a_pin_that_names_no_possible_version_is_refused(pin):
    """Version directories are plain numbers: such a pin waited NOT_SERVING forever."""
    from recsys.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="model_version"):
        load_settings(
            experiments={
                "name": "e",
                "variants": [
                    {"name": "a", "share": 1.0},
                    {"name": "b", "share": 0.0, "model_version": pin},
                ],
            }
        )
    with pytest.raises(ConfigError, match="pinned_version"):
        load_settings(ranking={"pinned_version": pin})
