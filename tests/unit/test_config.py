from __future__ import annotations

from pathlib import Path

import pytest

from recsys.config import ConfigError, grpc_address, load_settings, with_flags
from recsys.errors import UserFacingError


def test_defaults_work_on_one_machine(monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("RECSYS_"):
            monkeypatch.delenv(k)
    s = load_settings()
    assert s.retrieval.port != s.ranking.port
    assert s.ranking.retrieval_address.endswith(f":{s.retrieval.port}")
    assert {src["type"] for src in s.retrieval.sources} == {
        "annoy_similar",
        "redis_top_genre",
        "redis_top_country",
        "popular",
    }


def test_environment_overrides_file(tmp_path: Path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('model_dir = "/from/file"\n[ranking]\nmax_batch_size = 8\n')
    monkeypatch.setenv("RECSYS_RANKING__MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("RECSYS_REDIS_URL", "redis://:secret@example:6380/1")
    s = load_settings(cfg)
    assert s.model_dir == Path("/from/file")
    assert s.ranking.max_batch_size == 32
    assert s.redis_url.get_secret_value() == "redis://:secret@example:6380/1"
    assert "secret" not in repr(s)


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("RECSYS_MODEL_DIR", "/env")
    assert load_settings(model_dir="/flag").model_dir == Path("/flag")


def test_unknown_key_is_named(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[retrieval]\nbudgett = 3\n")
    with pytest.raises(ConfigError, match=r"retrieval\.budgett"):
        load_settings(cfg)


def test_bad_value_is_named(monkeypatch):
    monkeypatch.setenv("RECSYS_RANKING__DEVICE", "tpu")
    with pytest.raises(ConfigError, match=r"ranking\.device"):
        load_settings()


def test_missing_file_is_clear(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("name", "named"),
    [
        ("RECSYS_RANKING_PINNED_VERSION", r"RECSYS_RANKING_PINNED_VERSION.*RECSYS_RANKING__"),
        ("RECSYS_MODLE_DIR", r"RECSYS_MODLE_DIR: no setting 'modle_dir'"),
        ("RECSYS_REDIS_URI", r"RECSYS_REDIS_URI: no setting 'redis_uri'"),
    ],
)
def test_unknown_top_level_environment_name_is_named(monkeypatch, name, named):
    """A typo above the first ``__`` is an error too, not a silently ignored variable."""
    monkeypatch.setenv(name, "7")
    with pytest.raises(ConfigError, match=named):
        load_settings()


def test_non_setting_environment_names_are_allowed(monkeypatch):
    monkeypatch.setenv("RECSYS_WORKER", "1")
    monkeypatch.setenv("RECSYS_REDIS_SERVER", "/usr/bin/redis-server")
    monkeypatch.setenv("RECSYS_RANKING__PINNED_VERSION", "7")
    assert load_settings().ranking.pinned_version == "7"


def test_defaults_above_their_caps_are_refused():
    """budget 0 and k 0 take the defaults unchecked, so a default above its cap is refused."""
    with pytest.raises(ConfigError, match=r"default_budget: 600 is more than max_budget 500"):
        load_settings(retrieval={"default_budget": 600, "max_budget": 500})
    with pytest.raises(ConfigError, match=r"default_k: 30 is more than max_k 10"):
        load_settings(ranking={"default_k": 30, "max_k": 10})


def test_log_level_is_checked_when_loaded():
    assert load_settings(log_level="debug").log_level == "DEBUG"
    with pytest.raises(ConfigError, match="log_level"):
        load_settings(log_level="verbose")


def test_the_documented_movielens_setup_can_be_configured():
    """dropout and the plateau schedule reach the trainer from the config, not only from bench."""
    from trainer.train import TrainConfig

    s = load_settings(trainer={"dropout": 0.2, "lr_plateau_factor": 0.5, "id_l2": 1e-4})
    cfg = TrainConfig.from_settings(s.trainer, dropout=None)
    assert (cfg.dropout, cfg.lr_plateau_factor, cfg.id_l2) == (0.2, 0.5, 1e-4)
    assert TrainConfig.from_settings(s.trainer, dropout=0.1).dropout == 0.1  # a flag wins
    with pytest.raises(ConfigError, match=r"trainer\.dropout"):
        load_settings(trainer={"dropout": 1.0})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"retrieval": {"tls": {"cert_file": "c.pem"}}}, r"retrieval\.tls.*key_file: needed"),
        ({"ranking": {"tls": {"key_file": "k.pem"}}}, r"ranking\.tls.*cert_file: needed"),
        (
            {"ranking": {"tls": {"cert_file": "c", "key_file": "k", "require_client_cert": True}}},
            r"ca_file: require_client_cert needs the CA",
        ),
        ({"retrieval": {"tls": {"ca_file": "ca.pem"}}}, r"runs in plaintext"),
        # A server CA without require_client_cert: gRPC asks clients for no certificate.
        (
            {"retrieval": {"tls": {"cert_file": "c", "key_file": "k", "ca_file": "ca.pem"}}},
            r"retrieval: .*tls\.require_client_cert: a server's ca_file is for client",
        ),
    ],
)
def test_half_a_tls_configuration_is_refused(overrides, message):
    """Each of these served plaintext, or TLS without client checks, without a word."""
    with pytest.raises(ConfigError, match=message):
        load_settings(**overrides)


