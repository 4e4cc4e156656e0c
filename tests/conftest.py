"""Fixtures shared by every test: a real Redis on a free loopback port, a throwaway PKI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from recsys.config import TLSSettings
from recsys.embedded_redis import EmbeddedRedis

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


def ipv6_loopback() -> bool:
    """True when this machine can bind ``::1`` (CI containers may have IPv6 off)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Undoes what a test's ``serve`` run did to root logging.

    ``configure_logging`` gives the root logger a handler on the ``sys.stderr``
    of that moment, which under ``capsys`` is a capture stream closed when the
    test ends; a later test that logs would print "Logging error" tracebacks.
    Its capture of warnings into logging is undone too.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server child process for the whole session."""
    server = EmbeddedRedis().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of an empty Redis database (flushed before each test)."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@dataclass
class Pki:
    """PEM paths: a CA, a server cert for 127.0.0.1/localhost, clients good and rogue."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path

    def server_tls(self, mutual: bool) -> TLSSettings:
        return TLSSettings(
            cert_file=self.server_cert,
            key_file=self.server_key,
            ca_file=self.ca if mutual else None,
            require_client_cert=mutual,
        )

    def client_tls(self, with_cert: bool = True, rogue: bool = False) -> TLSSettings:
        if not with_cert:
            return TLSSettings(ca_file=self.ca)
        cert, key = (
            (self.rogue_cert, self.rogue_key) if rogue else (self.client_cert, self.client_key)
        )
        return TLSSettings(ca_file=self.ca, cert_file=cert, key_file=key)


def issue_certificate(
    out: Path,
    name: str,
    subject_cn: str,
    issuer=None,
    *,
    ca: bool = False,
    server=False,
    key=None,
):
    """A certificate and its key: ``key``, or a new P-256 one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    issuer_name, issuer_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return (cert, key), cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """A throwaway CA and the certificates it issued, made once per run."""
    out = tmp_path_factory.mktemp("pki")
    ca, ca_path, _ = issue_certificate(out, "ca", "recsys test CA", ca=True)
    _, server_cert, server_key = issue_certificate(out, "server", "recsys server", ca, server=True)
    _, client_cert, client_key = issue_certificate(out, "client", "ranking", ca)
    other_ca, _, _ = issue_certificate(out, "other-ca", "someone else's CA", ca=True)
    _, rogue_cert, rogue_key = issue_certificate(out, "rogue", "intruder", other_ca)
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key)


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """MovieLens 100K from ../shared/data, or skip."""
    path = SHARED_DATA / "ml-100k"
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found at {path}")
    return path


@pytest.fixture(scope="session")
def ml_latest_small_dir() -> Path:
    """MovieLens latest-small from ../shared/data, or skip."""
    path = SHARED_DATA / "ml-latest-small"
    if not (path / "ratings.csv").is_file():
        pytest.skip(f"MovieLens latest-small not found at {path}")
    return path


# --- trained model versions (trainer) ------------------------------------------


def _train_version(
    model_dir: Path,
    *,
    seed: int = 0,
    n_users: int = 300,
    n_items: int = 250,
    n_ratings: int = 15_000,
    n_countries: int = 3,
    epochs: int = 3,
    data_seed: int = 0,
    **config,
) -> Path:
    """Trains a small two-tower model on synthetic data and exports a version."""
    from trainer.synthetic import generate
    from trainer.train import TrainConfig, train

    data = generate(n_users, n_items, n_ratings, n_countries, data_seed)
    options = {"hidden_units": (64, 32), "annoy_trees": 10, "patience": 0, **config}
    cfg = TrainConfig(seed=seed, epochs=epochs, **options)
    return train(data, model_dir, cfg, evaluate=False, quiet=True).version_dir


@pytest.fixture(scope="session")
def train_version():
    """Callable ``train_version(model_dir, seed=..., epochs=..., **TrainConfig fields) -> Path``.

    Makes a further real version quickly (a few seconds), e.g. for hot-reload tests.
    """
    return _train_version


@pytest.fixture(scope="session")
def trained_version(tmp_path_factory) -> Path:
    """A complete version (300 users, 250 items, 15k ratings) under a session model dir."""
    return _train_version(tmp_path_factory.mktemp("models"))


@pytest.fixture
def published_version(redis_url: str, trained_version: Path) -> Path:
    """``trained_version`` published into the (flushed) test Redis; returns its path."""
    import redis

    from trainer.publish import publish

    client = redis.Redis.from_url(redis_url)
    try:
        publish(trained_version, client, quiet=True)
    finally:
        client.close()
    return trained_version


@pytest.fixture(scope="session")
def publish_fresh(redis_server):
    """Callable ``publish_fresh(version_dir) -> version_dir``: flushes the test Redis, publishes."""
    import redis

    from trainer.publish import publish

    def run(version_dir: Path) -> Path:
        client = redis.Redis.from_url(redis_server.url)
        try:
            client.flushall()
            publish(version_dir, client, quiet=True)
        finally:
            client.close()
        return version_dir

    return run


@pytest.fixture(scope="module")
def published(publish_fresh, trained_version: Path) -> Path:
    """``trained_version`` published once per test module into a flushed Redis.

    Cheaper than ``published_version`` for modules whose tests use distinct
    user ids and so need no flush between tests.
    """
    return publish_fresh(trained_version)


@pytest.fixture(scope="module")
def mv(published: Path):
    """The ``published`` version opened through the verifying reader."""
    from recsys.artifacts import ModelVersion

    return ModelVersion.open(published)
