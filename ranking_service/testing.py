"""Synthetic model versions for tests and benchmarks of the ranking service.

Writes a complete, checksummed version through :class:`recsys.artifacts.VersionWriter`
with small random-weight towers (no training), so the serving path can be
exercised at any catalogue size, e.g. the 1M-item benchmark. Real behaviour
is tested against versions the trainer produced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recsys import artifacts as A
from recsys.config import RankingSettings, RecsysSettings
from recsys.embedded_redis import free_port
from recsys.features import FeatureSpec, TargetScale, item_feature_matrix

SERVICE = "recsys.v1.RankingService"

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi")
COUNTRIES = ("us-east", "us-west", "eu")
SPEC = FeatureSpec(
    genres=GENRES, countries=COUNTRIES, genders=("F", "M"), occupations=("other", "student")
)


def _save_tower(path: Path, n_in: int, dim: int, seed: int) -> None:
    import tensorflow as tf

    rng = np.random.default_rng(seed)

    class Tower(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = tf.Variable(rng.normal(0, 0.3, (n_in, 64)).astype(np.float32))
            self.w2 = tf.Variable(rng.normal(0, 0.3, (64, dim)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, n_in], tf.float32)])
        def serve(self, features):
            x = tf.tanh(tf.matmul(features * 0.1, self.w1))
            return {A.OUTPUT_KEY: tf.math.l2_normalize(tf.matmul(x, self.w2), axis=1)}

    tower = Tower()
    tf.saved_model.save(tower, str(path), signatures={A.SIGNATURE: tower.serve})


def embed(path: Path, features: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Runs a tower SavedModel over ``features`` in chunks."""
    import tensorflow as tf

    sig = tf.saved_model.load(str(path)).signatures[A.SIGNATURE]
    parts = [
        sig(**{A.INPUT_KEY: tf.constant(features[i : i + chunk])})[A.OUTPUT_KEY].numpy()
        for i in range(0, features.shape[0], chunk)
    ]
    return np.concatenate(parts).astype(np.float32)


def write_synthetic_version(
    model_dir: str | Path,
    *,
    n_items: int = 500,
    n_users: int = 50,
    dim: int = 16,
    seed: int = 0,
    annoy_trees: int = 2,
    objective: str = "rating",
    two_tower=None,
) -> Path:
    """Writes one synthetic version under ``model_dir`` and returns its path.

    Args:
        model_dir: Root of numbered versions.
        n_items: Catalogue size.
        n_users: Known users (all without history).
        dim: Embedding width of the random towers.
        seed: Seeds the catalogue and the random towers.
        annoy_trees: Trees of the Annoy index (few: only retrieval reads it).
        objective: Target scale of the manifest.
        two_tower: A ``trainer.model.TwoTower`` built on :data:`SPEC`; when
            given, its towers are exported (with the trainer's exporter)
            instead of random ones, so a benchmark can compare the served
            path with the full Keras model on the same weights.
    """
    from trainer.export import build_annoy

    rng = np.random.default_rng(seed)
    spec = SPEC
    g = len(GENRES)
    item_ids = [f"i{k}" for k in range(n_items)]
    genres = (rng.random((n_items, g)) < 0.3).astype(np.uint8)
    years = rng.integers(1950, 2020, n_items).astype(np.float64)
    counts = rng.integers(0, 200, n_items).astype(np.float64)
    sums = counts * rng.uniform(1, 5, n_items)
    item_feats = item_feature_matrix(
        spec, genre_matrix=genres, year=years, rating_count=counts, rating_sum=sums
    )
    user_ids = [f"u{k}" for k in range(n_users)]
    agg = np.zeros((n_users, 3 + 3 * g))
    target = TargetScale(objective=objective)  # type: ignore[arg-type]
    with A.VersionWriter(model_dir) as w:
        if two_tower is None:
            _save_tower(w.path / A.USER_TOWER, spec.n_user_features, dim, seed + 1)
            _save_tower(w.path / A.ITEM_TOWER, spec.n_item_features, dim, seed + 2)
            vectors = embed(w.path / A.ITEM_TOWER, item_feats)
        else:
            from trainer.export import save_tower
            from trainer.model import embed as embed_keras

            save_tower(two_tower.user_tower, w.path / A.USER_TOWER)
            save_tower(two_tower.item_tower, w.path / A.ITEM_TOWER)
            vectors = embed_keras(two_tower.item_tower, item_feats)
        w.write_json(A.ITEM_IDS, item_ids)
        w.write_npy(A.ITEM_VECTORS, vectors)
        w.write_npy(A.ITEM_GENRES, genres)
        w.write_npy(A.ITEM_FEATURES, item_feats)
        w.write_json(A.ITEMS_META, {"title": [f"Item {k}" for k in range(n_items)],
                                    "year": years.astype(int).tolist()})  # fmt: skip
        build_annoy(vectors, w.path / A.ANNOY_INDEX, trees=annoy_trees, n_jobs=1)
        order = np.argsort(-counts)[: min(n_items, 200)]
        w.write_json(
            A.TOP_LISTS,
            {
                "popular": [[item_ids[r], float(counts[r])] for r in order],
                "genre": {},
                "country": {},
            },
        )
        w.write_json(
            A.USERS,
            {
                "user_id": user_ids,
                "age": [None] * n_users,
                "gender": [None] * n_users,
                "occupation": [None] * n_users,
                "country": [None] * n_users,
                "history": [[] for _ in user_ids],
            },
        )
        w.write_npy(A.USER_AGGREGATES, agg)
        w.write_npy(A.USER_FEATURES, np.zeros((n_users, spec.n_user_features), np.float32))
        return w.commit(
            {
                "dataset": {"name": "synthetic-ranking", "sha256": "", "sizes": {}},
                "feature_spec": spec.to_dict(),
                "target": target.to_dict(),
                "model": {"embedding_dim": dim, "synthetic": True},
                "annoy": {"metric": "angular", "trees": annoy_trees},
                "metrics": {},
            }
        )