def test_a_client_may_name_only_the_ca_it_trusts():
    s = load_settings(ranking={"retrieval_tls": {"ca_file": "ca.pem"}})
    assert s.ranking.retrieval_tls.ca_file is not None and not s.ranking.retrieval_tls.enabled


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"retrieval": {"auth_token": ""}}, r"retrieval: .*auth_token: empty"),
        ({"ranking": {"auth_token": "  "}}, r"ranking: .*auth_token: empty"),
        ({"ranking": {"retrieval_auth_token": ""}}, r"ranking: .*retrieval_auth_token: empty"),
    ],
)
def test_an_empty_token_is_refused_not_auth_off(overrides, field):
    """An unset ${TOKEN} in a manifest must not serve every caller without a word."""
    with pytest.raises(ConfigError, match=field):
        load_settings(**overrides)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("hop-token\n", "starts or ends with whitespace"),  # a Secret made --from-file
        (" hop-token", "starts or ends with whitespace"),
        ("hop-tökén", "cannot send in a header"),
        ("hop\ttoken", "cannot send in a header"),
        ("hop\x7ftoken", "cannot send in a header"),
    ],
)
@pytest.mark.parametrize(
    ("section", "field"),
    [("retrieval", "auth_token"), ("ranking", "auth_token"), ("ranking", "retrieval_auth_token")],
)
def test_a_token_grpc_cannot_send_is_refused(token, message, section, field):
    """gRPC refuses such a header value: every call failed INTERNAL, or no client matched."""
    with pytest.raises(ConfigError, match=rf"{section}: .*, {field}: .*{message}") as err:
        load_settings(**{section: {field: token}})
    assert token.strip() not in str(err.value)  # the secret is not echoed


def test_a_token_of_printable_ascii_with_inner_spaces_is_accepted():
    token = "a b!#$%&'()*+,-./:;<=>?@[]^_`{|}~"  # every one of them gRPC sends as it is
    assert (
        load_settings(ranking={"auth_token": token}).ranking.auth_token.get_secret_value() == token
    )


@pytest.mark.parametrize(
    ("host", "bare", "bind", "dial"),
    [
        ("127.0.0.1", "127.0.0.1", "127.0.0.1:7001", "127.0.0.1:7001"),
        ("0.0.0.0", "0.0.0.0", "0.0.0.0:7001", "127.0.0.1:7001"),
        ("::", "::", "[::]:7001", "127.0.0.1:7001"),
        ("[::]", "::", "[::]:7001", "127.0.0.1:7001"),
        ("::1", "::1", "[::1]:7001", "[::1]:7001"),
        ("[::1]", "::1", "[::1]:7001", "[::1]:7001"),
        ("localhost", "localhost", "localhost:7001", "localhost:7001"),
    ],
)
def test_an_ipv6_host_is_kept_bare_and_bracketed_for_grpc(host, bare, bind, dial):
    """gRPC misparsed ":::7001"; sockets and /metrics could not bind "[::]"."""
    s = load_settings(retrieval={"host": host, "port": 7001}).retrieval
    assert s.host == bare
    assert grpc_address(s.host, s.port) == bind
    assert s.local_address == dial
    flagged = with_flags(load_settings(), "ranking", {"host": host}).ranking
    assert flagged.host == bare


