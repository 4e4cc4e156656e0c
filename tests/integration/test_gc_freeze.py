"""Each service moves its long-lived heap out of the collector after a load.

Without ``gc.freeze()`` every full collection in the ranking process walks
TensorFlow's and the version's objects: ~150 ms pauses under load that
stall every in-flight call and push the ranking → retrieval hop past its
timeout. The check, per service: with nothing frozen beforehand, serving a
version leaves objects in the permanent generation.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from ranking_service.server import build_server
from ranking_service.testing import ranking_settings, wait_serving
from recsys.channels import wait_serving as wait_for
from recsys.config import RetrievalSettings


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()  # leave the test process as other modules expect it


async def test_ranking_freezes_after_loading(unfrozen, published: Path, redis_server):
    srv = build_server(ranking_settings(published.parent, redis_server.url))
    await srv.start()
    try:
        await wait_serving(f"127.0.0.1:{srv.port}")
        assert gc.get_freeze_count() > 10_000
    finally:
        await srv.stop(0)


async def test_retrieval_freezes_after_loading(unfrozen, published: Path, redis_server):
    from retrieval_service.server import build_server as build_retrieval

    base = ranking_settings(published.parent, redis_server.url)
    cfg = base.model_copy(
        update={"retrieval": RetrievalSettings(host="127.0.0.1", port=0, metrics_port=0)}
    )
    handle, app = build_retrieval(cfg)
    await app.start()
    try:
        await wait_for(f"127.0.0.1:{handle.port}", "recsys.v1.RetrievalService", timeout_s=30)
        assert gc.get_freeze_count() > 10_000
    finally:
        await app.stop(0)
