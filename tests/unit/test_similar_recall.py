"""SimilarItems ("more like this") against numpy's exact neighbours on a catalogue of real size."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from annoy import AnnoyIndex

from bench.retrieval import _clustered
from recsys.config import TrainerSettings
from retrieval_service.served import ServedVersion
from trainer.export import build_annoy


def test_similar_items_finds_the_true_neighbours_with_the_trainers_index(tmp_path):
    """On small test catalogues any search finds everything; at 50K items a floor per
    tree that had not followed the trainer from 30 trees to 10 searched 200 nodes."""
    n, dim, k = 50_000, 32, 10
    x = _clustered(n, dim)  # the bench's stand-in for learned item vectors
    build_annoy(x, tmp_path / "annoy.ann", trees=TrainerSettings().annoy_trees, n_jobs=1)
    index = AnnoyIndex(dim, "angular")
    index.load(str(tmp_path / "annoy.ann"))
    ids = [str(i) for i in range(n)]
    served = ServedVersion(
        SimpleNamespace(version="1"), index, ids, {s: i for i, s in enumerate(ids)}, []
    )
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    recalls = []
    for q in np.random.default_rng(0).choice(n, 100, replace=False).tolist():
        cos = unit @ unit[q]
        cos[q] = -np.inf
        truth = set(np.argpartition(-cos, k)[:k].tolist())
        got = served.similar(str(q), k)
        assert len(got) == k
        recalls.append(len({int(nb.item_id) for nb in got} & truth) / k)
        # The scores reported are the cosines themselves.
        np.testing.assert_allclose(
            [nb.score for nb in got], [cos[int(nb.item_id)] for nb in got], atol=1e-5
        )
    assert np.mean(recalls) >= 0.95, np.mean(recalls)


def test_the_default_build_is_the_same_index_on_every_run(tmp_path):
    """Built on every core, Annoy's per-thread seeds made the trees follow the core
    count and the bytes follow thread timing, despite the fixed seed."""
    x = _clustered(20_000, 32)
    a, b = tmp_path / "a.ann", tmp_path / "b.ann"
    build_annoy(x, a, trees=TrainerSettings().annoy_trees)
    build_annoy(x, b, trees=TrainerSettings().annoy_trees)
    assert a.read_bytes() == b.read_bytes()
