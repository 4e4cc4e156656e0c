"""Offline A/B comparison of two model versions with bootstrap confidence intervals.

``recsys evaluate --version A --compare B`` scores both versions' exported
artifacts (user tower SavedModel, ``item_vectors.npy``) on the **same**
held-out split and reports, for RMSE, MAE, Recall@10 and NDCG@10, each
version's figure, the difference ``B - A`` and a percentile bootstrap
confidence interval of that difference.

The bootstrap resamples **users** (each user's held-out ratings travel
together): one user's errors are correlated, so resampling single ratings
would make intervals too narrow. Both versions are scored on the same
resampled users in every replicate (a paired bootstrap), which cancels
most of the between-user noise that both versions share. The resampling is
seeded, so the same inputs always print the same interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.errors import UserFacingError
from trainer.evaluate import (
    K,
    _rank_metrics,
    _top_k,
    load_for_evaluation,
    ranking_users,
    recorded_spec,
)
from trainer.prepare import Prepared

RESAMPLES = 1000
CONFIDENCE = 0.95
# Resamples drawn per block: bounds memory to block x n_users counts.
_BLOCK = 100
# Metric name -> which direction is better, in report order.
METRICS = {"rmse": "lower", "mae": "lower", "recall@10": "higher", "ndcg@10": "higher"}


@dataclass
class _PerUser:
    """Per-user sums one version contributes to every metric (rows = test users)."""

    sq_err: np.ndarray | None  # float64 [n_users]: sum of squared star errors (None: no stars)
    abs_err: np.ndarray | None  # float64 [n_users]: sum of absolute star errors
    recall: np.ndarray  # float64 [n_users]: Recall@10 (0 for users not ranked)
    ndcg: np.ndarray  # float64 [n_users]: NDCG@10 (0 for users not ranked)


def _per_user(
    p: Prepared,
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    target: Any,
    ranked: np.ndarray,
    relevant: dict[int, set[int]],
) -> _PerUser:
    d = p.dataset
    # Held-out ratings are all of the dataset's own users, which both versions
    # share; users only one version's interaction logs added come after them.
    n_users = d.n_own_users
    test = p.test_rows
    tu, ti = d.rating_user[test], d.rating_item[test]
    sq = ab = None
    if target.objective == "rating":
        dots = np.einsum("nd,nd->n", user_vectors[tu], item_vectors[ti])
        pred = np.clip(target.from_model(dots), p.spec.rating_min, p.spec.rating_max)
        err = pred.astype(np.float64) - d.rating[test].astype(np.float64)
        sq = np.bincount(tu, weights=err**2, minlength=n_users)
        ab = np.bincount(tu, weights=np.abs(err), minlength=n_users)
    recall = np.zeros(n_users)
    ndcg = np.zeros(n_users)
    histories = p.histories
    for u in ranked.tolist():
        unseen = np.ones(d.n_items, bool)
        unseen[np.asarray(histories[u], np.int64)] = False
        top = _top_k(item_vectors @ user_vectors[u], np.flatnonzero(unseen), K)
        recall[u], ndcg[u] = _rank_metrics(top, relevant[u])
    return _PerUser(sq, ab, recall, ndcg)


def _metric(name: str, w: np.ndarray, s: _PerUser, n_rated: np.ndarray, ranked: np.ndarray):
    """Metric value(s) under user weights ``w`` (``[n_users]`` or ``[B, n_users]``)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if name == "rmse":
            return np.sqrt((w @ s.sq_err) / (w @ n_rated))
        if name == "mae":
            return (w @ s.abs_err) / (w @ n_rated)
        values = s.recall if name == "recall@10" else s.ndcg
        return (w @ values) / (w @ ranked)


def bootstrap_compare(
    p: Prepared,
    base: tuple[np.ndarray, np.ndarray, Any],
    other: tuple[np.ndarray, np.ndarray, Any],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    max_users: int = 2000,
    other_prepared: Prepared | None = None,
) -> dict[str, Any]:
    """Paired user-level bootstrap of ``other - base`` on the held-out rows of ``p``.

    Args:
        p: Prepared dataset and split (the base version must be trained on it).
        base: ``(user_vectors [n_users, D], item_vectors [n_items, D], TargetScale)``.
        other: The same for the second version (its D may differ).
        resamples: Bootstrap replicates.
        confidence: Two-sided level of the percentile interval.
        seed: Seed of the resampling (and nothing else).
        max_users: Users ranked for Recall/NDCG, sampled as ``recsys evaluate`` does.
        other_prepared: The second version's, when it was trained on other
            interaction-log ratings (its own training histories; the held-out
            rows of ``p``). Default: ``p``.

    Returns:
        ``{"metrics": {name: {"base", "other", "diff", "ci", "better", "significant"}},
        "bootstrap": {...}, "n_test", "test_users", "ranking_users"}``; RMSE and MAE only
        when both versions predict ratings.
    """
    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    d = p.dataset
    threshold = base[2].like_threshold
    ranked_users, relevant = ranking_users(p, threshold, max_users=max_users)
    a = _per_user(p, *base, ranked_users, relevant)
    b = _per_user(other_prepared or p, *other, ranked_users, relevant)
    n_users = d.n_own_users  # see _per_user
    n_rated = np.bincount(d.rating_user[p.test_rows], minlength=n_users).astype(np.float64)
    ranked = np.zeros(n_users)
    ranked[ranked_users] = 1.0
    stars = a.sq_err is not None and b.sq_err is not None
    names = [m for m in METRICS if stars or "@" in m]
    # Bootstrap units: every user with a held-out rating (zero-weight users add nothing).
    units = np.flatnonzero((n_rated > 0) | (ranked > 0))
    full = np.zeros(n_users)
    full[units] = 1.0
    rng = np.random.default_rng(seed)
    diffs = {m: np.empty(resamples) for m in names}
    for start in range(0, resamples, _BLOCK):
        n = min(_BLOCK, resamples - start)
        w = np.zeros((n, n_users))
        w[:, units] = rng.multinomial(len(units), np.full(len(units), 1.0 / len(units)), size=n)
        for m in names:
            diffs[m][start : start + n] = _metric(m, w, b, n_rated, ranked) - _metric(
                m, w, a, n_rated, ranked
            )
    tail = (1.0 - confidence) / 2.0 * 100.0
    out: dict[str, Any] = {}
    for m in names:
        va = float(_metric(m, full, a, n_rated, ranked))
        vb = float(_metric(m, full, b, n_rated, ranked))
        finite = diffs[m][np.isfinite(diffs[m])]
        lo, hi = np.percentile(finite, [tail, 100.0 - tail]) if len(finite) else (np.nan, np.nan)
        out[m] = {
            "base": va,
            "other": vb,
            "diff": vb - va,
            "ci": [float(lo), float(hi)],
            "better": METRICS[m],
            "significant": bool(lo > 0 or hi < 0),
        }
    return {
        "metrics": out,
        "bootstrap": {
            "resamples": int(resamples),
            "confidence": float(confidence),
            "seed": int(seed),
            "unit": "user",
            "paired": True,
        },
        "n_test": len(p.test_rows),
        "test_users": len(units),
        "ranking_users": len(ranked_users),
    }


