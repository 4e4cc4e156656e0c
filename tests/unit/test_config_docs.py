"""docs/configuration.md is generated from recsys/config.py and must match it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from pydantic import Field, SecretStr

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "gen_config_docs", REPO / "scripts" / "gen_config_docs.py"
)
gen_config_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_config_docs)


def test_the_committed_reference_matches_the_config():
    assert gen_config_docs.PAGE.read_text() == gen_config_docs.render(), (
        "docs/configuration.md is stale: run python scripts/gen_config_docs.py"
    )


def test_every_setting_is_in_the_reference_with_its_env_name():
    page = gen_config_docs.PAGE.read_text()
    for key, env in [
        ("ranking.retrieval_batch_wait_ms", "RECSYS_RANKING__RETRIEVAL_BATCH_WAIT_MS"),
        ("retrieval.tls.ca_file", "RECSYS_RETRIEVAL__TLS__CA_FILE"),
        ("trainer.lr_plateau_factor", "RECSYS_TRAINER__LR_PLATEAU_FACTOR"),
        ("experiments.variants[].share", None),
    ]:
        assert f"`{key}`" in page
        if env:
            assert f"`{env}`" in page


def test_a_setting_without_a_description_fails_the_render(monkeypatch):
    from recsys.config import TracingSettings

    field = Field(0.5)
    monkeypatch.setitem(TracingSettings.model_fields, "undocumented", field)
    with pytest.raises(SystemExit, match=r"tracing\.undocumented has no description"):
        gen_config_docs.render()


@pytest.mark.parametrize(
    ("default", "shown"),
    [
        # The local Redis has no password: its URL is the default a reader needs.
        ("redis://127.0.0.1:6379/0", '`"redis://127.0.0.1:6379/0"`'),
        ("redis://:pw@10.0.0.5:6379/0", "(secret)"),
        ("rediss://app@redis.internal/0", "(secret)"),
        ("redis://redis.internal/0?password=pw", "(secret)"),
        ("a-token", "(secret)"),
    ],
)
def test_a_secret_default_is_shown_only_when_it_carries_no_credentials(default, shown):
    assert gen_config_docs._default(Field(SecretStr(default))) == shown
