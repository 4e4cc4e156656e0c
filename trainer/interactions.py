"""Online interactions back into training: export the users' logs, merge them into a dataset.

``RecordInteraction`` appends every interaction to its user's log in Redis
(``recsys:user:{uid}:log``, see :mod:`recsys.user_store`). Without this
module the trainer never sees them: each version is trained on its dataset
alone, and ``recsys publish`` replays the whole log onto the batch
aggregates it writes. The loop closes in three steps:

1. ``recsys export-interactions DIR`` writes a new directory
   ``DIR/<cutoff_ms>/`` (``ratings.csv``: userId, movieId, rating,
   timestamp, logId, the log entry's stream id; ``export.json`` with the
   cutoff, Redis's clock in milliseconds when the export started). It holds
   every row of the newest previous export, then every *rating* the logs
   hold from before the cutoff past the user's newest logId in it: the
   logs are capped, so a rating once exported must stay in every later
   export, or it would leave training once newer interactions pushed it out
   of its log. It is built under a temporary name and renamed into place
   whole, so it never changes once there; the oldest exports beyond
   ``--keep`` go. Watches without a rating are left out (the datasets are
   ratings only), and so are entries no recording wrote (counted as malformed).
2. ``recsys train --interactions DIR`` appends the newest export's ratings
   to ``--data`` (outside the split, so the held-out split of the dataset
   itself stays what it was; they all train except those of a held-out
   (user, item) pair, see ``Dataset.split``), records the export, its
   cutoff and the merged ratings' hash in the manifest, and keeps those
   ratings in the version (``recsys.artifacts.LOGGED_RATINGS``), where
   ``recsys evaluate`` finds them again.
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
import fcntl
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from recsys import redis_keys
from recsys.artifacts import ArtifactError, remove_stale_temps
from recsys.checks import FieldError, check_id
from recsys.errors import UserFacingError
from trainer.dataset import DataError, Dataset

EXPORT_META = "export.json"
EXPORT_RATINGS = "ratings.csv"
# 2: rows carry their log entry's stream id, and each export carries the
# previous one's rows. An export of format 1 (before that) is not carried:
# the next export starts over from the logs, as every export did then.
EXPORT_FORMAT = 2
OLD_FORMAT = 1
# Exports kept in DIR (the newest): a training run that picked one while
# newer ones land still finds it.
KEEP_EXPORTS = 3
HEADER = ["userId", "movieId", "rating", "timestamp", "logId"]
# Logs per pipelined read: a full log is 200 entries, so ~20k entries at a time.
_LOGS_PER_READ = 100
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
    previous: Path | None = None  # the export whose rows it carries
    started_over: Path | None = None  # a previous export of OLD_FORMAT, not carried
    carried: int = 0  # rows of the previous export (all of them)
    new: int = 0  # ratings from the logs the previous export did not hold
    users: int = 0  # logs read
    watches: int = 0  # unrated interactions left out
    malformed: int = 0  # entries no recording wrote (no item, a rating that is no number): skipped
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        """Ratings written."""
        return self.carried + self.new


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
    """Writes the exported ratings plus the logs' ones from before now to ``out_dir/<cutoff_ms>/``.

    The export holds every row of the newest previous export in ``out_dir``
    and then the logs' ratings it does not hold (by user and log entry id),
    so a rating stays exported after it left its capped log. The export is
    written to a temporary directory and renamed into place
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
        DataError: The previous export is malformed (carrying nothing from
            it would drop the ratings it holds that left the logs).
    """
    if keep < 1:
        raise ValueError("keep must be at least 1 (the export being written)")
    t0 = time.perf_counter()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root):
        report = _export_locked(redis_client, root, keep, scan_count)
    report.seconds = time.perf_counter() - t0
    if not quiet:
        if report.previous:
            source = f"carried from export {report.previous.name}"
        elif report.started_over:
            source = (
                f"carried: export {report.started_over.name} is of format {OLD_FORMAT}, "
                "without log ids, so this one starts over from the logs"
            )
        else:
            source = "carried: no previous export"
        print(
            f"export-interactions: {report.rows:,} ratings ({report.carried:,} {source}; "
            f"{report.new:,} new from {report.users:,} users' logs, {report.watches:,} unrated "
            f"watches left out, {report.malformed:,} malformed entries skipped) "
            f"to {report.directory}",
            file=sys.stderr,
        )
    return report


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Holds ``root/.lock`` (an ``flock``): one export at a time writes into ``root``.

    Two overlapping exports (a "train now" Job beside the nightly one) could
    otherwise lose a rating: the earlier one read it, it left its capped log
    before the later one read the logs, and the later one, landing as the
    newest, carried an export from before it. The second waits, then reads
    Redis's clock and carries the first.
    """
    with (root / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _export_locked(redis_client, root: Path, keep: int, scan_count: int) -> ExportReport:
    """The export itself, with the lock held."""
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
        report = ExportReport(root / str(cutoff_ms), cutoff_ms)
        with (tmp / EXPORT_RATINGS).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(HEADER)
            newest = _carry(root, report, writer)
            _read_logs(redis_client, str(cutoff_ms - 1), scan_count, writer, report, newest)
        meta = {
            "format": EXPORT_FORMAT,
            "cutoff_ms": cutoff_ms,
            "rows": report.rows,
            "previous": report.previous.name if report.previous else None,
            "carried": report.carried,
            "new": report.new,
            "users": report.users,
            "watches_left_out": report.watches,
            "malformed": report.malformed,
        }
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, report.directory)
        except OSError as exc:
            # An export of the same millisecond is in place (the one before
            # this, fast): it read the same entries, and carried its previous.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(root, keep)
    return report