def compare_versions(
    base_dir: str | Path,
    other_dir: str | Path,
    *,
    data_spec: str | None = None,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> dict[str, Any]:
    """Compares two exported versions on their common held-out split.

    Versions trained on the same data with different interaction-log exports
    share it too (the merged ratings always train); each is then scored with
    its own training data's features and histories.

    Raises:
        UserFacingError: A version cannot be opened, the two were trained on
            different data (dataset sha256) or splits, or the data cannot be
            reloaded.
    """
    from recsys import artifacts as A

    infos = []
    for path in (base_dir, other_dir):
        try:
            mv = A.ModelVersion.open(path, verify=False)
        except A.ArtifactError as exc:
            raise UserFacingError(str(exc)) from exc
        infos.append((mv.version, mv.manifest.get("dataset", {})))
    (va, ia), (vb, ib) = infos
    if not ia.get("sha256") or not ib.get("sha256"):
        raise UserFacingError("both versions must record their dataset sha256 to be compared")
    if ia["sha256"] != ib["sha256"]:
        raise UserFacingError(
            f"versions {va} and {vb} were trained on different data (dataset sha256 "
            f"{ia['sha256'][:12]}... vs {ib['sha256'][:12]}...), so no held-out set is common "
            "to both"
        )
    sa, sb = ia.get("split", {}), ib.get("split", {})
    key = ("test_fraction", "seed")
    if [sa.get(k) for k in key] != [sb.get(k) for k in key]:
        raise UserFacingError(
            f"versions {va} and {vb} used different splits ({sa.get('test_fraction')}/seed "
            f"{sa.get('seed')} vs {sb.get('test_fraction')}/seed {sb.get('seed')})"
        )
    spec = data_spec or recorded_spec(ia) or recorded_spec(ib)
    mv_a, p, users_a = load_for_evaluation(base_dir, spec)
    # Its own split when it trained on other interaction-log ratings: the same
    # held-out rows, its own features and training histories.
    mv_b, p_b, users_b = load_for_evaluation(other_dir, data_spec, prepared=p)
    result = bootstrap_compare(
        p,
        (users_a, np.asarray(mv_a.item_vectors, np.float32), mv_a.target),
        (users_b, np.asarray(mv_b.item_vectors, np.float32), mv_b.target),
        resamples=resamples,
        confidence=confidence,
        seed=seed,
        other_prepared=p_b,
    )
    return {
        "base": {"version": mv_a.version, "path": str(base_dir)},
        "other": {"version": mv_b.version, "path": str(other_dir)},
        "dataset": {"name": ia.get("name"), "sha256": ia["sha256"], "split": sa},
        **result,
    }


def format_comparison(result: dict[str, Any]) -> str:
    """Plain-text table of :func:`compare_versions`'s result (A = base, B = other)."""
    boot = result["bootstrap"]
    level = f"{boot['confidence'] * 100:g}% CI"
    lines = [
        f"A = version {result['base']['version']} ({result['base']['path']})",
        f"B = version {result['other']['version']} ({result['other']['path']})",
        f"{result['n_test']:,} held-out ratings of {result['test_users']:,} users "
        f"(Recall/NDCG@10 over {result['ranking_users']:,} users); diff = B - A, {level} from "
        f"{boot['resamples']} paired bootstrap resamples of users (seed {boot['seed']})",
        "",
        f"{'metric':<11}{'A':>10}{'B':>10}{'diff':>10}{level:>22}  verdict",
    ]
    for name, m in result["metrics"].items():
        lo, hi = m["ci"]
        if not m["significant"]:
            verdict = "no clear difference"
        else:
            good = (m["diff"] < 0) == (m["better"] == "lower")
            verdict = f"B {'better' if good else 'worse'}"
        lines.append(
            f"{name:<11}{m['base']:>10.4f}{m['other']:>10.4f}{m['diff']:>+10.4f}"
            f"{f'[{lo:+.4f}, {hi:+.4f}]':>22}  {verdict}"
        )
    if "rmse" not in result["metrics"]:
        lines.append("(RMSE and MAE left out: a version does not predict star ratings)")
    return "\n".join(lines)
