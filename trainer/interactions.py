"""Online interactions back into training: export the users' logs, merge them into a dataset.

``RecordInteraction`` appends every interaction to its user's log in Redis
(``recsys:user:{uid}:log``, see :mod:`recsys.user_store`). Without this
module the trainer never sees them: each version is trained on its dataset
alone, and ``recsys publish`` replays the whole log onto the batch
aggregates it writes. The loop closes in three steps:

1. ``recsys export-interactions DIR`` writes every *rating* the logs hold
   from before the export started (``ratings.csv``: userId, movieId, rating,
   timestamp) and ``export.json`` with the cutoff (Redis's clock, in
   milliseconds, when the export started). Watches without a rating are left
   out: the datasets are ratings only.
2. ``recsys train --interactions DIR`` appends those ratings to ``--data``
   (always on the training side of the split, so the held-out split of the
   dataset itself stays what it was and every exported rating reaches the
   aggregates) and records the export and its cutoff in the manifest.
3. ``recsys publish`` of that version then replays only what the training
   data does not hold: every watch, and the ratings from the cutoff on.

Nothing is deleted from the logs (a later version trained without the
export needs them all again); they stay capped by
``retrieval.interaction_log_length``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys import redis_keys
from trainer.dataset import DataError, Dataset

EXPORT_META = "export.json"
EXPORT_RATINGS = "ratings.csv"
EXPORT_FORMAT = 1
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

    directory: Path
    cutoff_ms: int  # the logs' ratings from before this are in the export
    users: int = 0  # logs read
    rows: int = 0  # ratings written
    watches: int = 0  # unrated interactions left out
    seconds: float = 0.0


def export_interactions(
    redis_client, out_dir: str | Path, *, scan_count: int = 500, quiet: bool = False
) -> ExportReport:
    """Writes the ratings the users' logs hold from before now to ``out_dir``.

    Args:
        redis_client: A synchronous ``redis.Redis``.
        out_dir: Directory to write ``ratings.csv`` and ``export.json`` to
            (created; an earlier export there is replaced).
        scan_count: Keys per SCAN step (and per pipeline of reads).
        quiet: No progress output.

    Returns:
        The report; ``cutoff_ms`` is also in ``export.json``.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # First: an export cut short must not leave the last one's cutoff beside
    # this one's ratings (training would count the ratings between the two
    # cutoffs twice). Without export.json the directory is refused.
    (out / EXPORT_META).unlink(missing_ok=True)
    sec, usec = redis_client.time()
    # Redis's clock, the one stream ids come from: an entry recorded after
    # this read gets an id from this millisecond on, so "before the cutoff"
    # is exactly what this export can see. The read ends one millisecond
    # short, since entries of the cutoff's own millisecond may still come.
    cutoff_ms = int(sec) * 1000 + int(usec) // 1000
    last = str(cutoff_ms - 1)
    report = ExportReport(out, cutoff_ms)
    part = out / f".{EXPORT_RATINGS}.{os.getpid()}.tmp"
    try:
        with part.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(HEADER)
            keys: list[str] = []
            for key in redis_client.scan_iter(match=_LOG_PATTERN, count=scan_count, _type="stream"):
                keys.append(key.decode() if isinstance(key, bytes) else key)
                if len(keys) >= scan_count:
                    _export_logs(redis_client, keys, last, writer, report)
                    keys = []
            _export_logs(redis_client, keys, last, writer, report)
        os.replace(part, out / EXPORT_RATINGS)
    finally:
        part.unlink(missing_ok=True)
    meta = {
        "format": EXPORT_FORMAT,
        "cutoff_ms": cutoff_ms,
        "rows": report.rows,
        "users": report.users,
        "watches_left_out": report.watches,
    }
    tmp = out / f".{EXPORT_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / EXPORT_META)  # last: its presence marks a whole export
    report.seconds = time.perf_counter() - t0
    if not quiet:
        print(
            f"export-interactions: {report.rows:,} ratings from {report.users:,} users' logs "
            f"({report.watches:,} unrated watches left out) to {out}",
            file=sys.stderr,
        )
    return report


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
            if not f.get("r"):
                report.watches += int("item" in f)
                continue
            ts = f.get("ts", "0")
            if not ts.isdigit() or ts == "0":  # no event time given: when it was recorded
                ts = str(int(_text(entry_id).split("-")[0]) // 1000)
            writer.writerow([uid, f.get("item", ""), f["r"], ts])
            report.rows += 1


@dataclass(frozen=True)
class Merged:
    """What :func:`merge_interactions` added to a dataset (the manifest's record of it)."""

    directory: str
    cutoff_ms: int
    rows: int  # ratings appended
    unknown_users: int  # ratings of users the dataset does not have (left out)
    unknown_items: int  # ratings of items not in the catalogue (left out)
    out_of_range: int  # ratings outside the dataset's scale (left out)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``dataset.interactions`` entry."""
        return dataclasses.asdict(self)


def merge_interactions(dataset: Dataset, directory: str | Path) -> tuple[Dataset, Merged]:
    """Appends an export's ratings to ``dataset``; they always train (``Dataset.logged_rows``).

    Ratings of users or items the dataset does not have, or outside its
    rating scale, are left out and counted: a user only the logs know has no
    side features to train with (publish replays that user's log as before).

    Raises:
        DataError: The directory holds no complete export, or a malformed one.
    """
    d = Path(directory).resolve()
    meta_path, rows_path = d / EXPORT_META, d / EXPORT_RATINGS
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{meta_path}: no such file; --interactions takes a directory "
            "`recsys export-interactions` wrote"
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
    merged = dataclasses.replace(
        dataset,
        rating_user=np.concatenate([dataset.rating_user, np.array(new_user, np.int32)]),
        rating_item=np.concatenate([dataset.rating_item, np.array(new_item, np.int32)]),
        rating=np.concatenate([dataset.rating, np.array(new_rating, np.float32)]),
        timestamp=np.concatenate([dataset.timestamp, np.array(new_ts, np.int64)]),
        logged_rows=dataset.logged_rows + len(new_user),
    )
    info = Merged(str(d), cutoff, len(new_user), unknown_users, unknown_items, out_of_range)
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


def cli_export(args, settings) -> int:
    """``recsys export-interactions DIR``."""
    import redis

    from recsys.errors import UserFacingError, describe_error

    client = redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=60)
    try:
        report = export_interactions(client, args.out, quiet=args.quiet)
    except redis.RedisError as exc:
        raise UserFacingError(f"Redis failed during the export: {describe_error(exc)}") from exc
    except OSError as exc:
        raise UserFacingError(f"cannot write the export to {args.out}: {exc}") from exc
    finally:
        client.close()
    print(f"exported {report.rows} ratings (cutoff_ms {report.cutoff_ms}) to {report.directory}")
    return 0
