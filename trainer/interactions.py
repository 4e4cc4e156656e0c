"""Online interactions back into training: export the users' logs, merge them into a dataset.

``RecordInteraction`` appends every interaction to its user's log in Redis
(``recsys:user:{uid}:log``, see :mod:`recsys.user_store`). Without this
module the trainer never sees them: each version is trained on its dataset
alone, and ``recsys publish`` replays the whole log onto the batch
aggregates it writes. The loop closes in three steps:

1. ``recsys export-interactions DIR`` writes every *rating* the logs hold
   from before the export started to a new directory ``DIR/<cutoff_ms>/``
   (``ratings.csv``: userId, movieId, rating, timestamp; ``export.json``
   with the cutoff, Redis's clock in milliseconds when the export started).
   It is built under a temporary name and renamed into place whole, so it
   never changes once there; the oldest exports beyond ``--keep`` go.
   Watches without a rating are left out (the datasets are ratings only),
   and so are entries no recording wrote (counted as malformed).
2. ``recsys train --interactions DIR`` appends the newest export's ratings
   to ``--data`` (always on the training side of the split, so the held-out
   split of the dataset itself stays what it was and every exported rating
   reaches the aggregates), records the export, its cutoff and the merged
   ratings' hash in the manifest, and keeps those ratings in the version
   (``recsys.artifacts.LOGGED_RATINGS``), where ``recsys evaluate`` finds
   them again.
3. ``recsys publish`` of that version then replays only what the training
   data does not hold: every watch, and the ratings from the cutoff on.

Nothing is deleted from the logs (a later version trained without the
export needs them all again); they stay capped by
``retrieval.interaction_log_length``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys import redis_keys
from recsys.artifacts import remove_stale_temps
from recsys.errors import UserFacingError
from trainer.dataset import DataError, Dataset

EXPORT_META = "export.json"
EXPORT_RATINGS = "ratings.csv"
EXPORT_FORMAT = 1
# Exports kept in DIR (the newest): a training run that picked one while
# newer ones land still finds it.
KEEP_EXPORTS = 3
HEADER = ["userId", "movieId", "rating", "timestamp"]
_LOG_PATTERN = "recsys:user:{*}:log"
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def user_of_log_key(key: str) -> str | None:
    """The user id whose log ``key`` is, or None for a key of another shape.

    Inverts :func:`recsys.redis_keys.user_log` (backslash escapes) and checks
    the round trip, since the scan pattern also matches keys that only look
    like a log (an event id ending in ``}:log``).
    """
    head, tail = "recsys:user:{", "}:log"
    if not (key.startswith(head) and key.endswith(tail)):
        return None
    uid = _ESCAPED.sub(r"\1", key[len(head) : -len(tail)])
    return uid if redis_keys.user_log(uid) == key else None


@dataclass
class ExportReport:
    """What an export wrote."""

    directory: Path  # DIR/<cutoff_ms>
    cutoff_ms: int  # the logs' ratings from before this are in the export
    users: int = 0  # logs read
    rows: int = 0  # ratings written
    watches: int = 0  # unrated interactions left out
    malformed: int = 0  # entries no recording wrote (no item, a rating that is no number): skipped
    seconds: float = 0.0


def complete_exports(root: str | Path) -> list[Path]:
    """The exports under ``root`` (``<cutoff_ms>/`` holding ``export.json``), oldest first."""
    try:
        children = list(Path(root).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [p for p in children if p.name.isdigit() and (p / EXPORT_META).is_file()]
    return sorted(found, key=lambda p: int(p.name))


def export_interactions(
    redis_client,
    out_dir: str | Path,
    *,
    keep: int = KEEP_EXPORTS,
    scan_count: int = 500,
    quiet: bool = False,
) -> ExportReport:
    """Writes the ratings the users' logs hold from before now to ``out_dir/<cutoff_ms>/``.

    The export is written to a temporary directory and renamed into place
    whole, so a training run reads one export's cutoff and ratings together
    whatever another export does meanwhile; then the exports older than the
    ``keep`` newest, and temporary directories killed exports left, are removed.

    Args:
        redis_client: A synchronous ``redis.Redis``.
        out_dir: Directory of the exports (created).
        keep: Exports to keep in ``out_dir``, this one included.
        scan_count: Keys per SCAN step (and per pipeline of reads).
        quiet: No progress output.

    Returns:
        The report; ``cutoff_ms`` is also in ``export.json``.

    Raises:
        ValueError: ``keep`` < 1.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1 (the export being written)")
    t0 = time.perf_counter()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    # A unique name: every container's export runs as PID 1.
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        sec, usec = redis_client.time()
        # Redis's clock, the one stream ids come from: an entry recorded after
        # this read gets an id from this millisecond on, so "before the cutoff"
        # is exactly what this export can see. The read ends one millisecond
        # short, since entries of the cutoff's own millisecond may still come.
        cutoff_ms = int(sec) * 1000 + int(usec) // 1000
        last = str(cutoff_ms - 1)
        report = ExportReport(root / str(cutoff_ms), cutoff_ms)
        with (tmp / EXPORT_RATINGS).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(HEADER)
            # SCAN returns a key twice when the keyspace shrinks meanwhile: a
            # log exported twice would train twice.
            seen: set[str] = set()
            keys: list[str] = []
            for raw in redis_client.scan_iter(match=_LOG_PATTERN, count=scan_count, _type="stream"):
                key = _text(raw)
                if key in seen:
                    continue
                seen.add(key)
                keys.append(key)
                if len(keys) >= scan_count:
                    _export_logs(redis_client, keys, last, writer, report)
                    keys = []
            _export_logs(redis_client, keys, last, writer, report)
        meta = {
            "format": EXPORT_FORMAT,
            "cutoff_ms": cutoff_ms,
            "rows": report.rows,
            "users": report.users,
            "watches_left_out": report.watches,
            "malformed": report.malformed,
        }
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, report.directory)
        except OSError as exc:
            # Another export of the same millisecond is in place: it read the
            # same entries (none can get an id before the cutoff any more).
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(root, keep)
    report.seconds = time.perf_counter() - t0
    if not quiet:
        print(
            f"export-interactions: {report.rows:,} ratings from {report.users:,} users' logs "
            f"({report.watches:,} unrated watches left out, {report.malformed:,} malformed "
            f"entries skipped) to {report.directory}",
            file=sys.stderr,
        )
    return report


