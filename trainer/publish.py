"""``recsys publish``: load a version's Redis part and make it the current version.

Order matters so serving never sees a half-loaded version:

0. the version is listed in ``recsys:versions:pending``, so a publish that
   dies leaves keys a later cleanup finds;
1. top lists go under version-scoped keys, beside the running version's,
   each written under a staging key and renamed over its own, so a
   republished version's readers see its old list or its new one, never an
   empty or half-written one; the renames and ``recsys:v:<ver>:build`` (the
   manifest digest of the build they are of) are one transaction;
2. user state is seeded, one script per user: aggregates replaced when this
   version is newer than the one that wrote them (so a republish, a rollback
   or a publish that lost a race keeps newer facts and what was recorded
   since), watched sets unioned, recent lists written only where a user has
   none, so online history survives;
3. ``recsys:current_version`` is switched by a compare-and-set script (only
   forward unless ``rollback``), and the version is added to
   ``recsys:versions``; a version that lost the race and was never served
   has its keys deleted. The switch is refused when a clean-up claimed the
   version since this publish marked it (``recsys:versions:removals:<ver>``
   moved on) or holds the claim now: it may have deleted what was written;
4. keys of versions older than the newest ``keep`` are deleted (``SCAN``,
   never ``KEYS``), and those of publishes that died long ago. Keeping the
   previous version gives services that have not reloaded yet a grace
   period. Versions the config pins (an A/B variant's ``model_version``, a
   service's ``pinned_version``) are kept whatever their age: retrieval
   still reads their top lists. A failure here, after the switch, is a
   warning: the next publish finishes it. A version another publish is
   writing (its pending mark is fresh: a rollback to the version about to
   age out) is kept too. Each removal first claims the version in one
   script, skipping it when it became current or a publish started writing
   it since the clean-up chose it; a publish of a version being removed is
   refused (``RemovedWhilePublishing``) until the removal ends.

Every step uses large pipelines rather than one round trip per key.
"""

from __future__ import annotations

import argparse
import math
import secrets
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from redis.exceptions import RedisError

from recsys import redis_keys
from recsys.artifacts import ArtifactError, ModelVersion, latest_version, list_versions
from recsys.errors import UserFacingError, describe_error
from recsys.features import UserAggregates, UserProfile
from recsys.user_store import seed_user_commands

ZADD_CHUNK = 10_000


@dataclass
class PublishReport:
    """What a publish did."""

    version: str
    top_list_keys: int = 0
    users: int = 0
    users_replaced: int = 0  # hashes replaced: the rest were written by this or a newer version
    recent_written: int = 0
    interactions_replayed: int = 0  # logged online interactions added back to replaced hashes
    full_logs: int = 0  # users whose log is at its cap: older unexported ratings may have left it
    removed_versions: list[str] = field(default_factory=list)
    removed_keys: int = 0
    seconds: float = 0.0
    switched: bool = True  # False: a newer version became current meanwhile
    cleanup_error: str = ""  # why the clean-up after the switch stopped short, if it did


class OlderThanServed(ValueError):
    """Publishing would move the current-version pointer back without ``rollback``."""


class RemovedWhilePublishing(RuntimeError):
    """Another publish's clean-up removed (or is removing) the version this one writes."""


def current_version(redis_client) -> str | None:
    """The version ``recsys:current_version`` names, or None (a synchronous client)."""
    raw = redis_client.get(redis_keys.CURRENT_VERSION)
    return raw.decode() if isinstance(raw, bytes) else raw


def _newer(current: str | None, version: str) -> bool:
    """True when ``current`` is a later numbered version than ``version``."""
    if current is None or not (current.isdigit() and version.isdigit()):
        return False
    return int(current) > int(version)


# Lua both scripts that end a publish share (_SWITCH_SCRIPT, _BESIDE_SCRIPT):
# whether a clean-up claimed version v since this publish marked it (its
# removals counter moved on from at_mark) or holds the claim now; if so, the
# pending mark goes back with this publish's start time unless a later one
# is there.
_REMOVED_SINCE_MARK = """
local function removed_since_mark(claim, counter, pending, v, started, at_mark)
  local removals = tonumber(redis.call('GET', counter) or '0')
  if redis.call('EXISTS', claim) == 0 and removals == tonumber(at_mark) then
    return false
  end
  local m = redis.call('ZSCORE', pending, v)
  if not m or tonumber(m) < tonumber(started) then
    redis.call('ZADD', pending, started, v)
  end
  return true
end
"""

