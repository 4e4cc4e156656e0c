"""A binary-objective version (trained with sampled negatives) served by the ranking service.

The rating objective is covered by ``test_ranking_service.py``. Here the
scores must be probabilities: the Keras model's own sigmoid head on the same
(user, item) pairs, to 1e-4, for known users read from a real Redis.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from ranking_service.server import build_server
from ranking_service.testing import Reference, ranking_settings, wait_serving
from recsys.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc

TOL = 1e-4


@pytest.fixture(scope="module")
def binary_version(tmp_path_factory, train_version, publish_fresh):
    return publish_fresh(
        train_version(
            tmp_path_factory.mktemp("binary_models"), objective="binary", negatives=2, epochs=2
        )
    )


@pytest.fixture(scope="module")
async def stub(binary_version, redis_server):
    srv = build_server(ranking_settings(binary_version.parent, redis_server.url))
    await srv.start()
    await wait_serving(f"127.0.0.1:{srv.port}")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        yield ranking_pb2_grpc.RankingServiceStub(ch)
    await srv.stop(0)


def _keras_probabilities(version_dir, user_features, item_rows):
    """The trained Keras model's sigmoid head, rebuilt from the exported towers and target."""
    import tensorflow as tf

    from recsys import artifacts as A

    mv = A.ModelVersion.open(version_dir)
    user = tf.saved_model.load(str(version_dir / A.USER_TOWER)).signatures["serving_default"]
    item = tf.saved_model.load(str(version_dir / A.ITEM_TOWER)).signatures["serving_default"]
    u = user(features=tf.constant(np.asarray(user_features, np.float32)[None, :]))["embedding"]
    feats = np.asarray(mv.item_features, np.float32)[item_rows]
    v = item(features=tf.constant(feats))["embedding"]
    dots = tf.linalg.matvec(v, u[0]).numpy().astype(np.float64)
    t = mv.manifest["target"]
    return 1.0 / (1.0 + np.exp(-(t["logit_scale"] * dots + t["logit_bias"])))


async def test_binary_scores_are_the_models_probabilities(stub, binary_version):
    ref = Reference(binary_version)
    mv = ref.mv
    assert mv.manifest["target"]["objective"] == "binary"
    assert mv.manifest["training"]["negatives"] == 2
    rng = np.random.default_rng(7)
    for uid in mv.users["user_id"][:4]:
        rows = rng.choice(len(mv.item_ids), 60, replace=False)
        cands = [mv.item_ids[r] for r in rows]
        req = ranking_pb2.RankRequest(
            user=common_pb2.UserContext(user_id=uid),
            candidate_item_ids=cands,
            top_k=60,
            include_watched=True,
        )
        resp = await stub.Rank(req, timeout=10)
        assert len(resp.items) == 60
        got = {it.item_id: it.score for it in resp.items}
        assert all(0.0 < s < 1.0 for s in got.values())
        want = _keras_probabilities(binary_version, ref.known_user_features(uid), rows)
        np.testing.assert_allclose([got[i] for i in cands], want, atol=TOL)
        # Best first, by probability.
        scores = [it.score for it in resp.items]
        assert scores == sorted(scores, reverse=True)
