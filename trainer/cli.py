"""``recsys train`` and ``recsys evaluate``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from recsys.artifacts import ArtifactError, latest_version
from recsys.config import RecsysSettings
from recsys.errors import UserFacingError


def _hidden_units(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        units = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        units = ()
    if not units or any(u < 1 for u in units):
        raise UserFacingError(
            f"--hidden-units must be comma-separated positive integers, e.g. 256,128 (got {text!r})"
        )
    return units


def _check_writable_model_dir(model_dir: Path) -> None:
    """Refuses, before any training, a model dir the new version could not be written to."""
    existing = model_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # created on export: its nearest existing parent decides
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserFacingError(
            f"model dir {model_dir}: cannot write a version there "
            f"({existing} is {'not writable' if existing.is_dir() else 'not a directory'})"
        )


def cli_train(args: argparse.Namespace, settings: RecsysSettings) -> int:
    """Trains on ``--data``, exports a version under the model dir and prints the report."""
    if getattr(args, "redis_url", None) is not None and not args.publish:
        # Only the publish reaches Redis: without it the URL would do nothing.
        raise UserFacingError("--redis-url is for --publish (training alone does not use Redis)")
    from pydantic import ValidationError

    from recsys.config import TrainerSettings
    from trainer.train import TrainConfig

    flags = {
        "objective": args.objective,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "hidden_units": _hidden_units(args.hidden_units),
        "embedding_dim": args.embedding_dim,
        "id_embeddings": True if args.id_embeddings else None,
        "annoy_trees": args.annoy_trees,
        "negatives": getattr(args, "negatives", None),
        "dropout": getattr(args, "dropout", None),
        "lr_plateau_factor": getattr(args, "lr_plateau_factor", None),
        "seed": args.seed,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        # The [trainer] section's own checks, with the flags in it: a flag
        # took values (an embedding width of 1, 200 negatives) the file refuses.
        trainer = TrainerSettings.model_validate({**settings.trainer.model_dump(), **given})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        if not name:  # a check across fields
            where = "trainer settings"
        else:
            where = f"--{name.replace('_', '-')}" if name in given else f"trainer.{name}"
        raise UserFacingError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None
    cfg = TrainConfig.from_settings(trainer, data_spec=args.data)
    if cfg.negatives and cfg.objective != "binary":
        raise UserFacingError(
            f"--negatives {cfg.negatives} needs --objective binary: a rating model has no "
            "label for an item the user did not rate"
        )
    _check_writable_model_dir(Path(settings.model_dir))
    with _sigterm_unwinds():
        return _train_and_report(args, settings, cfg)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit meanwhile; the previous handler comes back after.

    An export cut short then removes its temporary directory instead of
    leaving a full-size copy in the model store. Restoring the handler
    matters to callers of ``main()`` in-process (tests).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train_and_report(args: argparse.Namespace, settings: RecsysSettings, cfg) -> int:
    from trainer.evaluate import format_report
    from trainer.interactions import load_training_data
    from trainer.train import train

    max_id_bytes = min(settings.retrieval.max_id_bytes, settings.ranking.max_id_bytes)
    dataset, merged = load_training_data(
        args.data, getattr(args, "interactions", None), max_id_bytes=max_id_bytes
    )
    dataset.check_ids(max_id_bytes)
    if not args.quiet:
        print(
            f"train: {dataset.name} from {dataset.source}: {dataset.n_users:,} users, "
            f"{dataset.n_items:,} items, {dataset.n_ratings:,} ratings",
            file=sys.stderr,
        )
    try:
        result = train(
            dataset,
            settings.model_dir,
            cfg,
            evaluate=True,
            plots=not args.no_plots,
            quiet=args.quiet,
            interactions=merged,
        )
    except (OSError, ArtifactError) as exc:
        # A full disk or a model dir that refuses the rename: one line, not a
        # traceback from numpy's writer (the temporary directory is removed).
        raise UserFacingError(
            f"could not write the new version under {settings.model_dir}: {exc}"
        ) from exc
    print(format_report(result.metrics))
    print(f"\nversion {result.version_dir.name} written to {result.version_dir}")
    if args.publish:
        from trainer.publish import publish_with_settings

        rep = publish_with_settings(result.version_dir, settings, quiet=args.quiet)
        print(f"published version {rep.version}")
    return 0


def _version_path(version: str, settings: RecsysSettings) -> Path:
    """A version named by number (under the model dir) or by its directory."""
    # Under the model dir first: a bare number that is also a directory here
    # (run from inside another model dir) must not pick that one.
    under = Path(settings.model_dir) / version
    path = under if under.is_dir() or not Path(version).is_dir() else Path(version)
    if not path.is_dir():
        raise UserFacingError(f"version {version} not found (no directory {path})")
    return path


def cli_evaluate(args: argparse.Namespace, settings: RecsysSettings) -> int:
    """Re-evaluates a version (default: the latest), or compares it with ``--compare``."""
    from trainer.evaluate import evaluate_version, format_report

    version = args.version or latest_version(settings.model_dir)
    if version is None:
        raise UserFacingError(f"no complete model version under {settings.model_dir}")
    path = _version_path(version, settings)
    if args.compare:
        from trainer.compare import compare_versions, format_comparison

        result = compare_versions(path, _version_path(args.compare, settings), data_spec=args.data)
        text = json.dumps(result, indent=2, sort_keys=True) if args.json else None
        print(text or format_comparison(result))
        return 0
    metrics = evaluate_version(path, args.data)
    if args.json:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    else:
        print(f"version {metrics['version']} ({path})")
        print(format_report(metrics))
    return 0