def _prune(root: Path, keep: int) -> None:
    """Removes the exports older than the ``keep`` newest."""
    for old in complete_exports(root)[:-keep]:
        # Renamed away first, so it disappears whole: a training run that
        # still reads it fails on a missing file, never mixes two exports.
        gone = root / f".tmp-{uuid.uuid4().hex}"
        with contextlib.suppress(OSError):  # another export's prune took it
            os.rename(old, gone)
            shutil.rmtree(gone, ignore_errors=True)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _export_logs(redis_client, keys: list[str], last: str, writer, report: ExportReport) -> None:
    """Reads ``keys``' entries up to ``last`` in one pipeline and writes their ratings."""
    users = [(key, user_of_log_key(key)) for key in keys]
    users = [(key, uid) for key, uid in users if uid is not None]
    if not users:
        return
    pipe = redis_client.pipeline(transaction=False)
    for key, _ in users:
        pipe.xrange(key, "-", last)
    for (_, uid), entries in zip(users, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(entries, Exception):
            continue  # replaced by another type since the scan saw it
        report.users += 1
        for entry_id, fields in entries:
            f = {_text(k): _text(v) for k, v in fields.items()}
            item, rating = f.get("item", ""), f.get("r", "")
            if item and not rating:
                report.watches += 1
                continue
            # Skipped as publish's replay skips it: one bad entry must not
            # fail every training (the merge refuses a rating that is no number).
            if not item or not _finite(rating):
                report.malformed += 1
                continue
            ts = f.get("ts", "0")
            if not ts.isdigit() or ts == "0":  # no event time given: when it was recorded
                ts = str(int(_text(entry_id).split("-")[0]) // 1000)
            writer.writerow([uid, item, rating, ts])
            report.rows += 1


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


@dataclass(frozen=True)
class Merged:
    """What :func:`merge_interactions` added to a dataset (the manifest's record of it)."""

    directory: str  # the export read (DIR/<cutoff_ms>)
    cutoff_ms: int
    rows: int  # ratings appended
    unknown_users: int  # ratings of users the dataset does not have (left out)
    unknown_items: int  # ratings of items not in the catalogue (left out)
    out_of_range: int  # ratings outside the dataset's scale (left out)
    sha256: str  # of the ratings appended (Dataset.logged_sha256), which the version keeps

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``dataset.interactions`` entry."""
        return dataclasses.asdict(self)


def merge_interactions(dataset: Dataset, directory: str | Path) -> tuple[Dataset, Merged]:
    """Appends an export's ratings to ``dataset``; they always train (``Dataset.logged_rows``).

    ``directory`` is the one ``recsys export-interactions`` wrote to (its
    newest complete export is read) or one export in it. Ratings of users or
    items the dataset does not have, or outside its rating scale, are left
    out and counted: a user only the logs know has no side features to
    train with (publish replays that user's log as before).

    Raises:
        DataError: The directory holds no complete export, or a malformed one.
    """
    d = Path(directory).resolve()
    # The newest export first: a directory the export once wrote into
    # directly (before exports had their own) may hold an older one itself.
    exports = complete_exports(d)
    if exports:
        d = exports[-1]
    meta_path, rows_path = d / EXPORT_META, d / EXPORT_RATINGS
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{meta_path}: no such file; --interactions takes a directory "
            "`recsys export-interactions` wrote, or one export in it"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{meta_path}: {exc}") from exc
    if not isinstance(meta, dict):
        meta = {}
    cutoff = meta.get("cutoff_ms")
    if meta.get("format") != EXPORT_FORMAT or not isinstance(cutoff, int) or cutoff <= 0:
        raise DataError(f"{meta_path}: not an export of format {EXPORT_FORMAT} with a cutoff_ms")
    users = {u: i for i, u in enumerate(dataset.user_ids)}
    items = {it: i for i, it in enumerate(dataset.item_ids)}
    new_user: list[int] = []
    new_item: list[int] = []
    new_rating: list[float] = []
    new_ts: list[int] = []
    unknown_users = unknown_items = out_of_range = 0
    try:
        with rows_path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            if next(reader, None) != HEADER:
                raise DataError(f"{rows_path}: line 1: the header is not {','.join(HEADER)}")
            for line, row in enumerate(reader, start=2):
                if len(row) != 4:
                    raise DataError(f"{rows_path}: line {line}: {len(row)} fields, not 4")
                try:
                    rating, ts = float(row[2]), int(row[3])
                except ValueError:
                    raise DataError(
                        f"{rows_path}: line {line}: rating {row[2]!r} or timestamp "
                        f"{row[3]!r} is not a number"
                    ) from None
                u, i = users.get(row[0]), items.get(row[1])
                if u is None:
                    unknown_users += 1
                elif i is None:
                    unknown_items += 1
                elif not dataset.rating_min <= rating <= dataset.rating_max:
                    out_of_range += 1
                else:
                    new_user.append(u)
                    new_item.append(i)
                    new_rating.append(rating)
                    new_ts.append(ts)
    except FileNotFoundError:
        raise DataError(f"{rows_path}: no such file (an export cut short?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{rows_path}: {exc}") from exc
    merged = dataset.with_logged(
        rating_user=new_user, rating_item=new_item, rating=new_rating, timestamp=new_ts
    )
    info = Merged(
        str(d), cutoff, len(new_user), unknown_users, unknown_items, out_of_range,
        merged.logged_sha256(),
    )  # fmt: skip
    return merged, info


def load_training_data(
    spec: str, interactions: str | Path | None = None
) -> tuple[Dataset, Merged | None]:
    """The dataset a ``--data`` spec names, with an export's ratings merged when given."""
    from trainer.loaders import load_dataset

    dataset = load_dataset(spec)
    if interactions is None:
        return dataset, None
    return merge_interactions(dataset, interactions)


def version_training_data(mv, dataset: Dataset) -> Dataset:
    """``dataset``'s own ratings plus the logged ones version ``mv`` trained on.

    Those come from the version itself (``recsys.artifacts.LOGGED_RATINGS``),
    checked against the hash its manifest recorded; a version trained
    without an export gets the dataset alone.

    Args:
        mv: An opened ``recsys.artifacts.ModelVersion``.
        dataset: Its dataset (any ratings merged into it are replaced).

    Raises:
        UserFacingError: The version does not carry the ratings it trained on.
    """
    merged = mv.manifest.get("dataset", {}).get("interactions")
    if not merged:
        return dataset.with_logged()
    if "sha256" not in merged:
        raise UserFacingError(
            f"version {mv.version} was trained on the interaction export in "
            f"{merged.get('directory')} before versions kept the ratings they trained on, "
            "so its training data cannot be rebuilt; train it again to evaluate it"
        )
    out = dataset.with_logged(**(mv.logged_ratings() or {}))
    if out.logged_sha256() != merged["sha256"]:
        raise UserFacingError(
            f"version {mv.version}: the interaction-log ratings it keeps are not the ones it "
            "trained on (sha256 differs)"
        )
    return out


def cli_export(args, settings) -> int:
    """``recsys export-interactions DIR [--keep N]``."""
    import redis

    from recsys.errors import describe_error

    if args.keep < 1:
        raise UserFacingError("--keep must be 1 or more (the export being written)")
    client = redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=60)
    try:
        report = export_interactions(client, args.out, keep=args.keep, quiet=args.quiet)
    except redis.RedisError as exc:
        raise UserFacingError(f"Redis failed during the export: {describe_error(exc)}") from exc
    except OSError as exc:
        raise UserFacingError(f"cannot write the export to {args.out}: {exc}") from exc
    finally:
        client.close()
    print(f"exported {report.rows} ratings (cutoff_ms {report.cutoff_ms}) to {report.directory}")
    return 0
