"""Broken model versions are refused at load, with a message naming the problem, and the
running version keeps serving (both services, real trained version, real servers).

``tests/integration/test_ranking_reload.py`` already covers a flipped byte
under load for ranking; this adds the other kinds of damage, for both services.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from ranking_service.testing import ranking_settings
from recsys import artifacts as A
from recsys import redis_keys
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

from .conftest import retrieval_settings, serving_ranking, serving_retrieval

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _rewrite_manifest(root: Path, rel: str) -> None:
    """Makes the manifest agree with a replaced file (only the content is wrong)."""
    manifest = json.loads((root / A.MANIFEST).read_text())
    manifest["files"][rel] = {
        "sha256": A.sha256_file(root / rel),
        "bytes": (root / rel).stat().st_size,
    }
    (root / A.MANIFEST).write_text(json.dumps(manifest))


def truncate_savedmodel(root: Path) -> None:
    pb = root / "user_tower" / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[: pb.stat().st_size // 2])


def truncate_savedmodel_resummed(root: Path) -> None:
    rel = "user_tower/variables/variables.data-00000-of-00001"
    data = root / rel
    data.write_bytes(data.read_bytes()[:16])
    _rewrite_manifest(root, rel)


def wrong_checksum(root: Path) -> None:
    vec = root / A.ITEM_VECTORS
    data = bytearray(vec.read_bytes())
    data[-5] ^= 0x33
    vec.write_bytes(bytes(data))


def missing_file(root: Path) -> None:
    (root / "items.json").unlink()


def foreign_annoy(root: Path) -> None:
    from annoy import AnnoyIndex

    dim = np.load(root / A.ITEM_VECTORS, mmap_mode="r", allow_pickle=False).shape[1]
    index = AnnoyIndex(dim, "angular")
    rng = np.random.default_rng(1)
    for i in range(100):
        index.add_item(i, rng.normal(size=dim).tolist())
    index.build(2)
    index.save(str(root / A.ANNOY_INDEX))
    _rewrite_manifest(root, A.ANNOY_INDEX)


def short_titles(root: Path) -> None:
    meta = json.loads((root / "items.json").read_text())
    meta["title"] = meta["title"][:-3]
    (root / "items.json").write_text(json.dumps(meta))
    _rewrite_manifest(root, "items.json")


def newer_schema(root: Path) -> None:
    manifest = json.loads((root / A.MANIFEST).read_text())
    manifest["schema_version"] = A.SCHEMA_VERSION + 1
    (root / A.MANIFEST).write_text(json.dumps(manifest))


COMMON: list[tuple[str, Callable[[Path], None], str]] = [
    ("truncated SavedModel", truncate_savedmodel, "user_tower/saved_model.pb has"),
    ("wrong checksum", wrong_checksum, "checksum mismatch for item_vectors.npy"),
    ("missing file", missing_file, "file items.json is missing"),
    ("newer schema", newer_schema, "newer than this code supports"),
]
# Retrieval reads the Annoy index, ranking the towers: each checks what it loads.
RETRIEVAL_ONLY = [
    ("Annoy index from another version", foreign_annoy, "holds 100 items, catalogue has"),
]
RANKING_ONLY = [
    ("items.json short of titles, manifest re-summed", short_titles, "titles for"),
    ("SavedModel truncated, manifest re-summed", truncate_savedmodel_resummed, "SavedModel"),
]


def install(src: Path, model_dir: Path, name: str, damage: Callable[[Path], None] | None) -> None:
    tmp = model_dir / f".tmp-{name}"
    shutil.copytree(src, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    manifest["version"] = name  # numbered as its directory, as the writer does
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    if damage is not None:
        damage(tmp)
    os.rename(tmp, model_dir / name)  # appears whole, as the trainer's writer does


async def reject_each(watcher, model_dir: Path, src: Path, cases, still_serving) -> None:
    for n, (label, damage, expected) in enumerate(cases, start=2):
        install(src, model_dir, str(n), damage)
        deadline = time.monotonic() + 60
        while str(n) not in watcher.rejected:
            assert time.monotonic() < deadline, f"{label}: version {n} never rejected"
            await asyncio.sleep(0.05)
        message = watcher.rejected[str(n)]
        assert expected in message, f"{label}: {message}"
        assert watcher.current == "1", label
        assert await still_serving() == "1", label


async def similar_items_version(ch: grpc.aio.Channel) -> str:
    """The version retrieval's SimilarItems answers from (asserting it answers)."""
    stub = retrieval_pb2_grpc.RetrievalServiceStub(ch)
    r = await stub.SimilarItems(retrieval_pb2.SimilarItemsRequest(item_id="1", k=3), timeout=5)
    assert len(r.items) == 3
    return r.index_version


async def rank_version(ch: grpc.aio.Channel) -> str:
    """The version ranking's Rank answers from (asserting it answers)."""
    stub = ranking_pb2_grpc.RankingServiceStub(ch)
    request = ranking_pb2.RankRequest(candidate_item_ids=["1", "2", "3"], top_k=2)
    r = await stub.Rank(request, timeout=5)
    assert len(r.items) == 2
    return r.model_version


# Per service: its settings, how to start it, what proves it serves, its own damage cases.
SERVICES = {
    "retrieval": (retrieval_settings, serving_retrieval, similar_items_version, RETRIEVAL_ONLY),
    "ranking": (ranking_settings, serving_ranking, rank_version, RANKING_ONLY),
}


@pytest.mark.parametrize("service", list(SERVICES))
async def test_service_refuses_broken_versions_and_keeps_serving(
    service, trained_version, tmp_path, rel_redis
):
    settings_for, serving, version_of, own_cases = SERVICES[service]
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    install(trained_version, model_dir, "1", None)
    # Redis up but nothing published: the watcher follows the newest version on disk.
    client = redis.Redis.from_url(rel_redis.url)
    client.delete(redis_keys.CURRENT_VERSION)
    client.close()
    settings = settings_for(model_dir, rel_redis.url, reload_interval_s=0.1)
    async with (
        serving(settings) as (address, server),
        grpc.aio.insecure_channel(address) as ch,
    ):
        await reject_each(
            server.watcher,
            model_dir,
            trained_version,
            COMMON + own_cases,
            lambda: version_of(ch),
        )
