"""Typed configuration, loaded in one place for every component.

Precedence, highest first: explicit overrides (CLI flags), environment
variables (``RECSYS_*``; nested fields use ``__``, e.g.
``RECSYS_RANKING__MAX_BATCH_SIZE``), a TOML file (``--config`` or
``RECSYS_CONFIG``), then the defaults below, which run everything on one
machine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
import typing
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "RECSYS_CONFIG"
# RECSYS_ variables that are not settings: the config file's path, the
# supervisor's note to its workers, the embedded Redis binary and the test
# data folder. Any other RECSYS_ name must name a setting (see load_settings).
OTHER_ENV = frozenset({CONFIG_ENV, "RECSYS_WORKER", "RECSYS_REDIS_SERVER", "RECSYS_SHARED_DATA"})


class _Strict(BaseModel):
    """Base for nested sections: unknown keys are a configuration error."""

    # No inf: it passes gt/ge bounds, and an infinite (or huge) timeout is a
    # gRPC deadline already past, so every call with it failed at once.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TLSSettings(_Strict):
    """Server or client TLS material; all paths are PEM files.

    Read and checked at start-up: a file that is missing or unreadable,
    holds no PEM certificate (an empty CA file included) or no private key,
    or a key that is not the certificate's stops the service with a message
    naming the setting.
    """

    cert_file: Path | None = Field(None, description="This side's certificate (PEM).")
    key_file: Path | None = Field(None, description="This side's private key (PEM).")
    ca_file: Path | None = Field(
        None,
        description="CA that signs peers: a client's check of the server; on a server, the "
        "CA of client certificates (needs require_client_cert).",
    )
    require_client_cert: bool = Field(
        False, description="Server: refuse clients without a certificate signed by ca_file."
    )

    @model_validator(mode="after")
    def _check_pairs(self) -> TLSSettings:
        # Half a configuration must not fail open (plaintext, or TLS that
        # checks no client certificate) without a word.
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = ("cert_file", "key_file")[:: 1 if self.key_file is None else -1]
            raise ValueError(f"{missing}: needed with {given} (TLS needs both)")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("ca_file: require_client_cert needs the CA that signs clients")
        return self

    @property
    def enabled(self) -> bool:
        """True when a certificate and key are configured."""
        return self.cert_file is not None and self.key_file is not None


def _check_token(token: SecretStr | None, field: str) -> None:
    """Refuses a token that would turn auth off silently or that no call could carry.

    An empty token (an unset variable in a manifest) would turn auth off. A
    header value gRPC refuses (outside printable ASCII: a token read from a
    file keeps its trailing newline) would fail every call as ``INTERNAL``,
    and as a server's token no client could send it. Leading or trailing
    spaces gRPC sends, but proxies may strip them. The messages never echo
    the secret.
    """
    if token is None:
        return
    value = token.get_secret_value()
    if not value.strip():
        raise ValueError(f"{field}: empty; leave it out to turn auth off")
    if value != value.strip():
        raise ValueError(
            f"{field}: starts or ends with whitespace (a newline kept from the file "
            "it was read from?); remove it"
        )
    if not all(" " <= c <= "~" for c in value):
        raise ValueError(
            f"{field}: holds a character gRPC cannot send in a header; use printable "
            "ASCII (letters, digits, punctuation, inner spaces)"
        )


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC parses it: an IPv6 literal goes in brackets (``[::1]:50051``).

    ``host`` is the bare form the settings keep; sockets and HTTP servers
    bind that form as it is.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(default: int) -> Any:
    return Field(default, ge=0, le=65535, description="gRPC port; 0 picks a free one.")


def _metrics_port(default: int) -> Any:
    return Field(default, ge=0, le=65535, description="Prometheus /metrics port; 0 disables it.")


class ServerSettings(_Strict):
    """Settings every gRPC server shares (the defaults are retrieval's ports)."""

    host: str = Field(
        "127.0.0.1",
        description="Bind address; 0.0.0.0 in containers, :: for every IPv6 and IPv4 "
        "address. An IPv6 address is written with or without brackets (::1 or [::1]).",
    )
    port: int = _port(50051)
    metrics_port: int = _metrics_port(9091)
    max_id_bytes: int = Field(256, ge=1, description="Longest accepted user or item id.")
    grace_s: float = Field(10.0, ge=0, description="Drain time on SIGTERM.")
    drain_delay_s: float = Field(
        0.5,
        ge=0,
        description="On SIGTERM, keep accepting calls this long after health goes NOT_SERVING "
        "so health-checking clients move away before the server stops taking calls.",
    )
    max_concurrent_rpcs: int = Field(
        512, ge=1, description="Above this, new calls fail fast with RESOURCE_EXHAUSTED."
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        le=2**31 - 1,  # gRPC keeps it in a C int: more failed at server start
        description="Largest request or response accepted.",
    )
    reload_interval_s: float = Field(2.0, gt=0, description="How often to look for a new version.")
    auth_token: SecretStr | None = Field(
        None, description="When set, callers must send 'authorization: Bearer <token>'."
    )
    tls: TLSSettings = TLSSettings()
    pinned_version: str | None = Field(
        None,
        pattern=r"^[1-9][0-9]*$",
        description="Serve exactly this version (a version number, as its directory is "
        "named) instead of following the published one.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Server processes sharing the port (SO_REUSEPORT); their metrics are "
        "served together on metrics_port.",
    )

    @field_validator("host")
    @classmethod
    def _bare_host(cls, v: str) -> str:
        # Kept bare: socket and http.server binds refuse "[::]", gRPC takes
        # the literal in brackets (grpc_address adds them where it needs them).
        bare = v[1:-1] if v.startswith("[") and v.endswith("]") else v
        if bare != v or ":" in bare:
            try:
                ipaddress.IPv6Address(bare)
            except ValueError:
                raise ValueError(
                    f"{v!r} is not an IPv6 address (the port goes in port, not host)"
                ) from None
        return bare

    @property
    def dial_host(self) -> str:
        """The host a client on this machine dials: a wildcard bind is reached on loopback."""
        # gRPC binds "::" dual-stack, so IPv4 loopback reaches that wildcard too.
        return "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host

    @property
    def local_address(self) -> str:
        """``host:port`` a client on this machine dials (:attr:`dial_host`, the port)."""
        return grpc_address(self.dial_host, self.port)

    @model_validator(mode="after")
    def _check_server_tls(self) -> ServerSettings:
        # A server's CA (client checks) without its own certificate would
        # leave it serving plaintext.
        if not self.tls.enabled and (self.tls.ca_file or self.tls.require_client_cert):
            raise ValueError(
                "tls.cert_file: client-certificate checks need the server's own "
                "cert_file and key_file, or the server runs in plaintext"
            )
        # gRPC would not even ask for a client certificate: a CA named for
        # client checks that checks nothing must not pass for mutual TLS.
        if self.tls.ca_file and not self.tls.require_client_cert:
            raise ValueError(
                "tls.require_client_cert: a server's ca_file is for client certificates; "
                "set require_client_cert = true to check them (or drop ca_file)"
            )
        _check_token(self.auth_token, "auth_token")
        return self


def _default_sources() -> list[dict[str, Any]]:
    return [
        {"name": "similar_to_recent", "type": "annoy_similar", "budget": 200, "timeout_ms": 50},
        {"name": "top_genre", "type": "redis_top_genre", "budget": 150, "timeout_ms": 50},
        {"name": "top_country", "type": "redis_top_country", "budget": 100, "timeout_ms": 50},
        {"name": "popular", "type": "popular", "budget": 200, "timeout_ms": 50},
    ]


class RetrievalSettings(ServerSettings):
    """Retrieval service settings."""

    default_budget: int = Field(
        500, ge=1, description="Candidates returned when a request's budget is 0."
    )
    max_budget: int = Field(5000, ge=1, description="Largest budget a request may ask for.")
    max_similar_k: int = Field(1000, ge=1, description="Largest k of SimilarItems.")
    max_request_ids: int = Field(
        10_000, ge=1, description="Most ids in one request list (recent, exclude, sources)."
    )
    history_length: int = Field(50, ge=1, description="Recent-history entries kept per user.")
    interaction_log_length: int = Field(
        200,
        ge=0,
        description="Online interactions kept per user for `recsys publish` to replay onto the "
        "batch aggregates it writes (~190 bytes of Redis an entry; the oldest beyond this are "
        "dropped, and each publish cuts the logs to it; 0: no log, and a publish that "
        "replaces a user's aggregates then drops what was recorded online).",
    )
    sources: list[dict[str, Any]] = Field(
        default_factory=_default_sources,
        description="Candidate sources, each {name, type, budget, weight, timeout_ms, ...}.",
    )
    top_list_cache: bool = Field(
        True,
        description="Keep the served version's top lists in process after their first Redis "
        "read (they never change within a build of a version), saving the second round trip.",
    )

    @model_validator(mode="after")
    def _check_budgets(self) -> RetrievalSettings:
        # A request with budget 0 gets the default unchecked, so a default
        # above the maximum would be a way around the cap.
        if self.default_budget > self.max_budget:
            raise ValueError(
                f"default_budget: {self.default_budget} is more than max_budget {self.max_budget}"
            )
        return self


# Most requests in one RetrieveMany call: retrieval refuses more, and ranking's
# retrieval_batch_size cannot ask for more.
MAX_RETRIEVE_MANY = 256


class RankingSettings(ServerSettings):
    """Ranking service settings."""

    port: int = _port(50052)
    metrics_port: int = _metrics_port(9092)
    retrieval_address: str = Field(
        "127.0.0.1:50051",
        min_length=1,
        description="host:port ([::1]:50051 for an IPv6 address), or dns:///name:port for "
        "round-robin over a headless Service.",
    )
    retrieval_timeout_s: float = Field(
        0.2,
        gt=0,
        le=3600,  # far longer reads as a deadline already past in gRPC
        description="Deadline of the call to retrieval (a Recommend's own deadline may cut it).",
    )
    retrieval_tls: TLSSettings = Field(
        TLSSettings(),
        description="Client TLS towards retrieval (ca_file, cert for mTLS); `recsys up` "
        "refuses one that does not match retrieval.tls.",
    )
    retrieval_auth_token: SecretStr | None = Field(
        None,
        description="Bearer token sent to retrieval (its auth_token; `recsys up` refuses "
        "a mismatch).",
    )
    # 32, not 16: under 64 closed-loop streams the wider call saved ~5% of
    # Recommend's CPU per request (same-session A/B); 64 measured the same as 32.
    retrieval_batch_size: int = Field(
        32,
        ge=1,
        le=MAX_RETRIEVE_MANY,
        description="Most concurrent Recommend calls whose retrieval goes out in one "
        "RetrieveMany call (1: one Retrieve call per Recommend). Tracing sends each "
        "request alone so its trace context travels with it.",
    )
    retrieval_batch_wait_ms: float = Field(
        2.0,
        ge=0,
        description="Longest a Recommend waits for company before its retrieval goes out; "
        "only taken while a RetrieveMany is in flight or the last one had company.",
    )
    # 2: one call running at retrieval and one queued behind it. Unbounded,
    # ~3.6 calls of ~7.5 requests were in flight, queued at retrieval in
    # turn. Bounded at 2: +3.5% Recommend throughput and 5-10% less CPU per
    # call in the two services (session 14, python -m bench.ab, 16 rounds);
    # 1 starves retrieval between calls, 3 measured the same as 2.
    retrieval_max_in_flight: int = Field(
        2,
        ge=0,
        description="Most RetrieveMany calls in flight from one ranking process (0: no "
        "bound). While that many are out, further Recommends gather into the next "
        "call instead of sending more small ones (a full batch still goes). With more "
        "retrieval replicas than ranking processes, raise it to about twice the "
        "retrieval replicas each ranking process spreads its calls over.",
    )
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where item vectors live and scoring runs; auto: a GPU if visible."
    )
    max_batch_size: int = Field(64, ge=1, description="Requests coalesced into one tower call.")
    batch_timeout_ms: float = Field(
        5.0,
        ge=0,
        description="Longest wait to fill a batch; only taken while another batch runs or "
        "the last one had company (a lone request on a quiet server runs at once).",
    )
    batch_runner: Literal["auto", "loop", "thread"] = Field(
        "auto",
        description="Where a micro-batch is scored: on the event loop (cheapest on a CPU), "
        "on a worker thread (keeps the loop free while a GPU works), or auto: loop on CPU, "
        "thread on GPU.",
    )
    tower_runtime: Literal["session", "eager"] = Field(
        "session",
        description="session: the user tower as a frozen graph run by a TF Session (CPU); "
        "eager: call the SavedModel signature.",
    )
    max_candidates: int = Field(
        10_000, ge=1, description="Most candidate (and excluded/recent) ids in one request."
    )
    default_k: int = Field(20, ge=1, description="Items returned when a request's k is 0.")
    max_k: int = Field(1000, ge=1, description="Largest k (top_k) a request may ask for.")

    @model_validator(mode="after")
    def _check_k(self) -> RankingSettings:
        # k = 0 gets the default unchecked: it must not exceed the cap.
        if self.default_k > self.max_k:
            raise ValueError(f"default_k: {self.default_k} is more than max_k {self.max_k}")
        _check_token(self.retrieval_auth_token, "retrieval_auth_token")
        return self