# The pointer switch as one compare-and-set: moves forward (or anywhere with
# ARGV[2] = "1"), else leaves it and answers the newer version it found.
# Answers nil, moving nothing, when a clean-up claimed the version since this
# publish marked it (the removals counter, KEYS[5], moved on from ARGV[5]) or
# holds the claim now (KEYS[4]): it may have deleted keys this publish wrote,
# and switching would serve a version without top lists. The counter, not the
# pending mark, tells: the mark is one member per version, so another publish
# of the same version takes it when it finishes (which made the second of two
# at once fail for nothing) and a refused one puts it back (which let a third
# through after a removal). The mark is put back with the publish's start
# time, as a publish that died leaves it, so a later clean-up removes
# whatever was written after the removal, unless another publish of the
# version marked it later (its fresh mark must not look dead).
# KEYS: pointer, published-versions zset, pending zset, the version's removal
#       claim, the version's removals counter.
# ARGV: version, rollback, time, this publish's start time, the counter at its mark.
_SWITCH_SCRIPT = (
    _REMOVED_SINCE_MARK
    + """
local new = ARGV[1]
if removed_since_mark(KEYS[4], KEYS[5], KEYS[3], new, ARGV[4], ARGV[5]) then
  return false
end
local cur = redis.call('GET', KEYS[1])
if ARGV[2] ~= '1' and cur and tonumber(cur) and tonumber(new) and tonumber(cur) > tonumber(new) then
  return cur
end
redis.call('SET', KEYS[1], new)
redis.call('ZADD', KEYS[2], ARGV[3], new)
return 'OK'
"""
)


def _progress(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"publish: {msg}", file=sys.stderr, flush=True)


def _top_list_keys(mv: ModelVersion) -> dict[str, list]:
    lists = mv.top_lists
    keys = {redis_keys.top_popular(mv.version): lists.get("popular", [])}
    for g, entries in lists.get("genre", {}).items():
        keys[redis_keys.top_genre(mv.version, g)] = entries
    for c, entries in lists.get("country", {}).items():
        keys[redis_keys.top_country(mv.version, c)] = entries
    return keys


def _profile(users: dict[str, list], row: int) -> UserProfile:
    age = users["age"][row]
    return UserProfile(
        age=float(age) if age is not None and math.isfinite(age) else None,
        gender=users["gender"][row],
        occupation=users["occupation"][row],
        # "": a user only the interaction logs knew (trainer.dataset.with_logged).
        country=users["country"][row] or None,
    )


# A publish still pending after this long died (a 1M-user publish takes minutes).
PENDING_TIMEOUT_S = 6 * 3600.0


def cleanup_versions(
    redis_client,
    keep: int,
    *,
    protect: Iterable[str] = (),
    pending_timeout_s: float = PENDING_TIMEOUT_S,
) -> tuple[list, int]:
    """Deletes the keys of published versions older than the newest ``keep``, except ``protect``.

    Also deletes what a publish left that died before its switch: a version
    pending for longer than ``pending_timeout_s`` that was never published.
    A version pending for less is being written by a publish (a rollback to
    an old version, say) and is kept whatever its age. So is one chosen that
    became current, or started being written, before its removal began
    (:func:`remove_version`).

    Returns:
        (removed versions, number of keys deleted).
    """
    current, published = _published_versions(redis_client)
    cutoff = time.time() - pending_timeout_s
    pending = [
        (v.decode() if isinstance(v, bytes) else v, at)
        for v, at in redis_client.zrange(redis_keys.VERSIONS_PENDING, 0, -1, withscores=True)
    ]
    # Deleted while a publish writes them, its switch would serve a version
    # without top lists: kept as pins are.
    writing = {v for v, at in pending if at > cutoff}
    kept = {*protect, *writing, *([current] if current is not None else [])}
    # Protected versions (pins, a publish's own) do not count toward keep: a
    # pin listed among the newest would cost the previous version its grace.
    counted = [v for v in published if v not in kept or v == current]
    old = [v for v in counted[: max(len(counted) - keep, 0)] if v not in kept]
    old += [v for v, at in pending if at <= cutoff and v not in kept and v not in published]
    removed, removed_keys = [], 0
    for v in old:
        keys = remove_version(redis_client, v, pending_timeout_s=pending_timeout_s)
        if keys is not None:
            removed.append(v)
            removed_keys += keys
    return removed, removed_keys