def _log_id(text: str) -> tuple[int, int]:
    """A stream entry id ``<ms>-<seq>`` as numbers (ids compare as these pairs)."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq)


def _carry(root: Path, report: ExportReport, writer) -> dict[str, tuple[int, int]]:
    """Copies the newest previous export's rows; returns each user's newest log id in it.

    A user's log only ever loses its oldest entries and gains ones with
    higher ids (a stream's ids only grow), so the log ratings this export
    must add are exactly those past that id: a per-user number, not a set
    of every exported rating (which grew ~300 bytes a rating). Nothing is
    carried from an export of ``OLD_FORMAT`` (``report.started_over``): its
    rows have no log ids.

    Raises:
        DataError: The previous export is malformed or incomplete (carrying
            nothing from it would drop the ratings it holds that left the logs).
    """
    newest: dict[str, tuple[int, int]] = {}
    older = [p for p in complete_exports(root) if int(p.name) < report.cutoff_ms]
    if not older:
        return newest
    previous = older[-1]
    if _read_meta(previous)[0] == OLD_FORMAT:
        report.started_over = previous
        return newest
    path = previous / EXPORT_RATINGS
    try:
        fh = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"{path}: no such file, though {previous / EXPORT_META} is there; restore it, or "
            f"move {previous} away to export from the logs alone (the ratings it held that "
            "left the logs are then lost)"
        ) from None
    report.previous = previous
    with fh:
        for line, row in _rows(path, fh):
            # A carried row comes from the export, not the log: once exported,
            # a rating trains as it was, and every export begins with the last.
            writer.writerow(row)
            report.carried += 1
            try:
                at = _log_id(row[-1])
            except ValueError:
                raise DataError(
                    f"{path}: line {line}: log id {row[-1]!r} is not <ms>-<seq>"
                ) from None
            if at > newest.get(row[0], (-1, -1)):
                newest[row[0]] = at
    return newest


def _read_logs(
    redis_client,
    last: str,
    scan_count: int,
    writer,
    report: ExportReport,
    newest: dict[str, tuple[int, int]],
) -> None:
    """Writes the logs' ratings up to ``last`` that are past each user's ``newest`` exported."""
    # SCAN returns a key twice when the keyspace shrinks meanwhile: a log
    # exported twice would train twice.
    seen: set[str] = set()
    keys: list[str] = []
    for raw in redis_client.scan_iter(match=_LOG_PATTERN, count=scan_count, _type="stream"):
        key = _text(raw)
        if key in seen:
            continue
        seen.add(key)
        keys.append(key)
        if len(keys) >= _LOGS_PER_READ:
            _export_logs(redis_client, keys, last, writer, report, newest)
            keys = []
    _export_logs(redis_client, keys, last, writer, report, newest)


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


def _export_logs(
    redis_client,
    keys: list[str],
    last: str,
    writer,
    report: ExportReport,
    newest: dict[str, tuple[int, int]],
) -> None:
    """Reads ``keys``' entries up to ``last`` in one pipeline and writes the new ratings.

    New: past the user's ``newest`` log id in the carried export.
    """
    users = [(key, user_of_log_key(key)) for key in keys]
    users = [(key, uid) for key, uid in users if uid is not None]
    if not users:
        return
    pipe = redis_client.pipeline(transaction=False)
    for key, uid in users:
        # Only what the carried export does not hold comes back.
        done = newest.get(uid)
        pipe.xrange(key, "-" if done is None else f"({done[0]}-{done[1]}", last)
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
            log_id = _text(entry_id)
            ts = f.get("ts", "0")
            if not ts.isdigit() or ts == "0":  # no event time given: when it was recorded
                ts = str(_log_id(log_id)[0] // 1000)
            writer.writerow([uid, item, rating, ts, log_id])
            report.new += 1


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
    new_users: int  # users only the logs know, appended with unknown side features
    unknown_items: int  # ratings of items not in the catalogue (left out)
    out_of_range: int  # ratings outside the dataset's scale (left out)
    sha256: str  # of the ratings appended (Dataset.logged_sha256), which the version keeps
    # Of the rows appended, those of a (user, item) pair the dataset's split
    # holds out: they do not train (Dataset.split). Set by trainer.train.train.
    held_out_pairs: int = 0
    # Ratings of users only the logs know whose id the services refuse
    # (max_id_bytes, lowered since they were recorded): left out, since one
    # such id would otherwise fail every training on every later export.
    refused_ids: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``dataset.interactions`` entry."""
        return dataclasses.asdict(self)


def merge_interactions(
    dataset: Dataset, directory: str | Path, *, max_id_bytes: int | None = None
) -> tuple[Dataset, Merged]:
    """Appends an export's ratings to ``dataset``; they always train (``Dataset.logged_rows``).

    ``directory`` is the one ``recsys export-interactions`` wrote to (its
    newest complete export is read) or one export in it. A user the dataset
    does not have (one who came after it was collected) is appended to it
    with unknown side features, as a loader leaves a user without them: the
    model learns them from their ratings, and the version's publish seeds
    them like every other user. Ratings of items the dataset does not have,
    or outside its rating scale, are left out and counted: an item has no
    features to learn from without its catalogue row. So are the ratings of
    a new user whose id is longer than ``max_id_bytes`` (or holds a NUL):
    the services would refuse every call with it, and ``recsys train``
    refuses a dataset with such an id.

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
        export_format, cutoff = _read_meta(d)
    except FileNotFoundError:
        raise DataError(
            f"{meta_path}: no such file; --interactions takes a directory "
            "`recsys export-interactions` wrote, or one export in it"
        ) from None
    if export_format != EXPORT_FORMAT:
        raise DataError(
            f"{meta_path}: an export of format {export_format}, which does not carry the "
            "ratings earlier exports held; run `recsys export-interactions` and train on "
            "the new export"
        )
    users = {u: i for i, u in enumerate(dataset.user_ids[: dataset.n_own_users])}
    added_users: list[str] = []  # in the order the export first names them
    items = {it: i for i, it in enumerate(dataset.item_ids)}
    new_user: list[int] = []
    new_item: list[int] = []
    new_rating: list[float] = []
    new_ts: list[int] = []
    unknown_items = out_of_range = refused_ids = 0
    refused: set[str] = set()
    try:
        with rows_path.open(newline="", encoding="utf-8") as fh:
            for line, row in _rows(rows_path, fh):
                try:
                    rating, ts = float(row[2]), int(row[3])
                except ValueError:
                    raise DataError(
                        f"{rows_path}: line {line}: rating {row[2]!r} or timestamp "
                        f"{row[3]!r} is not a number"
                    ) from None
                i = items.get(row[1])
                if i is None:
                    unknown_items += 1
                elif not dataset.rating_min <= rating <= dataset.rating_max:
                    out_of_range += 1
                else:
                    u = users.get(row[0])
                    if u is None:
                        if row[0] in refused or (
                            max_id_bytes is not None and not _servable(row[0], max_id_bytes)
                        ):
                            refused.add(row[0])
                            refused_ids += 1
                            continue
                        u = users[row[0]] = len(users)
                        added_users.append(row[0])
                    new_user.append(u)
                    new_item.append(i)
                    new_rating.append(rating)
                    new_ts.append(ts)
    except FileNotFoundError:
        raise DataError(f"{rows_path}: no such file (an export cut short?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{rows_path}: {exc}") from exc
    merged = dataset.with_logged(
        added_users,
        rating_user=new_user, rating_item=new_item, rating=new_rating, timestamp=new_ts,
    )  # fmt: skip
    info = Merged(
        str(d), cutoff, len(new_user), len(added_users), unknown_items, out_of_range,
        merged.logged_sha256(), refused_ids=refused_ids,
    )  # fmt: skip
    return merged, info


def _servable(user_id: str, max_bytes: int) -> bool:
    try:
        check_id(user_id, "user id", max_bytes)
    except FieldError:
        return False
    return True


def _read_meta(d: Path) -> tuple[int, int]:
    """Export ``d``'s format (``EXPORT_FORMAT`` or ``OLD_FORMAT``) and cutoff_ms.

    Raises:
        FileNotFoundError: ``d`` has no ``export.json``.
        DataError: It is no export of a known format with a cutoff.
    """
    path = d / EXPORT_META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: {exc}") from exc
    if not isinstance(meta, dict):
        meta = {}
    export_format, cutoff = meta.get("format"), meta.get("cutoff_ms")
    if (
        export_format not in (OLD_FORMAT, EXPORT_FORMAT)
        or not isinstance(cutoff, int)
        or cutoff <= 0
    ):
        raise DataError(f"{path}: not an export of format {EXPORT_FORMAT} with a cutoff_ms")
    return export_format, cutoff


def _rows(path: str | Path, fh: IO[str]) -> Iterator[tuple[int, list[str]]]:
    """An export's ratings read from ``fh`` (its file ``path``): (line, fields) after the header.

    Raises:
        DataError: The header is not ``HEADER``, or a row has another number of fields.
    """
    reader = csv.reader(fh)
    if next(reader, None) != HEADER:
        raise DataError(f"{path}: line 1: the header is not {','.join(HEADER)}")
    for line, row in enumerate(reader, start=2):
        if len(row) != len(HEADER):
            raise DataError(f"{path}: line {line}: {len(row)} fields, not {len(HEADER)}")
        yield line, row


def load_training_data(
    spec: str, interactions: str | Path | None = None, *, max_id_bytes: int | None = None
) -> tuple[Dataset, Merged | None]:
    """The dataset a ``--data`` spec names, with an export's ratings merged when given."""
    from trainer.loaders import load_dataset

    dataset = load_dataset(spec)
    if interactions is None:
        return dataset, None
    return merge_interactions(dataset, interactions, max_id_bytes=max_id_bytes)


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
    try:
        out = dataset.with_logged(mv.logged_user_ids(), **(mv.logged_ratings() or {}))
    except ArtifactError as exc:
        raise UserFacingError(str(exc)) from None
    except ValueError as exc:  # files that do not fit the dataset: changed or another one
        raise UserFacingError(
            f"version {mv.version}: the interaction-log ratings it keeps do not fit its "
            f"dataset ({exc})"
        ) from None
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
    print(
        f"exported {report.rows} ratings ({report.new} new; cutoff_ms {report.cutoff_ms}) "
        f"to {report.directory}"
    )
    return 0