# --- integration-test helpers ----------------------------------------------------


def ranking_settings(model_dir: Path, redis_url: str, **ranking) -> RecsysSettings:
    """Settings for a test server: loopback, free port, no metrics, CPU, fast reloads."""
    cfg = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "reload_interval_s": 0.2,
        "device": "cpu",
        "retrieval_address": f"127.0.0.1:{free_port()}",  # closed unless a test says otherwise
        **ranking,
    }
    return RecsysSettings(
        model_dir=model_dir,
        redis_url=redis_url,
        log_format="text",
        ranking=RankingSettings(**cfg),
    )


class Reference:
    """The full two-tower model computed independently from the version's files."""

    def __init__(self, version_dir: Path):
        import tensorflow as tf

        self.mv = A.ModelVersion.open(version_dir)
        self._user = tf.saved_model.load(str(version_dir / A.USER_TOWER)).signatures[
            "serving_default"
        ]
        item = tf.saved_model.load(str(version_dir / A.ITEM_TOWER)).signatures["serving_default"]
        feats = tf.constant(np.asarray(self.mv.item_features, np.float32))
        # Item tower recomputed from item_features.npy, not read from item_vectors.npy.
        self.items = item(features=feats)["embedding"].numpy()
        self.row = {iid: i for i, iid in enumerate(self.mv.item_ids)}

    def user_vector(self, features: np.ndarray) -> np.ndarray:
        """User tower on one feature vector."""
        import tensorflow as tf

        out = self._user(features=tf.constant(np.asarray(features, np.float32)[None, :]))
        return out["embedding"].numpy()[0]

    def scores(self, features: np.ndarray, item_ids: list[str]) -> np.ndarray:
        """Target-scale predictions for one user and the given items."""
        u = self.user_vector(features)
        rows = [self.row[i] for i in item_ids]
        return self.mv.target.from_model(self.items[rows] @ u)

    def known_user_features(self, user_id: str) -> np.ndarray:
        """The features the trainer fed the user tower for a known user."""
        row = self.mv.users["user_id"].index(user_id)
        return np.asarray(self.mv.user_features[row])


async def serve_retrieval_stand_in(servicer, server=None) -> tuple[object, int]:
    """Starts ``servicer`` (a RetrievalService implementation) on a free loopback port.

    What ranking's hop, or a client under test, calls in place of the real
    service. ``server`` brings its own options or interceptors (a plain
    ``grpc.aio.server()`` otherwise).

    Returns:
        The started server (the caller stops it) and its port.
    """
    import grpc

    from recsys.v1 import retrieval_pb2_grpc

    server = server if server is not None else grpc.aio.server()
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def wait_serving(address: str, timeout_s: float = 60.0) -> None:
    """Waits until the ranking service at ``address`` reports SERVING."""
    from recsys.channels import wait_serving as wait_for

    await wait_for(address, SERVICE, timeout_s=timeout_s)


async def health(address: str) -> int:
    """Health status of the ranking service at ``address``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=2
        )
        return r.status