class TrainerSettings(_Strict):
    """Trainer hyper-parameters (CLI flags override them)."""

    objective: Literal["rating", "binary"] = Field(
        "rating", description="rating: MSE on scaled stars; binary: liked or not (sigmoid)."
    )
    hidden_units: list[int] = Field(
        default_factory=lambda: [256, 128], description="Hidden layer sizes of both towers."
    )
    embedding_dim: int = Field(32, ge=2, description="Width of the user and item vectors.")
    epochs: int = Field(30, ge=1, description="Most epochs (early stopping may end sooner).")
    batch_size: int = Field(256, ge=1, description="Training batch size.")
    learning_rate: float = Field(
        1e-3, gt=0, allow_inf_nan=False, description="Adam's learning rate."
    )
    patience: int = Field(
        3, ge=0, description="Epochs without validation improvement before stopping (0: never)."
    )
    seed: int = Field(
        0, ge=0, lt=2**32, description="Seed of weights and shuffling (the split has its own)."
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of ratings held out for evaluation."
    )
    annoy_trees: int = Field(
        10, ge=1, description="Annoy trees (with annoy_similar's search_k; see bench/retrieval.py)."
    )
    id_embeddings: bool = Field(False, description="Hybrid mode: add item id embeddings.")
    id_l2: float = Field(1e-5, ge=0, description="Hybrid mode: L2 penalty on the id offsets.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each hidden layer.")
    l2: float = Field(0.0, ge=0, description="L2 penalty on the towers' weights.")
    lr_plateau_factor: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Multiply the learning rate by this after an epoch without validation "
        "improvement (0: constant rate; needs patience > 0). The MovieLens 100K setup in "
        "docs/architecture.md uses 0.5 with dropout 0.2.",
    )
    negatives: int = Field(
        0,
        ge=0,
        le=100,
        description="Binary objective only: unrated items sampled per rating as 'not liked' "
        "examples, so the model learns which items a user would pick from the whole catalogue "
        "(top-N quality) rather than only how a watched item is rated. 0 trains on ratings alone.",
    )

    @model_validator(mode="after")
    def _plateau_needs_patience(self) -> TrainerSettings:
        # The plateau schedule watches the validation loss, which patience 0
        # leaves out: the factor was taken and silently never applied.
        if self.lr_plateau_factor > 0 and self.patience == 0:
            raise ValueError("lr_plateau_factor > 0 needs patience > 0 (a validation split)")
        return self