# Reads the pointer and moves never-switched entries in one step: with the
# pointer read first and the move after, a publish switching in between had
# its just-served version taken for never-switched and moved to pending.
# KEYS: pointer, published-versions zset, pending zset.
_PUBLISHED_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local at = redis.call('ZSCORE', KEYS[2], cur)
  if at then
    local later = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. at, '+inf', 'WITHSCORES')
    for i = 1, #later, 2 do
      redis.call('ZADD', KEYS[3], later[i + 1], later[i])
      redis.call('ZREM', KEYS[2], later[i])
    end
  end
end
return {cur or '', redis.call('ZRANGE', KEYS[2], 0, -1)}
"""


def _published_versions(redis_client) -> tuple[str | None, list[str]]:
    """The current version and the published set (oldest first), never-switched entries moved out.

    An entry listed after the current version's switch yet not current was
    never switched in: publishes before the pending set existed listed a
    version there before writing it, and one that died left it. Counted as
    published, it took one of ``--keep``'s places from a version replicas
    were serving. Such entries move to ``recsys:versions:pending``.
    """
    cur, versions = redis_client.eval(
        _PUBLISHED_SCRIPT,
        3,
        redis_keys.CURRENT_VERSION,
        redis_keys.VERSIONS,
        redis_keys.VERSIONS_PENDING,
    )
    cur = cur.decode() if isinstance(cur, bytes) else cur
    return cur or None, [v.decode() if isinstance(v, bytes) else v for v in versions]


# How long a removal claim outlives a clean-up that died holding it: far
# longer than deleting one version's keys takes (a SCAN of the keyspace,
# seconds for millions of keys), short enough that a rollback to the
# version is not refused for long.
REMOVING_TTL_S = 600
# A version's removals counter lasts this long after its last claim or
# publish mark: far longer than a publish runs (one pending for
# PENDING_TIMEOUT_S is taken for dead), and it goes by itself for versions
# long gone.
REMOVALS_TTL_S = 7 * 24 * 3600

# Claims a version for removal, or answers 0 and claims nothing when it is
# current or a publish is writing it (a fresh pending mark) or another
# clean-up holds the claim. In one step with the check: a rollback switching
# to the version between a clean-up's choice and its deletion was served
# without top lists. A publish marks its version pending only while no claim
# exists (_MARK_SCRIPT), so one of the two always sees the other. A claim
# also counts in the version's removals counter, which a publish that marked
# before it finds moved on at its switch (also when the clean-up died half
# way and its claim expired). A (dead) publish's mark drops to score 0, which
# no publish's start time is: a refused switch puts its own back over it
# during the claim, and the release removes only a 0.
# KEYS: pointer, pending zset, the version's removal claim, its removals counter.
# ARGV: version, the pending cutoff (older marks are dead publishes'), claim
#       TTL, the counter's TTL, the clean-up's token (the claim's value).
_CLAIM_SCRIPT = """
local v = ARGV[1]
if redis.call('GET', KEYS[1]) == v then
  return 0
end
local at = redis.call('ZSCORE', KEYS[2], v)
if at and tonumber(at) > tonumber(ARGV[2]) then
  return 0
end
if not redis.call('SET', KEYS[3], ARGV[5], 'NX', 'EX', ARGV[3]) then
  return 0
end
redis.call('INCR', KEYS[4])
redis.call('EXPIRE', KEYS[4], ARGV[4])
if at then
  redis.call('ZADD', KEYS[2], 0, v)
end
return 1
"""

# Marks a version pending unless a clean-up is removing it: answers -1,
# marking nothing, when the removal claim exists; else the version's
# removals counter, which the switch checks. The counter's TTL starts again
# here, so it cannot lapse while this publish runs (a counter back at 0, or
# at 1 again after one new claim, would pass for unmoved).
# KEYS: pending zset, the version's removal claim, its removals counter.
# ARGV: version, start time, the counter's TTL.
_MARK_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return tonumber(redis.call('GET', KEYS[3]) or '0')
"""


