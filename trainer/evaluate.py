"""Offline evaluation of a trained version against simple baselines.

Figures, all on the held-out split (training-split features only):

* **Rating accuracy**: RMSE and MAE in stars (rating objective) of the model
  and of three baselines: the global mean, a regularised user/item bias
  model, and (for ranking) popularity.
* **Top-10 quality**: Recall@10 and NDCG@10. For each test user, "relevant"
  means a held-out rating >= the like threshold (4 stars); every item the
  user has *not* rated in training is a candidate, the model ranks them all,
  and the first ten count. Recall@10 = hits / number of relevant items.
* **Retrieval trade-off**: an offline equivalent of the retrieval stage
  (items nearest the user's recent history by item vectors, the user's top
  genres' top lists, the user's country list and popular, merged with the
  service's default budget shares, deduplicated, seen items removed) is cut
  to N = 50 ... 1000 candidates. For each N: the share of held-out liked
  items it brings in (retrieval recall), and Recall@10/NDCG@10 when the model
  ranks only those candidates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys.features import TargetScale, UserAggregates, top_genres
from trainer.prepare import Prepared

BUDGETS = (50, 100, 200, 500, 1000)
K = 10
# Shares of the retrieval budget per source, as the service's default config
# (similar_to_recent 200, top_genre 150, top_country 100, popular 200).
SOURCE_SHARES = {"similar": 200, "genre": 150, "country": 100, "popular": 200}
RECENT_ITEMS = 10
TOP_GENRES = 3
# Regularisation of the bias baseline (pseudo-counts), as commonly used for
# MovieLens; alternating least squares converges in a few sweeps.
BIAS_REG_ITEM = 10.0
BIAS_REG_USER = 15.0


def bias_baseline(p: Prepared, sweeps: int = 10) -> tuple[float, np.ndarray, np.ndarray]:
    """Fits ``r ~ mu + b_user + b_item`` on the training rows: ``(mu, b_user, b_item)``."""
    d = p.dataset
    rows = p.train_rows
    u, i = d.rating_user[rows], d.rating_item[rows]
    r = d.rating[rows].astype(np.float64)
    mu = float(r.mean())
    bu = np.zeros(d.n_users)
    bi = np.zeros(d.n_items)
    nu = np.bincount(u, minlength=d.n_users)
    ni = np.bincount(i, minlength=d.n_items)
    for _ in range(sweeps):
        bi = np.bincount(i, weights=r - mu - bu[u], minlength=d.n_items) / (ni + BIAS_REG_ITEM)
        bu = np.bincount(u, weights=r - mu - bi[i], minlength=d.n_users) / (nu + BIAS_REG_USER)
    return mu, bu, bi


def _errors(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    err = pred.astype(np.float64) - truth.astype(np.float64)
    return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err)))}


def _dcg(hits: np.ndarray) -> float:
    return float(np.sum(hits / np.log2(np.arange(2, len(hits) + 2))))


def _rank_metrics(top: np.ndarray, relevant: set[int], k: int = K) -> tuple[float, float]:
    hits = np.array([1.0 if int(x) in relevant else 0.0 for x in top[:k]])
    ideal = _dcg(np.ones(min(len(relevant), k)))
    return float(hits.sum() / len(relevant)), (_dcg(hits) / ideal if ideal else 0.0)


def _top_k(scores: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    if len(candidates) <= k:
        return candidates[np.argsort(-scores[candidates], kind="stable")]
    s = scores[candidates]
    part = np.argpartition(-s, k - 1)[:k]
    return candidates[part[np.argsort(-s[part], kind="stable")]]


class _Retriever:
    """Offline stand-in for the retrieval service's default sources."""

    def __init__(self, p: Prepared, item_vectors: np.ndarray):
        from trainer.export import top_lists

        self.p = p
        self.vectors = item_vectors
        index = {iid: n for n, iid in enumerate(p.dataset.item_ids)}
        lists = top_lists(p, top_n=max(BUDGETS))
        self.popular = np.array([index[i] for i, _ in lists["popular"]], np.int64)
        self.genre = {
            g: np.array([index[i] for i, _ in e], np.int64) for g, e in lists["genre"].items()
        }
        self.country = {
            c: np.array([index[i] for i, _ in e], np.int64) for c, e in lists["country"].items()
        }

    def candidates(self, u: int, seen: np.ndarray, history: Sequence[int], n: int) -> np.ndarray:
        p = self.p
        lists: dict[str, np.ndarray] = {}
        recent = np.asarray(history[-RECENT_ITEMS:], np.int64)
        if len(recent):
            sim = (self.vectors @ self.vectors[recent].T).max(axis=1)
            sim[seen] = -np.inf
            lists["similar"] = _top_k(sim, np.arange(len(sim)), min(n, len(sim)))
        agg = UserAggregates.from_flat(p.user_agg[u], len(p.spec.genres))
        genres = top_genres(p.spec, agg, TOP_GENRES)
        if genres:
            lists["genre"] = _interleave([self.genre[g] for g in genres])
        country = p.dataset.user_country[u]
        if country in self.country:
            lists["country"] = self.country[country]
        lists["popular"] = self.popular
        seen_mask = np.zeros(p.dataset.n_items, bool)
        seen_mask[seen] = True
        total = sum(SOURCE_SHARES[s] for s in lists)
        picked: list[int] = []
        taken = set()
        leftovers: list[int] = []
        for name, items in lists.items():
            quota = math.ceil(n * SOURCE_SHARES[name] / total)
            got = 0
            for x in items.tolist():
                if seen_mask[x] or x in taken:
                    continue
                if got < quota:
                    picked.append(x)
                    taken.add(x)
                    got += 1
                else:
                    leftovers.append(x)
                    if len(leftovers) > n:
                        break
        # Refill from the sources' next items when quotas came up short, as the service does.
        for x in leftovers:
            if len(picked) >= n:
                break
            if x not in taken:
                picked.append(x)
                taken.add(x)
        return np.asarray(picked[:n], np.int64)


