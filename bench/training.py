"""Trainer benchmark: MovieLens 100K accuracy and training time, 1M-item export.

Figures and what each is divided by (measured in the same run):

* ``ml100k`` (content-only, the default mode) and ``ml100k_hybrid`` (item id
  embeddings, ``--id-embeddings``): ``trainer.train.train`` on MovieLens 100K
  with the seed-0 80/20 split (the split the reference figures use: global
  mean 1.13, user/item baseline 0.946, SVD 0.939, SVD++ 0.920). Test RMSE is
  divided by the regularised user/item bias baseline fitted on the same split
  in the same run, and the hybrid's by the content-only model's; training
  wall time is checked against the 3-minute budget. The config that produced
  each figure is printed and returned. Skipped when the data is absent.
* ``export_1m``: item features, item-tower embeddings of the whole catalogue
  and the Annoy index for a 1,000,000-item synthetic catalogue, in a child
  process whose peak RSS (``getrusage``) is reported. The ratio divides the
  per-item export time by the per-item time of the same export at one tenth
  of the size, so 1.0 means the export scales linearly.
* ``ml100k_topn``: the binary objective with sampled negatives
  (``--objective binary --negatives 4``, trainer defaults otherwise) on the
  same split, for top-10 quality. Its Recall@10 is divided by popularity's,
  the baseline the rating models trail, computed on the same split in the
  same run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, header, ratio, target

SHARED_DATA = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))

# The best content-only configuration found for MovieLens 100K within the time budget.
# The learning rate is halved whenever validation stalls for an epoch.
ML100K_CONFIG: dict[str, Any] = {
    "hidden_units": (512, 256),
    "embedding_dim": 32,
    "dropout": 0.2,
    "leave_one_out": True,
    "batch_size": 512,
    "learning_rate": 1e-3,
    "lr_plateau_factor": 0.5,
    "epochs": 30,
    "patience": 4,
}

# Hybrid: the same towers plus learned item id offsets (see trainer.model).
ML100K_HYBRID_CONFIG: dict[str, Any] = {**ML100K_CONFIG, "id_embeddings": True, "id_l2": 1e-5}

# Top-N: the trainer's default towers, trained to pick liked items from the catalogue.
ML100K_TOPN_CONFIG: dict[str, Any] = {"objective": "binary", "negatives": 4, "epochs": 30}


def _ml100k(quick: bool, config: dict[str, Any], label: str) -> dict[str, Any] | None:
    from trainer.loaders import load_dataset
    from trainer.train import TrainConfig, train

    path = SHARED_DATA / "ml-100k"
    if not (path / "u.data").is_file():
        print(f"  MovieLens 100K not found at {path}: skipped")
        return None
    spec = f"movielens-100k:{path}"
    dataset = load_dataset(spec)
    cfg = TrainConfig(**{**config, "epochs": 3 if quick else config["epochs"]})
    cfg.data_spec = spec
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        t = time.perf_counter()
        res = train(dataset, tmp, cfg, plots=False, quiet=True)
        total = time.perf_counter() - t
    m = res.metrics
    out = {
        "config": {**cfg.to_dict(), "data_spec": "movielens-100k:<shared>/ml-100k"},
        "epochs_run": res.epochs_run,
        "train_seconds": res.train_seconds,
        "total_seconds": total,
        "recall@10": m["top10"]["model"]["recall@10"],
        "ndcg@10": m["top10"]["model"]["ndcg@10"],
        "popularity_recall@10": m["top10"]["popularity"]["recall@10"],
        "popularity_ndcg@10": m["top10"]["popularity"]["ndcg@10"],
    }
    if "rmse" not in m["model"]:  # binary: AUC and log loss over rated pairs instead
        out["auc"], out["logloss"] = m["model"]["auc"], m["model"]["logloss"]
        print(
            f"  MovieLens 100K (seed-0 80/20), {label}: Recall@10 {out['recall@10']:.4f}, "
            f"NDCG@10 {out['ndcg@10']:.4f} (popularity {out['popularity_recall@10']:.4f}, "
            f"{out['popularity_ndcg@10']:.4f})\n"
            f"  training {res.train_seconds:.1f} s for {res.epochs_run} epochs\n"
            f"  config: {json.dumps(out['config'], sort_keys=True)}",
            flush=True,
        )
        return out
    out |= {
        "test_rmse": m["model"]["rmse"],
        "test_mae": m["model"]["mae"],
        "global_mean_rmse": m["baselines"]["global_mean"]["rmse"],
        "user_item_bias_rmse": m["baselines"]["user_item_bias"]["rmse"],
    }
    print(
        f"  MovieLens 100K (seed-0 80/20), {label}: test RMSE {out['test_rmse']:.4f} "
        f"(user/item bias {out['user_item_bias_rmse']:.4f}, global mean "
        f"{out['global_mean_rmse']:.4f}); MAE {out['test_mae']:.4f}\n"
        f"  training {res.train_seconds:.1f} s for {res.epochs_run} epochs, "
        f"train+evaluate+export {total:.1f} s\n"
        f"  Recall@10 {out['recall@10']:.4f}, NDCG@10 {out['ndcg@10']:.4f} "
        f"(popularity Recall@10 {out['popularity_recall@10']:.4f})\n"
        f"  config: {json.dumps(out['config'], sort_keys=True)}",
        flush=True,
    )
    return out


def export_child(n_items: int, trees: int) -> dict[str, Any]:
    """Runs one catalogue export in this process and returns timings and peak RSS.

    Called in a fresh interpreter so the peak RSS belongs to the export alone.
    """
    import numpy as np

    from trainer.export import build_annoy
    from trainer.model import build_two_tower, embed
    from trainer.prepare import prepare
    from trainer.synthetic import generate

    ds = generate(n_users=20_000, n_items=n_items, n_ratings=n_items, n_countries=6, seed=0)
    train_rows, test_rows = ds.split(0.2, 0)
    p = prepare(ds, train_rows, test_rows)
    tt = build_two_tower(p.spec, user_sample=p.user_features, item_sample=p.item_features[:100_000])
    rss_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        t0 = time.perf_counter()
        feats = p.item_features
        vectors = embed(tt.item_tower, feats)
        np.save(Path(tmp) / "item_vectors.npy", vectors, allow_pickle=False)
        np.save(Path(tmp) / "item_features.npy", feats, allow_pickle=False)
        t1 = time.perf_counter()
        build_annoy(vectors, Path(tmp) / "annoy.ann", trees=trees)
        t2 = time.perf_counter()
        index_mib = (Path(tmp) / "annoy.ann").stat().st_size / 2**20
    return {
        "items": n_items,
        "trees": trees,
        "embed_seconds": t1 - t0,
        "annoy_seconds": t2 - t1,
        "export_seconds": t2 - t0,
        "index_mib": index_mib,
        "peak_rss_mib_before_export": rss_ready,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _export_in_child(n_items: int, trees: int) -> dict[str, Any]:
    code = (
        "import json, sys; from bench.training import export_child; "
        f"print('RESULT ' + json.dumps(export_child({n_items}, {trees})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"export child failed ({proc.returncode}): {proc.stderr[-2000:]}")


def run(quick: bool = False) -> dict[str, Any]:
    print(header("training: MovieLens 100K accuracy, 1M-item export", "training", quick))
    out: dict[str, Any] = {"ratios": {}, "targets": []}
    ml = _ml100k(quick, ML100K_CONFIG, "content-only")
    if ml is not None:
        hy = _ml100k(quick, ML100K_HYBRID_CONFIG, "hybrid (item ids)")
        assert hy is not None
        out["ml100k"] = ml
        out["ml100k_hybrid"] = hy
        for key, res in (("ml100k", ml), ("ml100k_hybrid", hy)):
            out["ratios"][f"{key}_rmse_vs_user_item_bias"] = ratio(
                res["test_rmse"], res["user_item_bias_rmse"], unit="RMSE stars"
            )
        out["ratios"]["ml100k_rmse_vs_global_mean"] = ratio(
            ml["test_rmse"], ml["global_mean_rmse"], unit="RMSE stars"
        )
        out["ratios"]["ml100k_hybrid_rmse_vs_content_only"] = ratio(
            hy["test_rmse"], ml["test_rmse"], unit="RMSE stars"
        )
        best = min(ml, hy, key=lambda r: r["test_rmse"])
        out["targets"].append(
            target("ML-100K test RMSE, best mode (stars)", best["test_rmse"], "<=", 0.90)
        )
        for name, res in (("content-only", ml), ("hybrid", hy)):
            out["targets"].append(
                target(f"ML-100K training wall time, {name} (s)", res["train_seconds"], "<", 180.0)
            )
        topn = _ml100k(quick, ML100K_TOPN_CONFIG, "binary, 4 sampled negatives per rating")
        assert topn is not None
        out["ml100k_topn"] = topn
        out["ratios"]["ml100k_topn_recall@10_vs_popularity"] = ratio(
            topn["recall@10"], topn["popularity_recall@10"], unit="Recall@10"
        )
        out["ratios"]["ml100k_topn_recall@10_vs_rating_model"] = ratio(
            topn["recall@10"], ml["recall@10"], unit="Recall@10"
        )

    from recsys.config import TrainerSettings

    big = 100_000 if quick else 1_000_000
    trees = TrainerSettings().annoy_trees  # what a default version builds
    small = _export_in_child(big // 10, trees)
    full = _export_in_child(big, trees)
    out["export_small"] = small
    out["export_big"] = full
    per_item_big = full["export_seconds"] / big
    per_item_small = small["export_seconds"] / (big // 10)
    out["ratios"][f"export_{big // 1000}k_per_item_vs_{big // 10_000}k"] = ratio(
        per_item_big, per_item_small, unit="s/item"
    )
    out["targets"].append(target(f"export {big:,} items (s)", full["export_seconds"], "<", 300.0))
    out["targets"].append(
        target(f"export {big:,} items peak RSS (MiB)", full["peak_rss_mib"], "<", 4096)
    )
    print(
        f"  export {big:,} items ({trees} trees): {full['export_seconds']:.1f} s "
        f"(embed {full['embed_seconds']:.1f} s, annoy {full['annoy_seconds']:.1f} s), "
        f"peak RSS {full['peak_rss_mib']:.0f} MiB, index {full['index_mib']:.0f} MiB\n"
        f"  per item vs {big // 10:,} items: x{per_item_big / per_item_small:.2f} "
        f"({small['export_seconds']:.1f} s at {big // 10:,})",
        flush=True,
    )
    return out


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
