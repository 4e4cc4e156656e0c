"""Training: split, prepare features, fit the two towers, evaluate and export a version."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.dataset import DataError, Dataset
from trainer.interactions import Merged
from trainer.prepare import Prepared, prepare

# The evaluation split is fixed (seed 0) whatever the model seed, so figures
# for MovieLens 100K always compare with the published reference numbers.
SPLIT_SEED = 0


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults match ``TrainerSettings``)."""

    objective: str = "rating"
    hidden_units: tuple[int, ...] = (256, 128)
    embedding_dim: int = 32
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 1e-3
    patience: int = 3
    seed: int = 0
    test_fraction: float = 0.2
    # 10 trees + the annoy_similar source's search_k 750: recall@10 0.957 and
    # recall@50 0.90 on 100K x 32 vectors, at 0.88-0.93x the query time of the
    # earlier 30 trees + 550 (recall@10 0.961, recall@50 0.89), and a third of
    # the tree nodes to build and map. bench/retrieval.py sweeps the alternatives.
    annoy_trees: int = 10
    id_embeddings: bool = False
    id_l2: float = 1e-5
    # Multiply the learning rate by this after an epoch without validation
    # improvement (0 = constant rate); needs patience > 0.
    lr_plateau_factor: float = 0.0
    l2: float = 0.0
    dropout: float = 0.0
    leave_one_out: bool = True
    validation_fraction: float = 0.1
    top_n: int = 1000
    split_seed: int = SPLIT_SEED
    data_spec: str | None = None
    # Binary objective: unrated (user, item) pairs per rating, labelled 0.
    negatives: int = 0

    @classmethod
    def from_settings(cls, trainer_settings: Any, **overrides: Any) -> TrainConfig:
        """From ``settings.trainer``; ``overrides`` that are not None win."""
        base = {
            f.name: getattr(trainer_settings, f.name)
            for f in dataclasses.fields(cls)
            if hasattr(trainer_settings, f.name)
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        base["hidden_units"] = tuple(int(u) for u in base.get("hidden_units", (256, 128)))
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        d = dataclasses.asdict(self)
        d["hidden_units"] = list(self.hidden_units)
        return d


@dataclass
class TrainResult:
    """What a run produced."""

    version_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0
    epochs_run: int = 0


def set_determinism(seed: int) -> None:
    """Seeds Python, NumPy and TensorFlow and asks TF for deterministic kernels."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    # Raises if this process already ran ops with other settings; harmless then.
    with contextlib.suppress(RuntimeError):
        tf.config.experimental.enable_op_determinism()


def sample_negatives(
    p: Prepared, rows: np.ndarray, per_row: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``per_row`` unrated items for the user of each rating row: ``(users, items)``.

    Items are drawn uniformly from the catalogue. Draws that hit an item the
    user rated in training are dropped, not redrawn, so none of them is a
    rating the model also sees as a positive. A user therefore keeps a little
    under ``per_row`` negatives per rating: fewer by the share of the
    catalogue they rated.
    """
    d = p.dataset
    users = np.repeat(d.rating_user[rows].astype(np.int64), per_row)
    items = rng.integers(0, d.n_items, users.shape[0], dtype=np.int64)
    train = p.train_rows
    rated = np.unique(
        d.rating_user[train].astype(np.int64) * d.n_items + d.rating_item[train].astype(np.int64)
    )
    keep = ~np.isin(users * d.n_items + items, rated, assume_unique=False)
    return users[keep], items[keep]


def add_negatives(
    p: Prepared,
    rows: np.ndarray,
    x: tuple[np.ndarray, ...],
    y: np.ndarray,
    per_row: int,
    rng: np.random.Generator,
    *,
    ids: bool,
) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Appends sampled unrated pairs (label 0) to the model inputs of ``rows``.

    A negative's user and item features are their full training aggregates:
    the pair has no rating to leave out.
    """
    users, items = sample_negatives(p, rows, per_row, rng)
    extra: list[np.ndarray] = [p.user_features[users], p.item_features[items]]
    if ids:
        extra.append(items.astype(np.int32))
    x_all = tuple(np.concatenate([a, b]) for a, b in zip(x, extra, strict=True))
    y_all = np.concatenate([y, np.zeros((users.shape[0], 1), y.dtype)])
    return x_all, y_all


def fit(p: Prepared, cfg: TrainConfig, *, quiet: bool = False):
    """Builds the two-tower model under the current ``tf.distribute`` strategy and trains it.

    Returns:
        ``(TwoTower, history dict, epochs run)``.
    """
    import keras
    import tensorflow as tf

    from recsys.features import TargetScale
    from trainer.model import build_two_tower

    if cfg.negatives < 0:
        raise ValueError(f"negatives must be 0 or more, not {cfg.negatives}")
    if cfg.negatives and cfg.objective != "binary":
        # A rating model has no label for "not watched": sampled pairs would
        # need an invented star rating.
        raise ValueError("negatives need the binary objective (--objective binary)")
    if not 0 <= cfg.lr_plateau_factor < 1:
        raise ValueError(f"lr_plateau_factor must be in [0, 1), not {cfg.lr_plateau_factor}")
    set_determinism(cfg.seed)
    rows = p.train_rows
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(rows))
    n_val = round(len(rows) * cfg.validation_fraction) if cfg.patience > 0 else 0
    val_rows, fit_rows = rows[perm[:n_val]], rows[perm[n_val:]]
    target = TargetScale(
        objective=cfg.objective,  # type: ignore[arg-type]
        rating_min=p.spec.rating_min,
        rating_max=p.spec.rating_max,
    )

    def inputs(r: np.ndarray):
        x: tuple[np.ndarray, ...] = p.row_features(r, leave_one_out=cfg.leave_one_out)
        if cfg.id_embeddings:
            x = (*x, p.dataset.rating_item[r].astype(np.int32))
        y = target.to_model(p.dataset.rating[r])[:, None]
        return x, y

    x_fit, y_fit = inputs(fit_rows)
    if cfg.negatives:
        x_fit, y_fit = add_negatives(
            p, fit_rows, x_fit, y_fit, cfg.negatives, rng, ids=cfg.id_embeddings
        )
    user_sample = x_fit[0]
    if p.dataset.logged_users:
        # The user tower's input scaling is the dataset's own users': a few
        # users only the interaction logs know (no age, gender, occupation)
        # made a column constant for the dataset (age_missing) nearly so, and
        # a nearly constant column scales its rare value to an extreme, for
        # them and for every cold-start request with the same gap. Computed
        # from the positives alone then (the negatives' users are not kept;
        # they follow the positives in x_fit).
        own = p.dataset.rating_user[fit_rows] < p.dataset.n_own_users
        user_sample = user_sample[: len(fit_rows)][own]
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        tt = build_two_tower(
            p.spec,
            hidden_units=cfg.hidden_units,
            embedding_dim=cfg.embedding_dim,
            objective=cfg.objective,  # type: ignore[arg-type]
            learning_rate=cfg.learning_rate,
            l2=cfg.l2,
            dropout=cfg.dropout,
            user_sample=user_sample,
            item_sample=x_fit[1],
            n_items=p.dataset.n_items if cfg.id_embeddings else 0,
            id_l2=cfg.id_l2,
        )
    callbacks = []
    validation = None
    if n_val:
        validation = inputs(val_rows)
        if cfg.negatives:
            validation = add_negatives(
                p, val_rows, *validation, cfg.negatives, rng, ids=cfg.id_embeddings
            )
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=cfg.patience, restore_best_weights=True
            )
        )
        if 0 < cfg.lr_plateau_factor < 1:
            # Smaller steps once validation stalls: on MovieLens the first stall is
            # step noise, not the optimum, and a lower rate finds a better minimum.
            callbacks.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor="val_loss", factor=cfg.lr_plateau_factor, patience=1, verbose=0
                )
            )
    verbose = 0 if quiet else (1 if sys.stderr.isatty() else 2)
    hist = tt.model.fit(
        list(x_fit),
        y_fit,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        validation_data=(list(validation[0]), validation[1]) if validation else None,
        callbacks=callbacks,
        shuffle=True,
        verbose=verbose,
    )
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    return tt, history, len(history.get("loss", []))


def dataset_manifest(
    dataset: Dataset, p: Prepared, cfg: TrainConfig, interactions: Merged | None = None
) -> dict[str, Any]:
    """The manifest's ``dataset`` entry (also what ``recsys evaluate`` reloads from).

    ``interactions``: the interaction-log export merged into the data, whose
    cutoff tells ``recsys publish`` which logged ratings the version holds.
    ``sha256`` is of the data without them (what ``--data`` loads, which
    alone decides the held-out split), so versions trained on it with
    different exports are compared on the same held-out rows; the merged
    ratings' own hash is in ``interactions``, and so is how many of them
    the split left out (``held_out_pairs``, see ``Dataset.split``).
    """
    extra = {} if interactions is None else {"interactions": interactions.to_dict()}
    return {
        **extra,
        "name": dataset.name,
        "source": dataset.source,
        "spec": cfg.data_spec,
        "sha256": dataset.sha256(),
        "n_users": dataset.n_users,
        "n_items": dataset.n_items,
        "n_ratings": dataset.n_ratings,
        "n_genres": len(dataset.genres),
        "split": {
            "test_fraction": cfg.test_fraction,
            "seed": cfg.split_seed,
            "n_train": len(p.train_rows),
            "n_test": len(p.test_rows),
        },
    }


def _print_merged(m: Merged) -> None:
    """The summary line of the export merged into the data (after the dataset's line)."""
    left = m.unknown_items + m.out_of_range + m.refused_ids
    print(
        f"train: {m.rows:,} of them from the interaction logs ({m.directory}), "
        f"{m.held_out_pairs:,} of those not trained on (the split holds out the "
        f"dataset's rating of the same user and item); {m.new_users:,} users only the "
        f"logs know, added with unknown side features; {left:,} ratings left out "
        f"({m.unknown_items:,} of items the data does not have, {m.out_of_range:,} "
        f"outside its rating scale, {m.refused_ids:,} of new users whose id the services "
        "refuse)",
        file=sys.stderr,
    )


def train(
    dataset: Dataset,
    model_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    evaluate: bool = True,
    plots: bool = True,
    quiet: bool = False,
    interactions: Merged | None = None,
) -> TrainResult:
    """Trains on ``dataset`` and exports a new version under ``model_dir``.

    Args:
        dataset: Ratings with side information.
        model_dir: Root of the numbered versions.
        cfg: Hyper-parameters (defaults: :class:`TrainConfig`).
        evaluate: Compute the evaluation report (``metrics.json``, plots).
        plots: Write PNG plots with the report.
        quiet: No progress bars or messages.
        interactions: The interaction-log export merged into ``dataset``
            (:func:`trainer.interactions.load_training_data`), recorded in the manifest.

    Returns:
        The new version's path, its metrics and timings.
    """
    from trainer.export import export_version

    cfg = cfg or TrainConfig()
    if dataset.n_ratings == 0:
        raise DataError(f"dataset {dataset.name} ({dataset.source}) has no ratings")
    train_rows, test_rows = dataset.split(cfg.test_fraction, cfg.split_seed)
    if interactions is not None:
        # The logged ratings the split left out: their (user, item) pair is held out.
        held_out = dataset.n_ratings - len(train_rows) - len(test_rows)
        interactions = dataclasses.replace(interactions, held_out_pairs=held_out)
        if not quiet:
            _print_merged(interactions)
    p = prepare(dataset, train_rows, test_rows)
    t0 = time.perf_counter()
    tt, history, epochs_run = fit(p, cfg, quiet=quiet)
    train_seconds = time.perf_counter() - t0
    if not quiet:
        print(f"train: {epochs_run} epochs in {train_seconds:.1f}s", file=sys.stderr, flush=True)

    report = None
    if evaluate:
        from trainer.evaluate import evaluate_prepared

        def report(tmp: Path, vectors: np.ndarray) -> dict[str, Any]:
            return evaluate_prepared(
                p,
                tt.user_tower,
                vectors,
                tt.target_scale(p.spec),
                out_dir=tmp,
                plots=plots,
                negatives=cfg.negatives,
            )

    manifest = {
        "dataset": dataset_manifest(dataset, p, cfg, interactions),
        "model": {"epochs_run": epochs_run, "train_seconds": round(train_seconds, 2)},
        "training": {**cfg.to_dict(), "history": history},
    }
    path = export_version(
        model_dir,
        p,
        tt,
        manifest=manifest,
        annoy_trees=cfg.annoy_trees,
        top_n=cfg.top_n,
        report=report,
        quiet=quiet,
    )
    import json

    metrics = json.loads((path / "manifest.json").read_text()).get("metrics", {})
    return TrainResult(path, metrics, train_seconds, epochs_run)
