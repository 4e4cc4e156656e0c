"""TLS and mutual TLS for both services and the ranking→retrieval hop, with a throwaway CA."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import grpc
import pytest

from ranking_service.server import build_server as build_ranking
from ranking_service.testing import ranking_settings
from recsys.channels import create_channel
from recsys.cli import main as cli_main
from recsys.config import RetrievalSettings, TLSSettings, load_settings
from recsys.errors import UserFacingError
from recsys.loadtest import LoadConfig, run_load
from recsys.serving import create_server
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from retrieval_service.server import build_server as build_retrieval
from tests.conftest import issue_certificate

from .conftest import wait_serving

pytestmark = pytest.mark.asyncio(loop_scope="session")

RETRIEVAL = "recsys.v1.RetrievalService"
RANKING = "recsys.v1.RankingService"


@contextlib.asynccontextmanager
async def retrieval_server(model_dir, redis_url, tls, client_tls):
    settings = load_settings(
        model_dir=model_dir,
        redis_url=redis_url,
        log_format="text",
        retrieval={"port": 0, "metrics_port": 0, "reload_interval_s": 3600.0, "tls": tls},
    )
    handle, app = build_retrieval(settings)
    await app.start()
    address = f"127.0.0.1:{handle.port}"
    try:
        await wait_serving(address, RETRIEVAL, client_tls)
        yield address
    finally:
        await app.stop(0)


@contextlib.asynccontextmanager
async def ranking_server(model_dir, redis_url, client_tls, **cfg):
    srv = build_ranking(ranking_settings(model_dir, redis_url, retrieval_timeout_s=3.0, **cfg))
    await srv.start()
    address = f"127.0.0.1:{srv.port}"
    try:
        await wait_serving(address, RANKING, client_tls)
        yield address
    finally:
        await srv.stop(0)


def mutual_ranking(pki, model_dir, redis_url, retrieval_address: str):
    """Ranking over mutual TLS, presenting the client certificate to retrieval too."""
    client = pki.client_tls()
    return ranking_server(
        model_dir,
        redis_url,
        client,
        retrieval_address=retrieval_address,
        retrieval_tls=client,
        tls=pki.server_tls(mutual=True),
    )


async def similar(address: str, tls) -> retrieval_pb2.SimilarItemsResponse:
    async with create_channel(address, aio=True, tls=tls, max_attempts=1) as ch:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
        return await stub.SimilarItems(
            retrieval_pb2.SimilarItemsRequest(item_id="1", k=3), timeout=5
        )


async def refused(address: str, tls) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await similar(address, tls)
    return err.value


async def test_tls_retrieval_serves_tls_clients_and_refuses_plaintext(
    pki, published_version, redis_url
):
    client = pki.client_tls(with_cert=False)
    async with retrieval_server(
        published_version.parent, redis_url, pki.server_tls(mutual=False), client
    ) as address:
        assert len((await similar(address, client)).items) == 3
        # A plaintext client never gets an answer from a TLS port.
        assert (await refused(address, None)).code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_clients_without_a_valid_cert(pki, published_version, redis_url):
    async with retrieval_server(
        published_version.parent, redis_url, pki.server_tls(mutual=True), pki.client_tls()
    ) as address:
        assert len((await similar(address, pki.client_tls())).items) == 3
        for tls in (pki.client_tls(with_cert=False), pki.client_tls(rogue=True), None):
            assert (await refused(address, tls)).code() == grpc.StatusCode.UNAVAILABLE


def _encrypted_key(pki, path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )


@pytest.mark.parametrize(
    ("field", "path", "problem"),
    [
        pytest.param("cert_file", "{tmp}/nope.crt", "no such file or directory", id="missing"),
        pytest.param("cert_file", "{tmp}", "is a directory", id="directory"),
        pytest.param("cert_file", "{tmp}/garbage.pem", "holds no PEM certificate", id="not PEM"),
        pytest.param("cert_file", "{server_key}", "holds no PEM certificate", id="key as cert"),
        pytest.param("key_file", "{tmp}/garbage.pem", "holds no PEM private key", id="bad key"),
        pytest.param(
            "key_file", "{client_key}", "not the key of retrieval.tls.cert_file", id="other key"
        ),
        pytest.param("key_file", "{tmp}/encrypted.key", "encrypted", id="encrypted key"),
        # Read as no CA at all, it turned mutual TLS off: clients without a
        # certificate were served.
        pytest.param("ca_file", "{tmp}/empty.pem", "holds no PEM certificate", id="empty CA"),
        pytest.param("ca_file", "{tmp}/garbage.pem", "holds no PEM certificate", id="not PEM CA"),
    ],
)
async def test_an_unusable_tls_file_is_refused_at_start_naming_the_setting(
    pki, tmp_path, field, path, problem
):
    """Before, a traceback, "cannot listen on ...: Failed to bind to address", or a
    server without the client check."""
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    (tmp_path / "empty.pem").write_bytes(b"")
    _encrypted_key(pki, tmp_path / "encrypted.key")
    bad = Path(path.format(tmp=tmp_path, server_key=pki.server_key, client_key=pki.client_key))
    tls = pki.server_tls(mutual=True).model_copy(update={field: bad})
    settings = RetrievalSettings(host="127.0.0.1", port=0, metrics_port=0, tls=tls)
    with pytest.raises(UserFacingError) as err:
        create_server(settings, label="retrieval", service_names=["x"], register=lambda s: None)
    assert str(err.value).startswith(f"retrieval.tls.{field}: {bad}: {problem}"), err.value


@pytest.mark.parametrize("content", [None, "not a certificate\n"], ids=["missing", "not PEM"])
async def test_ranking_refuses_an_unusable_retrieval_ca_at_start(tmp_path, content):
    """Before, a traceback (missing), or a ranking that reported SERVING and
    answered every Recommend with the popular fallback (not PEM)."""
    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_text(content)
    settings = ranking_settings(
        tmp_path, "redis://127.0.0.1:1/0", retrieval_tls=TLSSettings(ca_file=ca)
    )
    with pytest.raises(UserFacingError, match=f"^ranking.retrieval_tls.ca_file: {ca}: "):
        build_ranking(settings)


@contextlib.asynccontextmanager
async def bare_server(tls: TLSSettings):
    """A started server with only health, on ``tls``, its health SERVING; yields its address."""
    settings = RetrievalSettings(host="127.0.0.1", port=0, metrics_port=0, tls=tls)
    handle = create_server(settings, label="retrieval", service_names=[], register=lambda s: None)
    await handle.server.start()
    try:
        await handle.set_serving(True)
        yield f"127.0.0.1:{handle.port}"
    finally:
        await handle.server.stop(0)


async def test_a_1024_bit_rsa_key_is_not_refused_at_start(tmp_path):
    """Refused as "not a usable private key" (Python's OpenSSL checks at security
    level 2, which a SHA-1 signature fails too), though gRPC serves with it."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    ca, ca_path, _ = issue_certificate(tmp_path, "ca", "recsys test CA", ca=True)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    _, cert, key = issue_certificate(tmp_path, "server", "recsys server", ca, server=True, key=weak)
    async with bare_server(TLSSettings(cert_file=cert, key_file=key)) as address:
        await wait_serving(address, "", TLSSettings(ca_file=ca_path), timeout_s=10)