# A clean-up deletes one batch of a version's keys only while it still holds
# its claim (its token is the claim's value), and renews the claim: one that
# stalled past the claim's TTL (a paused pod, a slow SCAN) had deleted the
# keys of a rollback that marked, wrote and switched after the claim lapsed.
# A claim found lost leaves the version half deleted: it is marked pending as
# a long-dead publish (score 0; a live publish's mark stays), so a later
# clean-up finishes it even where nothing else lists it (a version that lost
# the race to a newer one and was never served).
# KEYS: the claim, pending zset, then the batch. ARGV: token, claim TTL,
# version. Answers -1 when the claim is lost, else the keys deleted.
_HELD_UNLINK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  redis.call('ZADD', KEYS[2], 'NX', 0, ARGV[3])
  return -1
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return redis.call('UNLINK', unpack(KEYS, 3))
"""
# The clean-up's last step, under the same condition: the version leaves the
# versions sets and the claim goes, in one step (released first, a publish
# starting in between had its fresh pending mark removed). The pending mark
# goes only at score 0 (the claim's or a lost claim's): a publish that marked
# before the claim and was refused at its switch put its start time back,
# and what it wrote after the last batch must stay listed for a later
# clean-up. A lost claim marks the version as _HELD_UNLINK does.
# KEYS: the claim, published zset, pending zset. ARGV: token, version.
_HELD_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  redis.call('ZADD', KEYS[3], 'NX', 0, ARGV[2])
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[2])
local m = redis.call('ZSCORE', KEYS[3], ARGV[2])
if m and tonumber(m) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[2])
end
redis.call('DEL', KEYS[1])
return 1
"""