@pytest.mark.parametrize("host", ["0.0.0.0:50051", "::1]", "[::1", "[127.0.0.1]", "[]", "[ab::zz]"])
def test_a_host_that_is_no_address_is_refused(host):
    """A port in host, or brackets around no IPv6 address, would fail only at bind."""
    with pytest.raises(ConfigError, match=r"ranking\.host: .*is not an IPv6 address"):
        load_settings(ranking={"host": host})
    with pytest.raises(UserFacingError, match=r"--host: .*is not an IPv6 address"):
        with_flags(load_settings(), "ranking", {"host": host})


def test_a_malformed_redis_url_is_refused_without_its_password():
    """An unencoded '#' made redis-py fail at start-up with the password in the traceback."""
    with pytest.raises(ConfigError, match=r"redis_url: .*percent-encoded") as err:
        load_settings(redis_url="redis://:s3cr3t#Pw@127.0.0.1:6399/0")
    assert "s3cr3t" not in str(err.value)
    encoded = load_settings(redis_url="redis://:s3cr3t%23Pw@127.0.0.1:6399/0")
    assert encoded.redis_url.get_secret_value().endswith("@127.0.0.1:6399/0")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RECSYS_TRAINER__HIDDEN_UNITS", "512,256"),
        ("RECSYS_RETRIEVAL__SOURCES", "popular"),
        ("RECSYS_EXPERIMENTS__VARIANTS", "control"),
        ("RECSYS_TRACING", "on"),
    ],
)
def test_a_list_or_table_in_the_environment_that_is_not_json_is_named(monkeypatch, name, value):
    """pydantic-settings' own error named only the section, with a traceback."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"environment variable {name}: .* JSON"):
        load_settings()


def test_a_json_list_in_the_environment_still_loads(monkeypatch):
    monkeypatch.setenv("RECSYS_TRAINER__HIDDEN_UNITS", "[64, 32]")
    monkeypatch.setenv("RECSYS_TRAINER__SEED", "7")  # a scalar: no JSON needed
    settings = load_settings()
    assert settings.trainer.hidden_units == [64, 32] and settings.trainer.seed == 7


def test_ranking_cannot_batch_more_retrievals_than_retrieval_accepts_in_one_call():
    """A batch above retrieval's RetrieveMany limit would fail every Recommend in it."""
    from recsys.config import MAX_RETRIEVE_MANY
    from retrieval_service import servicer

    assert servicer.MAX_RETRIEVE_MANY == MAX_RETRIEVE_MANY
    ranking = load_settings(ranking={"retrieval_batch_size": MAX_RETRIEVE_MANY}).ranking
    assert ranking.retrieval_batch_size == MAX_RETRIEVE_MANY
    with pytest.raises(ConfigError, match="retrieval_batch_size"):
        load_settings(ranking={"retrieval_batch_size": MAX_RETRIEVE_MANY + 1})


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        # inf passed gt=0; as a gRPC deadline it is already past: every call failed at once.
        ("RECSYS_RANKING__RETRIEVAL_TIMEOUT_S", "inf", "ranking.retrieval_timeout_s"),
        ("RECSYS_RANKING__RETRIEVAL_TIMEOUT_S", "1e12", "ranking.retrieval_timeout_s"),
        ("RECSYS_REDIS_TIMEOUT_S", "inf", "redis_timeout_s"),
        ("RECSYS_RETRIEVAL__GRACE_S", "inf", "retrieval.grace_s"),
        ("RECSYS_RANKING__BATCH_TIMEOUT_MS", "inf", "ranking.batch_timeout_ms"),
        # gRPC keeps it in a C int: the server failed to start with an OverflowError.
        ("RECSYS_RETRIEVAL__MAX_MESSAGE_BYTES", str(2**31), "retrieval.max_message_bytes"),
    ],
)
def test_values_a_service_cannot_run_with_are_refused_when_loaded(monkeypatch, name, value, field):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings()


def test_a_section_that_is_not_json_is_named_without_its_value(monkeypatch):
    """The message echoed the value, and with it a token written the wrong way."""
    monkeypatch.setenv("RECSYS_RANKING", "retrieval_auth_token=SuperSecret123")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "RECSYS_RANKING" in str(err.value)
    assert "SuperSecret123" not in str(err.value)