async def test_a_ca_bundle_with_utf8_labels_is_not_refused_at_start(pki, tmp_path):
    """Bundles name each certificate above its block (curl's cacert.pem, in UTF-8):
    refused as "holds no PEM certificate", though gRPC reads them."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("Certificat racine de Zürich\n=====\n".encode() + pki.ca.read_bytes())
    tls = pki.server_tls(mutual=True).model_copy(update={"ca_file": bundle})
    async with bare_server(tls) as address:
        await wait_serving(address, "", pki.client_tls(), timeout_s=10)


async def test_recommend_end_to_end_over_mutual_tls(pki, published_version, redis_url):
    model_dir = published_version.parent
    client = pki.client_tls()
    async with retrieval_server(
        model_dir, redis_url, pki.server_tls(mutual=True), client
    ) as r_addr:
        # The hop presents the ranking service's client certificate to retrieval.
        async with mutual_ranking(pki, model_dir, redis_url, r_addr) as k_addr:
            async with create_channel(k_addr, aio=True, tls=client) as ch:
                stub = ranking_pb2_grpc.RankingServiceStub(ch)
                resp = await stub.Recommend(
                    ranking_pb2.RecommendRequest(user={"user_id": "1"}, k=5), timeout=10
                )
            assert not resp.retrieval_fallback, resp.fallback_reason
            assert len(resp.items) == 5 and resp.index_version == published_version.name
            assert {s.source for s in resp.source_reports} >= {"popular"}
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async with create_channel(
                    k_addr, aio=True, tls=pki.client_tls(with_cert=False), max_attempts=1
                ) as ch:
                    await ranking_pb2_grpc.RankingServiceStub(ch).Recommend(
                        ranking_pb2.RecommendRequest(user={"user_id": "1"}, k=5), timeout=5
                    )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # A hop without the client certificate is refused by retrieval: ranking says so.
        async with ranking_server(
            model_dir,
            redis_url,
            None,
            retrieval_address=r_addr,
            retrieval_tls=pki.client_tls(with_cert=False),
        ) as k_addr:
            async with grpc.aio.insecure_channel(k_addr) as ch:
                resp = await ranking_pb2_grpc.RankingServiceStub(ch).Recommend(
                    ranking_pb2.RecommendRequest(user={"user_id": "1"}, k=5), timeout=10
                )
            assert resp.retrieval_fallback and "UNAVAILABLE" in resp.fallback_reason


def _tls_flags(tls) -> list[str]:
    flags = ["--tls-ca", str(tls.ca_file)]
    if tls.cert_file is not None:
        flags += ["--tls-cert", str(tls.cert_file), "--tls-key", str(tls.key_file)]
    return flags


async def test_loadtest_reaches_a_tls_server_only_over_tls(pki, published_version, redis_url):
    client = pki.client_tls(with_cert=False)
    async with retrieval_server(
        published_version.parent, redis_url, pki.server_tls(mutual=False), client
    ) as address:
        base = {"rpc": "SimilarItems", "target": address, "item_ids": ["1", "2", "3"],
                "concurrency": 2, "requests": 12, "duration_s": None, "k": 3}  # fmt: skip
        report = await run_load(LoadConfig(**base, tls=client))
        assert (report.ok, report.errors, report.tls) == (12, {}, True)
        assert "TLS channel(s)" in report.table()
        # Plaintext to the same port: every call fails, and the report says how.
        plain = await run_load(LoadConfig(**{**base, "requests": 4}, timeout_s=2.0))
        assert plain.ok == 0 and plain.errors == {"UNAVAILABLE": 4}, plain.errors
        assert not plain.tls and "plaintext channel(s)" in plain.table()


async def test_cli_recommend_and_loadtest_over_mutual_tls(
    pki, published_version, redis_url, capsys
):
    model_dir = published_version.parent
    client = pki.client_tls()
    async with (
        retrieval_server(model_dir, redis_url, pki.server_tls(mutual=True), client) as r_addr,
        mutual_ranking(pki, model_dir, redis_url, r_addr) as k_addr,
    ):
        capsys.readouterr()
        rec = ["recommend", "--user", "1", "--k", "5", "--target", k_addr, "--json"]
        assert await asyncio.to_thread(cli_main, [*rec, *_tls_flags(client)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert len(out["items"]) == 5 and not out["retrieval_fallback"]

        load = ["loadtest", "--target", k_addr, "--requests", "6", "--concurrency", "2",
                "--json", "--model-dir", str(model_dir)]  # fmt: skip
        assert await asyncio.to_thread(cli_main, [*load, *_tls_flags(client)]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert (doc["ok"], doc["errors"], doc["tls"]) == (6, {}, True)

        # Without the client certificate the handshake is refused: a clear failure.
        no_cert = _tls_flags(pki.client_tls(with_cert=False))
        assert await asyncio.to_thread(cli_main, [*rec, *no_cert]) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err


async def test_the_container_health_check_speaks_mutual_tls(pki):
    """Kubernetes' native gRPC probes cannot: a TLS deployment probes with this script."""
    import asyncio
    import importlib.util
    from pathlib import Path

    from recsys.config import RetrievalSettings
    from recsys.serving import create_server

    path = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"
    spec = importlib.util.spec_from_file_location("healthcheck", path)
    hc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hc)
    settings = RetrievalSettings(
        host="127.0.0.1", port=0, metrics_port=0, tls=pki.server_tls(mutual=True)
    )
    handle = create_server(settings, label="hc-tls", service_names=["x"], register=lambda s: None)
    await handle.server.start()
    await handle.set_serving(True)
    address = f"127.0.0.1:{handle.port}"
    good = {"tls_ca": str(pki.ca), "tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)}
    try:
        assert await asyncio.to_thread(hc.check, address, "", 5.0, **good) == 0
        # The probe's address is not the certificate's name: the override says which is.
        named = {**good, "tls_server_name": "localhost"}
        assert await asyncio.to_thread(hc.check, f"localhost:{handle.port}", "", 5.0, **named) == 0
        assert await asyncio.to_thread(hc.check, address, "", 5.0) == 2  # plaintext: no answer
        no_cert = {"tls_ca": str(pki.ca)}
        assert await asyncio.to_thread(hc.check, address, "", 5.0, **no_cert) == 2
    finally:
        await handle.server.stop(None)