def remove_version(
    redis_client, version: str, *, pending_timeout_s: float = PENDING_TIMEOUT_S
) -> int | None:
    """Deletes one version's keys and its entries in the versions sets.

    Returns:
        The number of keys deleted, or None when the version was kept: it is
        current, a publish (pending for less than ``pending_timeout_s``) is
        writing it, or another clean-up is removing it.
    """
    token = secrets.token_hex(8)
    claimed = redis_client.eval(
        _CLAIM_SCRIPT,
        4,
        redis_keys.CURRENT_VERSION,
        redis_keys.VERSIONS_PENDING,
        redis_keys.removing(version),
        redis_keys.removals(version),
        version,
        repr(time.time() - pending_timeout_s),
        REMOVING_TTL_S,
        REMOVALS_TTL_S,
        token,
    )
    if not claimed:
        return None
    claim = redis_keys.removing(version)
    removed, batch = 0, []
    lost = f"lost the claim on version {version}'s keys (it expired)"

    def unlink(keys: list) -> int:
        n = redis_client.eval(
            _HELD_UNLINK, 2 + len(keys), claim, redis_keys.VERSIONS_PENDING, *keys,
            token, REMOVING_TTL_S, version,
        )  # fmt: skip
        if n < 0:
            # Past the claim's TTL a publish may have written the version anew.
            raise RedisError(lost)
        return n

    for key in redis_client.scan_iter(match=redis_keys.version_pattern(version), count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            removed += unlink(batch)
            batch = []
    if batch:
        removed += unlink(batch)
    released = redis_client.eval(
        _HELD_RELEASE, 3, claim, redis_keys.VERSIONS, redis_keys.VERSIONS_PENDING, token, version
    )
    if not released:
        raise RedisError(lost)
    return removed


def publish(
    version_dir: str | Path,
    redis_client,
    *,
    keep: int = 2,
    history_length: int = 50,
    chunk: int = 2000,
    quiet: bool = False,
    protect: Iterable[str] = (),
    rollback: bool = False,
    pending_timeout_s: float = PENDING_TIMEOUT_S,
    switch: bool = True,
    replace_users: bool = False,
    log_length: int | None = None,
) -> PublishReport:
    """Loads a version's Redis data and switches the current-version pointer to it.

    The pointer only moves forward unless ``rollback``: publishing a version
    older than the one Redis serves is refused before anything is written,
    and the switch itself is a compare-and-set, so a slow publish of an older
    version finishing after a newer one's does not move the services back.

    Args:
        version_dir: A complete version directory (verified with ``ModelVersion.open``).
        redis_client: A synchronous ``redis.Redis``.
        keep: Published versions whose keys are kept (the new one included).
        protect: Versions whose keys are kept whatever their age: those the
            services serve besides the current one (a variant's or a
            rollback's pinned version), whose top lists retrieval still reads.
        history_length: Cap of each user's recent list (``retrieval.history_length``).
        chunk: Users per pipeline execution.
        quiet: No progress output.
        rollback: Allow the pointer to move back to an older version.
        pending_timeout_s: Age past which another publish's unfinished
            version (it died before its switch) is cleaned up.
        switch: False writes the version's top lists only, for an A/B arm or
            a rollback pin that serves it beside the current version: no
            pointer switch, no user state; listed as published just before
            the current version, so ``protect`` must keep it.
        replace_users: Replace every user's aggregates whatever version wrote
            them (a model dir started over, whose new version 1 is older than
            the facts Redis holds).
        log_length: The services' ``retrieval.interaction_log_length``:
            each user's interaction log is cut to it (0: removed; None: logs
            left as they are). A replaced hash whose log is that long may
            lack older ratings the cap dropped before an export held them
            (counted in ``full_logs``; watches the cap drops are kept apart
            and replayed).

    Raises:
        ArtifactError: The version directory is incomplete or corrupt.
        ValueError: ``keep`` < 1.
        OlderThanServed: Redis serves a newer version and ``rollback`` is off.
        RemovedWhilePublishing: Another publish's clean-up removed the version
            while this one wrote it, or is removing it as this one starts; the
            pointer was not moved.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1 (the version being published)")
    t0 = time.perf_counter()
    mv = ModelVersion.open(version_dir)
    if Path(version_dir).name != mv.version:
        # The services find a version by the pointer's name under their model
        # dir: a copy renamed without its manifest would point them elsewhere.
        raise ArtifactError(
            f"{version_dir}: the directory is named {Path(version_dir).name!r} but its "
            f"manifest says version {mv.version!r}; a version's directory must carry its number"
        )
    current = current_version(redis_client)
    if not switch and current is None:
        raise OlderThanServed(
            "nothing is published yet: publish a version normally before adding one beside it"
        )
    if switch and not rollback and _newer(current, mv.version):
        raise OlderThanServed(
            f"Redis serves version {current}, newer than {mv.version}: nothing published "
            "(recsys publish --rollback moves the services back on purpose)"
        )
    report = PublishReport(mv.version)
    # Before this publish's switch moves the mark: see _published_versions.
    _published_versions(redis_client)
    # Listed as pending before its keys are written, so a publish that dies
    # before the switch leaves keys a later cleanup finds.
    started = time.time()
    removals = redis_client.eval(
        _MARK_SCRIPT,
        3,
        redis_keys.VERSIONS_PENDING,
        redis_keys.removing(mv.version),
        redis_keys.removals(mv.version),
        mv.version,
        repr(started),
        REMOVALS_TTL_S,
    )
    if removals < 0:
        # Written now, its keys would be deleted by that clean-up as they land.
        raise RemovedWhilePublishing(
            f"another publish's clean-up is removing version {mv.version}'s keys; nothing "
            f"was published: publish {mv.version} again (a clean-up that died holds the "
            f"version for {REMOVING_TTL_S // 60} minutes at most)"
        )

    # A list is replaced by one RENAME of a whole copy: deleting it and
    # adding its entries (in ZADD_CHUNK parts) let other clients read a
    # republished, served version's list empty or half-written in between.
    # The renames and the build they are of (the version number may have
    # been trained again: another build, other lists) land in one
    # transaction, so no reader sees one build's name over another's lists.
    token = secrets.token_hex(8)
    pipe = redis_client.pipeline(transaction=False)
    swap = redis_client.pipeline(transaction=True)
    for key, entries in _top_list_keys(mv).items():
        staging = redis_keys.staging(key, token)
        for start in range(0, len(entries), ZADD_CHUNK):
            part = entries[start : start + ZADD_CHUNK]
            pipe.zadd(staging, {str(item): float(score) for item, score in part})
        if entries:
            swap.rename(staging, key)
        else:
            swap.delete(key)
        report.top_list_keys += 1
    swap.set(redis_keys.version_build(mv.version), mv.digest)
    # Listed with the lists, in case the mark went meanwhile (another publish
    # of this version finished and took it, or a clean-up removed the
    # version) or dropped to 0 (a clean-up's claim, which its release then
    # removes): a publish that dies before its switch must leave what it
    # wrote listed for a later clean-up. GT: a later publish's mark stays.
    swap.zadd(redis_keys.VERSIONS_PENDING, {mv.version: started}, gt=True)
    pipe.execute()
    swap.execute()
    _progress(quiet, f"{report.top_list_keys} top lists under version {mv.version}")

    if not switch:
        return _beside_current(
            redis_client, mv.version, report, keep, protect, t0, quiet, started, removals
        )
    users = mv.users
    aggs = mv.user_aggregates
    ids = [str(u) for u in users["user_id"]]
    n_genres = len(mv.spec.genres)
    # Every rated item, held-out ones included; versions exported before the
    # column existed have the training history only.
    watched = users.get("watched", users["history"])
    for start in range(0, len(ids), chunk):
        pipe = redis_client.pipeline(transaction=False)
        for row in range(start, min(start + chunk, len(ids))):
            seed_user_commands(
                pipe,
                mv.spec,
                ids[row],
                _profile(users, row),
                UserAggregates.from_flat(aggs[row], n_genres),
                [str(i) for i in watched[row]],
                history_length=history_length,
                version=mv.version,
                created_at=mv.created_epoch_s,
                force=replace_users,
                log_cutoff_ms=mv.log_cutoff_ms,
                log_length=log_length,
            )
        for flags, replayed, left in pipe.execute():
            replaced = int(flags) & 1
            report.users_replaced += replaced
            report.recent_written += (int(flags) >> 1) & 1
            report.interactions_replayed += int(replayed)
            report.full_logs += replaced * int(0 < (log_length or 0) <= int(left))
        done = min(start + chunk, len(ids))
        if done == len(ids) or (done // chunk) % 10 == 0:
            _progress(quiet, f"users {done:,}/{len(ids):,}")
    report.users = len(ids)

    moved = redis_client.eval(
        _SWITCH_SCRIPT,
        5,
        redis_keys.CURRENT_VERSION,
        redis_keys.VERSIONS,
        redis_keys.VERSIONS_PENDING,
        redis_keys.removing(mv.version),
        redis_keys.removals(mv.version),
        mv.version,
        "1" if rollback else "0",
        repr(time.time()),
        repr(started),
        removals,
    )
    if moved is None:
        raise RemovedWhilePublishing(
            f"version {mv.version}'s keys were removed by another publish's clean-up while "
            "this publish wrote them; the current version was not changed: publish "
            f"{mv.version} again"
        )
    if isinstance(moved, bytes):
        moved = moved.decode()
    report.switched = moved == "OK"
    if report.switched:
        _progress(quiet, f"current version is now {mv.version}")
    else:
        _progress(quiet, f"version {mv.version} written, but {moved} is newer and stays current")
    try:
        _after_switch(redis_client, mv.version, report, keep, set(protect), pending_timeout_s)
    except RedisError as exc:
        # The publish itself is done (or decided): a clean-up cut short is
        # finished by the next publish, not worth failing this one for.
        report.cleanup_error = describe_error(exc)
        _progress(quiet, f"old versions not cleaned up: {report.cleanup_error}")
    if report.removed_versions:
        _progress(
            quiet,
            f"removed versions {', '.join(report.removed_versions)} ({report.removed_keys} keys)",
        )
    report.seconds = time.perf_counter() - t0
    return report


# Lists a version published beside the current one (no switch), under the
# same condition as _SWITCH_SCRIPT: no clean-up claimed it since the mark.
# KEYS: published zset, pending zset, the version's removal claim, its
# removals counter. ARGV: version, listing score, publish start, counter at the mark.
_BESIDE_SCRIPT = (
    _REMOVED_SINCE_MARK
    + """
local v = ARGV[1]
if removed_since_mark(KEYS[3], KEYS[4], KEYS[2], v, ARGV[3], ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], v)
redis.call('ZREM', KEYS[2], v)
return 1
"""
)


def _beside_current(
    redis_client,
    version: str,
    report: PublishReport,
    keep: int,
    protect: Iterable[str],
    t0: float,
    quiet: bool,
    started: float,
    removals: int,
) -> PublishReport:
    """Lists a version whose top lists were written as published, without switching to it."""
    current = current_version(redis_client)
    at = redis_client.zscore(redis_keys.VERSIONS, current) if current is not None else None
    # Just before the current version's switch: a later entry would be taken
    # for a publish that never switched (_published_versions).
    score = (at - 1e-3) if at is not None else time.time()
    listed = redis_client.eval(
        _BESIDE_SCRIPT, 4, redis_keys.VERSIONS, redis_keys.VERSIONS_PENDING,
        redis_keys.removing(version), redis_keys.removals(version),
        version, repr(score), repr(started), removals,
    )  # fmt: skip
    if not listed:
        raise RemovedWhilePublishing(
            f"version {version}'s keys were removed by another publish's clean-up while "
            f"this publish wrote them: publish {version} again"
        )
    report.switched = False
    _progress(quiet, f"version {version}'s top lists written beside current version {current}")
    try:
        removed, keys = cleanup_versions(redis_client, keep, protect={version, *protect})
        report.removed_versions += removed
        report.removed_keys += keys
    except RedisError as exc:
        report.cleanup_error = describe_error(exc)
    report.seconds = time.perf_counter() - t0
    return report


def _after_switch(
    redis_client,
    version: str,
    report: PublishReport,
    keep: int,
    protect: set[str],
    pending_timeout_s: float,
) -> None:
    """The clean-up once the switch is decided: this version's pending mark, then old keys."""
    # A newer version was published while this one was being written. Never
    # served (not in the published set), nothing will read these keys (a
    # rollback writes them again); a version served before keeps its grace
    # period like any other.
    lost = (
        not report.switched
        and version not in protect
        and redis_client.zscore(redis_keys.VERSIONS, version) is None
    )
    if lost:
        # Marked as a dead publish's rather than unmarked: the removal takes
        # the mark at its release, and a publish that dies before then (or a
        # removal refused) leaves the version listed for a later clean-up.
        redis_client.zadd(redis_keys.VERSIONS_PENDING, {version: 0})
        keys = remove_version(redis_client, version, pending_timeout_s=pending_timeout_s)
        if keys is not None:
            report.removed_keys += keys
            report.removed_versions.append(version)
    else:
        redis_client.zrem(redis_keys.VERSIONS_PENDING, version)
    removed, keys = cleanup_versions(
        redis_client, keep, protect={version, *protect}, pending_timeout_s=pending_timeout_s
    )
    report.removed_versions += removed
    report.removed_keys += keys


