"""Writes a complete, checksummed model version (the contract in ``recsys.artifacts``).

Everything goes through :class:`recsys.artifacts.VersionWriter`, which builds
the version in a hidden temporary directory and renames it into place only
once every file is written and checksummed.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from recsys import artifacts as A
from recsys.errors import UserFacingError
from recsys.features import ITEM_PRIOR
from trainer.model import TwoTower
from trainer.prepare import Prepared

# Pseudo-count of the damped mean that ranks top lists: an item needs tens of
# ratings before its own mean outweighs the prior, so two 5-star ratings
# do not put an obscure film at the top of a genre.
TOP_LIST_PRIOR = 20.0
# Weight of log-popularity added to the damped mean in genre and country
# lists: between two equally liked films the more watched one is the safer pick.
POPULARITY_WEIGHT = 0.05


def save_tower(tower, path: Path) -> None:
    """Saves a Keras tower as a SavedModel with the contract's serving signature.

    The signature takes ``features`` float32 ``[None, F]`` and returns
    ``{"embedding": float32 [None, D]}``; the tower's normalisation layer
    is part of the graph, so callers feed raw feature vectors.
    """
    import tensorflow as tf

    width = int(tower.input.shape[-1])

    class _Serving(tf.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, width], tf.float32, name=A.INPUT_KEY)])
        def serve(self, features):
            return {A.OUTPUT_KEY: self.model(features, training=False)}

    module = _Serving(tower)
    tf.saved_model.save(module, str(path), signatures={A.SIGNATURE: module.serve})


def build_annoy(vectors: np.ndarray, path: Path, *, trees: int, n_jobs: int = 1) -> None:
    """Builds an angular Annoy index over ``vectors`` (item i = row i) straight to ``path``.

    ``on_disk_build`` keeps the index in a file-backed mapping rather than
    the heap, which is what keeps a million-item build under a few GB.

    One build thread by default: Annoy seeds each thread on its own (seed +
    thread number), so with ``n_jobs=-1`` the trees, and so the neighbours
    served, depended on the build machine's core count, and the file's bytes
    on thread timing. With one, the index is a function of the vectors and
    the seed alone (1M items, 10 trees: ~11 s against ~7 s on 2 cores).
    """
    from annoy import AnnoyIndex

    index = AnnoyIndex(int(vectors.shape[1]), "angular")
    index.set_seed(0)
    index.on_disk_build(str(path))
    for i in range(vectors.shape[0]):
        index.add_item(i, vectors[i])
    index.build(trees, n_jobs=n_jobs)
    index.unload()


def damped_mean(total: np.ndarray, count: np.ndarray, prior_mean: np.ndarray | float, prior: float):
    """Bayesian mean: ``(sum + prior * prior_mean) / (count + prior)``."""
    return (total + prior * prior_mean) / (count + prior)


def _ranked(ids: list[str], score: np.ndarray, eligible: np.ndarray, top_n: int) -> list[list]:
    idx = np.flatnonzero(eligible)
    if len(idx) == 0:
        return []
    # Scores as exported (and as the published sorted sets hold them), and
    # ties in ZREVRANGE's order: item id, descending. The in-memory list, the
    # published one and the evaluator then agree item for item; ties broken
    # by catalogue order had reordered (and at the cut, changed) the popular
    # list read from Redis.
    s = np.round(score[idx].astype(np.float64), 6)
    names = np.asarray([ids[i] for i in idx])
    by_name = np.empty(len(idx), np.int64)
    by_name[np.argsort(names, kind="stable")] = np.arange(len(idx))
    order = idx[np.lexsort((-by_name, -s))][:top_n]
    return [[ids[i], round(float(score[i]), 6)] for i in order]


def top_lists(p: Prepared, top_n: int = 1000) -> dict[str, Any]:
    """Popular, per-genre and per-country lists from the training ratings.

    * popular: training rating count.
    * genre: damped mean rating (prior :data:`TOP_LIST_PRIOR` toward the
      global mean) plus a small log-popularity bonus, over rated items of the genre.
    * country: the same within the country's users, with the prior pulled
      toward the item's overall damped mean, so a country with few users
      still gets a sensible list.
    """
    d = p.dataset
    ids = d.item_ids
    rated = p.item_count > 0
    overall = damped_mean(p.item_sum, p.item_count, p.spec.global_mean, TOP_LIST_PRIOR)
    quality = overall + POPULARITY_WEIGHT * np.log1p(p.item_count)
    out: dict[str, Any] = {
        "popular": _ranked(ids, p.item_count, rated, top_n),
        "genre": {},
        "country": {},
    }
    for j, g in enumerate(d.genres):
        out["genre"][g] = _ranked(ids, quality, rated & (d.item_genres[:, j] > 0), top_n)
    rows = p.train_rows
    cindex = {c: i for i, c in enumerate(p.spec.countries)}
    user_country = np.asarray([cindex.get(c, -1) for c in d.user_country], np.int64)
    rc = user_country[d.rating_user[rows]]
    items = d.rating_item[rows]
    r = d.rating[rows].astype(np.float64)
    for ci, c in enumerate(p.spec.countries):
        m = rc == ci
        cnt = np.bincount(items[m], minlength=d.n_items).astype(np.float64)
        tot = np.bincount(items[m], weights=r[m], minlength=d.n_items)
        score = damped_mean(tot, cnt, overall, TOP_LIST_PRIOR) + POPULARITY_WEIGHT * np.log1p(cnt)
        out["country"][c] = _ranked(ids, score, cnt > 0, top_n)
    return out


def users_json(p: Prepared) -> dict[str, list]:
    """Columnar known-user table: id, demographics, training history and all watched items.

    ``history`` is the training split's (what the aggregates and evaluation
    use); ``watched`` adds the held-out ratings (what a publish seeds the
    watched set and the recent list from). Both oldest first.
    """
    d = p.dataset
    ids = d.item_ids
    return {
        "user_id": list(d.user_ids),
        "age": [float(a) if math.isfinite(a) else None for a in d.user_age.tolist()],
        "gender": list(d.user_gender),
        "occupation": list(d.user_occupation),
        "country": list(d.user_country),
        "history": [[ids[i] for i in h] for h in p.histories],
        "watched": [[ids[i] for i in h] for h in p.watched],
    }


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def export_version(
    model_dir: str | Path,
    p: Prepared,
    tt: TwoTower,
    *,
    manifest: dict[str, Any],
    annoy_trees: int = 10,
    top_n: int = 1000,
    report: Callable[[Path, np.ndarray], dict[str, Any]] | None = None,
    quiet: bool = True,
) -> Path:
    """Writes a new numbered version and returns its path.

    Args:
        model_dir: Root of the numbered versions.
        p: Prepared dataset (training-split aggregates and features).
        tt: The trained towers.
        manifest: Extra manifest entries (``dataset``, ``model``, ...); ``feature_spec``,
            ``target`` and ``annoy`` are filled in here.
        annoy_trees: Annoy tree count.
        top_n: Length of each top list.
        report: Optional ``report(version_tmp_dir, item_vectors) -> metrics``, run
            before the commit so ``metrics.json`` and plots are checksummed too.
        quiet: No progress messages.
    """
    d = p.dataset
    with A.VersionWriter(model_dir) as w:
        t0 = time.perf_counter()
        save_tower(tt.user_tower, w.path / A.USER_TOWER)
        save_tower(tt.item_tower, w.path / A.ITEM_TOWER)
        _log(quiet, f"export: towers saved ({time.perf_counter() - t0:.1f}s)")
        item_features = p.item_features
        # Hybrid: items without training ratings keep their content vector.
        vectors = tt.item_vectors(item_features, known=p.item_count > 0)
        if not np.isfinite(vectors).all():
            # Every reader refuses such a version: never let it become the newest.
            raise UserFacingError(
                "training diverged: the item vectors are not finite; nothing was exported "
                "(lower --learning-rate)"
            )
        w.write_npy(A.ITEM_VECTORS, vectors)
        w.write_npy(A.ITEM_FEATURES, item_features)
        w.write_npy(A.ITEM_GENRES, np.asarray(d.item_genres, np.uint8))
        w.write_json(A.ITEM_IDS, list(d.item_ids))
        years = [int(y) if math.isfinite(y) and y > 0 else None for y in d.item_year.tolist()]
        w.write_json(A.ITEMS_META, {"title": list(d.item_title), "year": years})
        _log(quiet, f"export: {len(vectors):,} item vectors ({time.perf_counter() - t0:.1f}s)")
        build_annoy(vectors, w.path / A.ANNOY_INDEX, trees=annoy_trees)
        _log(quiet, f"export: annoy index, {annoy_trees} trees ({time.perf_counter() - t0:.1f}s)")
        w.write_json(A.TOP_LISTS, top_lists(p, top_n))
        w.write_json(A.USERS, users_json(p))
        w.write_npy(A.USER_AGGREGATES, p.user_agg)
        w.write_npy(A.USER_FEATURES, p.user_features)
        if d.logged_rows:
            # The interaction-log ratings it trained on: `recsys evaluate`
            # rebuilds its training data from the version, not from an export.
            for name, column in d.logged().items():
                w.write_npy(A.LOGGED_RATINGS[name], column)
        if d.logged_users:
            w.write_json(A.LOGGED_USERS, d.logged_user_ids())
        metrics = report(w.path, vectors) if report is not None else {}
        body = {
            **manifest,
            "feature_spec": p.spec.to_dict(),
            "target": tt.target_scale(p.spec).to_dict(),
            "model": {**manifest.get("model", {}), **tt.config},
            "annoy": {"metric": "angular", "trees": int(annoy_trees), "seed": 0},
            "top_lists": {"length": int(top_n), "prior": TOP_LIST_PRIOR,
                          "popularity_weight": POPULARITY_WEIGHT, "item_prior": ITEM_PRIOR},
            "metrics": metrics,
        }  # fmt: skip
        path = w.commit(body)
    _log(quiet, f"export: version {path.name} at {path} ({time.perf_counter() - t0:.1f}s)")
    return path
