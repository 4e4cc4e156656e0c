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
from recsys.features import FeatureSpec, TargetScale, item_feature_matrix

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi")
COUNTRIES = ("us-east", "us-west", "eu")


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
) -> Path:
    """Writes one synthetic version under ``model_dir`` and returns its path."""
    from annoy import AnnoyIndex

    rng = np.random.default_rng(seed)
    spec = FeatureSpec(
        genres=GENRES, countries=COUNTRIES, genders=("F", "M"), occupations=("other", "student")
    )
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
        _save_tower(w.path / A.USER_TOWER, spec.n_user_features, dim, seed + 1)
        _save_tower(w.path / A.ITEM_TOWER, spec.n_item_features, dim, seed + 2)
        vectors = embed(w.path / A.ITEM_TOWER, item_feats)
        w.write_json(A.ITEM_IDS, item_ids)
        w.write_npy(A.ITEM_VECTORS, vectors)
        w.write_npy(A.ITEM_GENRES, genres)
        w.write_npy(A.ITEM_FEATURES, item_feats)
        w.write_json(A.ITEMS_META, {"title": [f"Item {k}" for k in range(n_items)],
                                    "year": years.astype(int).tolist()})  # fmt: skip
        index = AnnoyIndex(dim, "angular")
        for row in range(n_items):
            index.add_item(row, vectors[row])
        index.build(annoy_trees, n_jobs=1)
        index.save(str(w.path / A.ANNOY_INDEX))
        index.unload()
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