def pinned_versions(settings) -> set[str]:
    """Versions the config has the services serve besides the published one.

    The A/B variants' pinned ``model_version`` and the services' own
    ``pinned_version`` (a rollback): their Redis top lists must outlive ``keep``.
    """
    from recsys.experiments import Experiment

    pins = {v.pinned_version for v in Experiment(settings.experiments).variants}
    pins |= {settings.retrieval.pinned_version, settings.ranking.pinned_version}
    return {p for p in pins if p}


def _current_pointer(settings) -> str | None:
    """The version ``recsys:current_version`` names, or None."""
    import redis

    client = redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=10)
    try:
        return current_version(client)
    except redis.RedisError as exc:
        raise UserFacingError(f"Redis unreachable: {describe_error(exc)}") from exc
    finally:
        client.close()


def publish_with_settings(
    version_dir: str | Path,
    settings,
    *,
    keep: int = 2,
    quiet: bool = False,
    rollback: bool = False,
    switch: bool = True,
    replace_users: bool = False,
) -> PublishReport:
    """Publishes ``version_dir`` to the configured Redis; what both CLI paths run.

    ``recsys publish`` and ``recsys train --publish`` share it so both keep
    the versions the config pins (:func:`pinned_versions`) and use the same
    history length and error messages.

    Raises:
        UserFacingError: The version is incomplete, ``keep`` is invalid or
            Redis failed (the message never shows the URL, which may hold a
            password).
    """
    import redis

    pins = pinned_versions(settings)
    if not switch and Path(version_dir).name not in pins:
        # Unpinned, the next publish's clean-up would delete what this writes.
        raise UserFacingError(
            f"--no-switch: version {Path(version_dir).name} is not pinned by the config "
            "(an experiment variant's model_version or a pinned_version); pin it first, "
            "so publishes keep its top lists"
        )
    # Publishing moves much more data than a request: allow long reads.
    client = redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=60)
    try:
        return publish(
            version_dir,
            client,
            keep=keep,
            history_length=settings.retrieval.history_length,
            log_length=settings.retrieval.interaction_log_length,
            quiet=quiet,
            protect=pins,
            rollback=rollback,
            switch=switch,
            replace_users=replace_users,
        )
    except (ArtifactError, OlderThanServed, RemovedWhilePublishing) as exc:
        raise UserFacingError(str(exc)) from exc
    except ValueError as exc:
        raise UserFacingError(f"--keep: {exc}") from exc
    except redis.RedisError as exc:
        raise UserFacingError(f"Redis failed during publish: {describe_error(exc)}") from exc
    finally:
        client.close()