# --- experiments and tracing ----------------------------------------------------------

CURRENT_VERSION = "current"


class SourceOverride(_Strict):
    """A variant's change to one ``retrieval.sources`` entry (matched by name)."""

    enabled: bool = Field(True, description="False drops the source from the variant.")
    budget: int | None = Field(
        None,
        ge=1,
        description="The source's quota in the first pass; refill may take up to half as many "
        "again when filtering leaves the answer short.",
    )
    weight: float | None = Field(None, gt=0, description="Share of interleave turns.")
    timeout_ms: float | None = Field(None, gt=0, description="The source's own deadline.")


class VariantSettings(_Strict):
    """One arm of an A/B experiment."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$", description="Label on responses and metrics.")
    share: float = Field(ge=0, le=1, description="Fraction of users bucketed into this variant.")
    model_version: str = Field(
        CURRENT_VERSION,
        pattern=rf"^({CURRENT_VERSION}|[1-9][0-9]*)$",
        description="'current' follows the served version; a version number pins that version.",
    )
    sources: dict[str, SourceOverride] = Field(
        default_factory=dict, description="Overrides of retrieval.sources entries, by name."
    )


class ExperimentSettings(_Strict):
    """An A/B experiment; no variants means everyone gets variant ``default``."""

    name: str = Field("default", min_length=1, description="Salt of the bucketing hash.")
    variants: list[VariantSettings] = Field(
        default_factory=list,
        description="The arms: [[experiments.variants]] tables with name, share, "
        "model_version and sources overrides; shares sum to 1. Their order is part of "
        "the assignment (slices are laid out in it, so reordering moves users), and the "
        "first is the default variant (requests without a user id, SimilarItems without "
        "one).",
    )

    @model_validator(mode="after")
    def _check_variants(self) -> ExperimentSettings:
        if not self.variants:
            return self
        seen: set[str] = set()
        for i, v in enumerate(self.variants):
            if v.name in seen:
                raise ValueError(f"variants[{i}].name: duplicate variant name {v.name!r}")
            seen.add(v.name)
        total = sum(v.share for v in self.variants)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"variants[*].share: shares sum to {total:g}, they must sum to 1")
        return self


class TracingSettings(_Strict):
    """OpenTelemetry tracing; off by default, and then no span is created at all."""

    enabled: bool = Field(False, description="Record spans (off: no span is created).")
    exporter: Literal["otlp", "console"] = Field(
        "otlp", description="otlp: to a collector over gRPC; console: printed (debugging)."
    )
    endpoint: str | None = Field(
        None, description="OTLP gRPC endpoint; default $OTEL_EXPORTER_OTLP_ENDPOINT or :4317."
    )
    insecure: bool = Field(True, description="Plaintext to the collector (a sidecar).")
    sample_ratio: float = Field(1.0, ge=0, le=1, description="Share of new traces recorded.")


class RecsysSettings(BaseSettings):
    """Root configuration for every ``recsys`` component."""

    model_config = SettingsConfigDict(
        env_prefix="RECSYS_", env_nested_delimiter="__", extra="forbid", allow_inf_nan=False
    )

    model_dir: Path = Field(Path("var/models"), description="Root of numbered model versions.")
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="redis:// or rediss:// URL; may carry a password, so it is never logged.",
    )

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, v: SecretStr) -> SecretStr:
        from redis.connection import parse_url

        # Checked here, once: a URL the client cannot parse raised later from
        # deep inside redis-py with the password in its message.
        try:
            parse_url(v.get_secret_value())
        except ValueError:
            raise ValueError(
                "not a valid redis://, rediss:// or unix:// URL (characters such as "
                "# / ? @ in the password must be percent-encoded)"
            ) from None
        return v

    redis_timeout_s: float = Field(
        0.25,
        gt=0,
        le=3600,
        description="Connect timeout, and the longest wait for one Redis round trip; a user "
        "read waits at most half the time left on the request's deadline if that is shorter "
        "(ranking's batch read: its most patient caller's half; a caller whose own half runs "
        "out is ranked from request and default features). The services bound each round "
        "trip themselves; their client has no per-read socket timeout. A call that needs a "
        "new pooled connection opens it within the same wait: the TCP connect (and TLS "
        "handshake), then one round trip (HELLO; two with a database other than 0) before its "
        "own, so against a distant Redis keep it above three round trips (four with TLS).",
    )
    redis_max_connections: int = Field(
        64, ge=1, description="Connection pool bound of each service process."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Log level (any case)."
    )
    log_format: Literal["json", "text"] = Field(
        "json",
        description="json: one object per line; text: for a terminal, a line each with its "
        "fields as key=value.",
    )
    retrieval: RetrievalSettings = RetrievalSettings()
    ranking: RankingSettings = RankingSettings()
    trainer: TrainerSettings = TrainerSettings()
    experiments: ExperimentSettings = ExperimentSettings()
    tracing: TracingSettings = TracingSettings()

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get(CONFIG_ENV)
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> RecsysSettings:
    """Loads the configuration.

    Args:
        config_file: Optional TOML file; defaults to ``$RECSYS_CONFIG``.
        **overrides: Values that win over every other source (CLI flags).

    Returns:
        The validated settings.

    Raises:
        ConfigError: When the file is missing or malformed, or a value is invalid.
    """
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    path = Path(config_file) if config_file else None
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    _check_env_names(os.environ)
    old = os.environ.get(CONFIG_ENV)
    try:
        if path is not None:
            os.environ[CONFIG_ENV] = str(path)
        return RecsysSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from exc
    except SettingsError as exc:
        raise ConfigError(_describe_env_json(exc, os.environ)) from None
    finally:
        if path is not None:
            if old is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = old


class ConfigError(ValueError):
    """Raised for a configuration that cannot be used; the message names the field."""


def with_flags(settings: RecsysSettings, section: str, flags: Mapping[str, Any]) -> RecsysSettings:
    """``settings`` with one section's fields replaced by command-line flags, checked.

    Flags left at None keep the loaded value. The section is validated like
    the file and environment are (a ``model_copy`` would take ``--port -1``
    or ``--workers 100`` as they come).

    Raises:
        UserFacingError: A flag's value is refused; the message names the flag.
    """
    from pydantic import ValidationError

    from recsys.errors import UserFacingError

    updates = {k: v for k, v in flags.items() if v is not None}
    if not updates:
        return settings
    current = getattr(settings, section)
    try:
        checked = type(current).model_validate({**dict(current), **updates})
    except ValidationError as exc:
        problems = "; ".join(
            f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in exc.errors()
        )
        raise UserFacingError(f"invalid flag: {problems}") from None
    return settings.model_copy(update={section: checked})


def _check_env_names(environ: Mapping[str, str]) -> None:
    """Refuses a ``RECSYS_`` variable whose top-level name is no setting.

    pydantic-settings catches an unknown key below a section
    (``RECSYS_RANKING__MAX_BATCH_SIZ``) but silently ignores an unknown
    top-level name, so a typo such as ``RECSYS_RANKING_PINNED_VERSION`` (one
    underscore) would quietly leave a rollback pin unset.
    """
    fields = RecsysSettings.model_fields
    for name in environ:
        if not name.startswith("RECSYS_") or name in OTHER_ENV:
            continue
        top = name[len("RECSYS_") :].split("__", 1)[0].lower()
        if top not in fields:
            hint = next((f for f in fields if top.startswith(f + "_")), None)
            more = f" (did you mean RECSYS_{hint.upper()}__...?)" if hint else ""
            raise ConfigError(f"environment variable {name}: no setting {top!r}{more}")


def _takes_json(names: Sequence[str]) -> bool:
    """True when the setting at ``names`` is a list, table or section (JSON when in the env)."""
    model: Any = RecsysSettings
    field = None
    for name in names:
        fields = getattr(model, "model_fields", None)
        if not fields or name not in fields:
            return False
        field = fields[name]
        model = field.annotation
    if field is None:
        return False
    kind = typing.get_origin(model) or model
    return kind in (list, dict, tuple, set) or (
        isinstance(kind, type) and issubclass(kind, BaseModel)
    )


def _describe_env_json(exc: Exception, environ: Mapping[str, str]) -> str:
    """Names the variable whose list or table is not JSON (pydantic-settings names the section)."""
    for name, value in environ.items():
        if not name.startswith("RECSYS_") or name in OTHER_ENV:
            continue
        path = [p.lower() for p in name[len("RECSYS_") :].split("__")]
        if not _takes_json(path):
            continue
        try:
            json.loads(value)
        except ValueError:
            return (
                f"environment variable {name}: a list or table is written as JSON, "
                'such as [1, 2] or {"name": "x"} (its value is not shown: it may hold a token)'
            )
    return f"environment: {exc}"


def _describe(exc: Any, path: Path | None) -> str:
    where = f" (file {path})" if path else ""
    lines = [f"invalid configuration{where}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


@lru_cache(maxsize=1)
def default_settings() -> RecsysSettings:
    """Settings from the environment only, cached for library callers."""
    return load_settings()