def _interleave(arrays: list[np.ndarray]) -> np.ndarray:
    out: list[int] = []
    for k in range(max((len(a) for a in arrays), default=0)):
        out.extend(int(a[k]) for a in arrays if k < len(a))
    return np.asarray(out, np.int64)


def ranking_users(
    p: Prepared, like_threshold: float, *, max_users: int = 2000, seed: int = 0
) -> tuple[np.ndarray, dict[int, set[int]]]:
    """Users whose top-10 is scored, and each one's held-out liked items.

    A user counts when at least one held-out rating reaches ``like_threshold``;
    above ``max_users`` such users a seeded sample is taken.

    Returns:
        ``(sorted user rows, {user row: set of liked item rows})``.
    """
    d = p.dataset
    test = p.test_rows
    liked_rows = test[d.rating[test] >= like_threshold]
    relevant: dict[int, set[int]] = {}
    for u, i in zip(
        d.rating_user[liked_rows].tolist(), d.rating_item[liked_rows].tolist(), strict=True
    ):
        relevant.setdefault(u, set()).add(i)
    users = np.array(sorted(relevant), np.int64)
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    return users, relevant


def evaluate_prepared(
    p: Prepared,
    user_embed: Callable[[np.ndarray], np.ndarray] | Any,
    item_vectors: np.ndarray,
    target: TargetScale,
    *,
    out_dir: Path | None = None,
    plots: bool = True,
    max_users: int = 2000,
    budgets: Sequence[int] = BUDGETS,
    seed: int = 0,
    negatives: int = 0,
) -> dict[str, Any]:
    """Evaluates towers on the held-out rows of ``p``.

    Args:
        p: Prepared dataset and split.
        user_embed: The user tower (Keras model or any callable features -> embeddings).
        item_vectors: float32 ``[n_items, D]`` item-tower outputs.
        target: How dots map to stars or probabilities.
        out_dir: Where ``metrics.json`` and plots go (nothing written when None).
        plots: Write PNG plots into ``out_dir``.
        negatives: Sampled negatives per rating the model was trained with
            (recorded with the figures; the report explains what they change).
        max_users: Users sampled (seeded) for the top-10 and retrieval figures.
        budgets: Retrieval candidate budgets N.
        seed: Seed of the user sample.

    Returns:
        The metrics (also written as ``metrics.json``).
    """
    from trainer.model import embed

    d = p.dataset
    if hasattr(user_embed, "output"):
        user_vectors = embed(user_embed, p.user_features)
    else:
        user_vectors = np.asarray(user_embed(p.user_features), np.float32)
    item_vectors = np.asarray(item_vectors, np.float32)
    test = p.test_rows
    tu, ti = d.rating_user[test], d.rating_item[test]
    truth = d.rating[test].astype(np.float64)
    dots = np.einsum("nd,nd->n", user_vectors[tu], item_vectors[ti])
    mu, bu, bi = bias_baseline(p)
    lo, hi = p.spec.rating_min, p.spec.rating_max
    metrics: dict[str, Any] = {
        "n_test": len(test),
        "objective": target.objective,
        "negatives": negatives,
    }
    baselines = {
        "global_mean": _errors(np.full(len(test), mu), truth),
        "user_item_bias": _errors(np.clip(mu + bu[tu] + bi[ti], lo, hi), truth),
    }
    if target.objective == "rating":
        metrics["model"] = _errors(np.clip(target.from_model(dots), lo, hi), truth)
    else:
        liked = truth >= target.like_threshold
        prob = np.clip(target.from_model(dots).astype(np.float64), 1e-7, 1 - 1e-7)
        metrics["model"] = {
            "logloss": float(-np.mean(liked * np.log(prob) + (~liked) * np.log(1 - prob))),
            "auc": _auc(prob, liked),
        }

    # --- top-10 over all unseen items, and the retrieval budget curve ------------
    users, relevant = ranking_users(p, target.like_threshold, max_users=max_users, seed=seed)
    histories = p.histories
    popularity = p.item_count + 1e-9 * -np.arange(d.n_items)  # ties: catalogue order
    bias_score = bi
    retriever = _Retriever(p, item_vectors)
    rankers = {"model": None, "popularity": popularity, "user_item_bias": bias_score}
    full = {name: [0.0, 0.0] for name in rankers}
    curve = {n: [0.0, 0.0, 0.0] for n in budgets}
    all_items = np.arange(d.n_items)
    for u in users.tolist():
        seen = np.asarray(histories[u], np.int64)
        mask = np.ones(d.n_items, bool)
        mask[seen] = False
        unseen = all_items[mask]
        rel = relevant[u]
        model_scores = item_vectors @ user_vectors[u]
        for name, s in rankers.items():
            scores = model_scores if s is None else s
            r, g = _rank_metrics(_top_k(scores, unseen, K), rel)
            full[name][0] += r
            full[name][1] += g
        cands = retriever.candidates(u, seen, histories[u], max(budgets))
        for n in budgets:
            c = cands[:n]
            in_c = sum(1 for x in c.tolist() if x in rel)
            curve[n][0] += in_c / len(rel)
            r, g = _rank_metrics(_top_k(model_scores, c, K), rel)
            curve[n][1] += r
            curve[n][2] += g
    n_users = max(len(users), 1)
    metrics["top10"] = {
        name: {"recall@10": v[0] / n_users, "ndcg@10": v[1] / n_users} for name, v in full.items()
    }
    metrics["retrieval_curve"] = [
        {
            "budget": n,
            "retrieval_recall": v[0] / n_users,
            "recall@10": v[1] / n_users,
            "ndcg@10": v[2] / n_users,
        }
        for n, v in curve.items()
    ]
    metrics["baselines"] = baselines
    metrics["ranking_users"] = len(users)
    metrics["like_threshold"] = target.like_threshold
    if out_dir is not None:
        out_dir = Path(out_dir)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if plots:
            write_plots(metrics, out_dir)
    return metrics


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    pos, neg = int(label.sum()), int((~label).sum())
    if not pos or not neg:
        return float("nan")
    ranks = np.empty(len(score))
    ranks[np.argsort(score, kind="stable")] = np.arange(1, len(score) + 1)
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def write_plots(metrics: dict[str, Any], out_dir: Path) -> list[Path]:
    """Writes ``retrieval_curve.png`` and ``baselines.png`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    curve = metrics["retrieval_curve"]
    n = [c["budget"] for c in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(n, [c["retrieval_recall"] for c in curve], "o-", label="liked items retrieved")
    ax.plot(n, [c["recall@10"] for c in curve], "s-", label="Recall@10 after ranking")
    ax.plot(n, [c["ndcg@10"] for c in curve], "^-", label="NDCG@10 after ranking")
    ax.set_xscale("log")
    ax.set_xlabel("retrieval budget N (candidates)")
    ax.set_ylabel("share / score")
    ax.set_title("Retrieval trade-off")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "retrieval_curve.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    names, rmse = [], []
    if "rmse" in metrics["model"]:
        names.append("two-tower")
        rmse.append(metrics["model"]["rmse"])
    for name, v in metrics["baselines"].items():
        names.append(name.replace("_", " "))
        rmse.append(v["rmse"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.barh(names, rmse, color=["tab:blue"] + ["tab:gray"] * (len(names) - 1))
    for y, v in enumerate(rmse):
        ax.text(v, y, f" {v:.3f}", va="center")
    ax.set_xlabel("test RMSE (stars, lower is better)")
    ax.set_xlim(0, max(rmse) * 1.2)
    fig.tight_layout()
    paths.append(out_dir / "baselines.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def format_report(metrics: dict[str, Any]) -> str:
    """A readable plain-text table of the metrics."""
    negatives = metrics.get("negatives", 0)
    objective = metrics["objective"] + (f", {negatives} negatives per rating" if negatives else "")
    lines = [f"held-out ratings: {metrics['n_test']:,}   objective: {objective}"]
    lines.append("")
    lines.append(f"{'model':<18}{'RMSE':>8}{'MAE':>8}{'Recall@10':>11}{'NDCG@10':>9}")
    top = metrics["top10"]
    model = metrics["model"]
    rows = [("two-tower", model.get("rmse"), model.get("mae"), top["model"])]
    g = metrics["baselines"]["global_mean"]
    rows.append(("global mean", g["rmse"], g["mae"], None))
    b = metrics["baselines"]["user_item_bias"]
    rows.append(("user/item bias", b["rmse"], b["mae"], top["user_item_bias"]))
    rows.append(("popularity", None, None, top["popularity"]))

    def f(v: float | None, w: int) -> str:
        return f"{v:>{w}.4f}" if v is not None else f"{'-':>{w}}"

    for name, rmse, mae, t in rows:
        rec = t["recall@10"] if t else None
        ndcg = t["ndcg@10"] if t else None
        lines.append(f"{name:<18}{f(rmse, 8)}{f(mae, 8)}{f(rec, 11)}{f(ndcg, 9)}")
    if "auc" in model:
        lines.append(f"two-tower (binary): AUC {model['auc']:.4f}, log loss {model['logloss']:.4f}")
        if negatives:
            # Trained on unrated items as well, the score is the chance that a
            # user picks and likes an item, so it is not calibrated on rated pairs.
            lines.append(
                "  (AUC and log loss are over rated pairs only; with sampled negatives the "
                "score ranks the whole catalogue and is not calibrated for rated pairs)"
            )
    lines.append("")
    lines.append(f"retrieval budget curve ({metrics['ranking_users']} users, liked = rating >= "
                 f"{metrics['like_threshold']:g}):")  # fmt: skip
    lines.append(f"{'N':>6}{'retrieved':>11}{'Recall@10':>11}{'NDCG@10':>9}")
    for c in metrics["retrieval_curve"]:
        lines.append(
            f"{c['budget']:>6}{c['retrieval_recall']:>11.4f}{c['recall@10']:>11.4f}"
            f"{c['ndcg@10']:>9.4f}"
        )
    return "\n".join(lines)


def recorded_spec(info: dict[str, Any]) -> str | None:
    """The dataset spec a manifest's ``dataset`` entry can be reloaded from.

    ``source`` first: it is the spec with its directory resolved, so a
    version trained from ``movielens-100k:../data`` still evaluates from
    another working directory; ``spec`` (as typed) for manifests without it.
    """
    return info.get("source") or info.get("spec")


def load_for_evaluation(
    version_dir: str | Path, data_spec: str | None = None, *, prepared: Prepared | None = None
) -> tuple[Any, Prepared, np.ndarray]:
    """Opens a version, rebuilds its held-out split and embeds every known user.

    The dataset is reloaded from the spec in the manifest (or ``data_spec``),
    with the interaction-log ratings the version keeps when it was trained on
    an export, and re-split with the stored fraction and seed; users are embedded by the
    exported user-tower SavedModel, so figures describe the artifacts serving
    loads, not an in-memory Keras model.

    Args:
        version_dir: The version directory.
        data_spec: Dataset spec overriding the manifest's.
        prepared: An already rebuilt split (another version's) of the same dataset
            and split: reused when this version trained on the same logged
            ratings too, else only its dataset is (with this version's ratings).

    Returns:
        ``(ModelVersion, Prepared, user vectors float32 [n_users, D])``.

    Raises:
        UserFacingError: No dataset spec is known, or the data differs from
            what the version was trained on.
    """
    import tensorflow as tf

    from recsys import artifacts as A
    from recsys.errors import UserFacingError
    from trainer.interactions import version_training_data
    from trainer.prepare import prepare

    try:
        mv = A.ModelVersion.open(version_dir)
    except A.ArtifactError as exc:
        raise UserFacingError(str(exc)) from exc
    info = mv.manifest.get("dataset", {})
    spec = data_spec or recorded_spec(info)
    if prepared is not None:
        dataset = prepared.dataset
    elif not spec:
        raise UserFacingError(f"version {mv.version} does not record its dataset spec; pass --data")
    else:
        from trainer.loaders import load_dataset

        dataset = load_dataset(spec)
    # The ratings merged from an interaction-log export come from the version
    # itself; the hash below is of the dataset's own (they decide the split).
    dataset = version_training_data(mv, dataset)
    if info.get("sha256") and dataset.sha256() != info["sha256"]:
        raise UserFacingError(
            f"dataset {spec!r} is not the data version {mv.version} was trained on "
            "(sha256 differs), so its held-out split would not be held out"
        )
    if prepared is not None and prepared.dataset.logged_sha256() == dataset.logged_sha256():
        p = prepared
    else:
        # Other logged ratings are other training rows, features and
        # histories: only the held-out rows are the same.
        split = info.get("split", {})
        train_rows, test_rows = dataset.split(split.get("test_fraction", 0.2), split.get("seed", 0))
        p = prepare(dataset, train_rows, test_rows)
    if p.spec.to_dict() != mv.spec.to_dict():
        raise UserFacingError(
            f"feature spec rebuilt from {spec!r} differs from version {mv.version}"
        )
    serve = mv.load_tower(A.USER_TOWER).signatures[A.SIGNATURE]
    x = p.user_features
    parts = [
        serve(**{A.INPUT_KEY: tf.constant(x[s : s + 65_536])})[A.OUTPUT_KEY].numpy()
        for s in range(0, len(x), 65_536)
    ]
    users = np.concatenate(parts) if parts else np.zeros((0, mv.dim), np.float32)
    return mv, p, users


def evaluate_version(version_dir: str | Path, data_spec: str | None = None) -> dict[str, Any]:
    """Re-evaluates an exported version on its dataset's held-out split.

    See :func:`load_for_evaluation` for how the split and user vectors are rebuilt.

    Raises:
        UserFacingError: No dataset spec is known, or the data differs from
            what the version was trained on.
    """
    mv, p, user_vectors = load_for_evaluation(version_dir, data_spec)
    metrics = evaluate_prepared(
        p,
        lambda _: user_vectors,
        np.asarray(mv.item_vectors),
        mv.target,
        plots=False,
        negatives=int(mv.manifest.get("training", {}).get("negatives", 0)),
    )
    metrics["version"] = mv.version
    return metrics