def cli_publish(args: argparse.Namespace, settings) -> int:
    """``recsys publish [version_dir] [--keep N] [--if-unpublished]``."""
    if getattr(args, "keep_dirs", 0) < 0:
        raise UserFacingError("--keep-dirs must be 0 (keep every directory) or more")
    if getattr(args, "no_switch", False):
        # It writes top lists only: these would be taken and silently ignored.
        clash = [
            flag
            for flag, on in (
                ("--rollback", getattr(args, "rollback", False)),
                ("--replace-user-state", getattr(args, "replace_user_state", False)),
                ("--keep-dirs", getattr(args, "keep_dirs", 0) > 0),
                ("--if-unpublished", getattr(args, "if_unpublished", False)),
            )
            if on
        ]
        if clash:
            raise UserFacingError(
                f"--no-switch writes a pinned version's top lists only: {', '.join(clash)} "
                "cannot apply to it"
            )
    rollback = getattr(args, "rollback", False)
    replace_users = getattr(args, "replace_user_state", False)
    if getattr(args, "if_unpublished", False):
        current = _current_pointer(settings)
        if current is not None and (Path(settings.model_dir) / current).is_dir():
            print(f"Redis already serves version {current}; nothing published")
            return 0
        if current is not None:
            # The model store was recreated while Redis kept its data: the
            # store's versions are the truth now, numbered below the pointer.
            print(
                f"Redis names version {current}, which {settings.model_dir} does not hold "
                "(a recreated model store): publishing the store's version over it"
            )
            rollback = replace_users = True
    version_dir = args.version_dir
    if version_dir is None:
        latest = latest_version(settings.model_dir)
        if latest is None:
            raise UserFacingError(f"no complete model version under {settings.model_dir}")
        version_dir = Path(settings.model_dir) / latest
    elif len(version_dir.parts) == 1 and not version_dir.exists():
        # A bare name (`publish 3`) is a version of the model dir, as `evaluate --version 3`.
        version_dir = Path(settings.model_dir) / version_dir
    no_switch = getattr(args, "no_switch", False)
    report = publish_with_settings(
        version_dir,
        settings,
        keep=args.keep,
        rollback=rollback,
        switch=not no_switch,
        replace_users=replace_users,
    )
    print(
        f"published version {report.version}: {report.top_list_keys} top lists, "
        f"{report.users} users ({report.users_replaced} states replaced, "
        f"{report.interactions_replayed} online interactions replayed onto them, "
        f"{report.recent_written} recent lists written), "
        f"{len(report.removed_versions)} old versions removed, {report.seconds:.1f}s"
    )
    if report.full_logs:
        print(
            f"publish: {report.full_logs} users' interaction logs are full "
            f"(retrieval.interaction_log_length); ratings recorded online before their "
            "oldest entry are in their replaced aggregates only if an export the version "
            "trained on held them",
            file=sys.stderr,
        )
    if report.cleanup_error:
        print(
            f"publish: old versions' keys not cleaned up ({report.cleanup_error}); "
            "the next publish does it",
            file=sys.stderr,
        )
    if no_switch:
        print(
            f"version {report.version}'s top lists are in Redis; the current version is unchanged"
        )
    elif not report.switched:
        print(f"version {report.version} is not current: a newer one was published meanwhile")
    elif getattr(args, "keep_dirs", 0):
        try:
            gone = prune_version_dirs(
                Path(version_dir).parent,
                report.version,
                args.keep_dirs,
                protect=pinned_versions(settings),
            )
        except OSError as exc:
            # The publish itself is done: a failed clean-up is worth a warning,
            # not a failure (the Job's retry would train and publish again).
            print(f"publish: could not delete old version directories: {exc}", file=sys.stderr)
        else:
            if gone:
                print(f"removed version directories {', '.join(gone)}")
    return 0


def prune_version_dirs(
    model_dir: Path, current: str, keep: int, *, protect: Iterable[str] = ()
) -> list[str]:
    """Deletes old version directories; returns the versions removed.

    Kept: the ``keep`` newest versions up to ``current`` (it included), the
    ``protect``ed ones (pins: a rollback's, an experiment arm's) and every
    version newer than ``current`` (trained, not published yet). A service
    still serving a removed version keeps working: its files stay open
    (memory-mapped) until it swaps.

    Raises:
        ValueError: ``keep`` < 1.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1 (the current version)")
    versions = [v for v in list_versions(model_dir) if v.isdigit()]
    older = [v for v in versions if int(v) <= int(current)]
    kept = set(older[-keep:]) | set(protect) | {v for v in versions if int(v) > int(current)}
    removed = [v for v in older if v not in kept]
    for v in removed:
        shutil.rmtree(model_dir / v)
    return removed
