"""Per-user state in Redis: one reader and one writer for both services.

``load_user`` fetches everything a request needs about a user (profile and
feature aggregates, recent history, watched set) in **one pipelined round
trip**, and ``load_users`` the same for a whole micro-batch of requests;
``record_interaction`` applies one interaction atomically (one Lua script:
all of it or none), so the next read sees it. The data lives only in
Redis, so it survives service restarts (and Redis restarts when Redis
persists, as the embedded one does).

``state_to_pb`` and ``state_from_pb`` carry the profile and aggregates that
retrieval read on to the ranking service (``RetrieveResponse.user_state``),
so one Recommend reads the user's state from Redis once, not once per stage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from redis.exceptions import ExecAbortError, OutOfMemoryError

from recsys import redis_keys
from recsys.features import (
    MAX_STATE_NUMBER,
    PROFILE_FIELDS,
    FeatureSpec,
    UserAggregates,
    UserProfile,
    decode_user_state,
    encode_user_state,
    interaction_increments,
    sane_state_numbers,
)
from recsys.v1 import retrieval_pb2


@dataclass
class StoredUser:
    """What Redis knows about one user (all empty for an unknown user)."""

    user_id: str
    known: bool
    profile: UserProfile = field(default_factory=UserProfile)
    aggregates: UserAggregates | None = None
    recent: list[str] = field(default_factory=list)  # newest first
    watched: set[str] = field(default_factory=set)
    # Why the state hash could not be decoded ("" when it could): the user is
    # then served as unknown, but the watched set and recent list, read fine,
    # still keep watched items out of the answer.
    corrupt: str = ""


def state_to_pb(spec: FeatureSpec, user: StoredUser, out: retrieval_pb2.StoredUserState) -> None:
    """Writes a user's stored profile and aggregates into ``out`` (recent and watched stay out).

    ``known`` is true only when the user has a state hash, which is what a
    read of the hash alone (the ranking service's) would find.
    """
    agg = user.aggregates
    if agg is None:
        out.known = False
        return
    out.known = True
    for f in PROFILE_FIELDS:
        v = getattr(user.profile, f)
        if v is not None:
            setattr(out, f, v)
    out.genres.extend(spec.genres)
    out.aggregates = agg.flat().astype("<f8", copy=False).tobytes()


def state_from_pb(
    spec: FeatureSpec, user_id: str, msg: retrieval_pb2.StoredUserState
) -> StoredUser | None:
    """Inverse of :func:`state_to_pb`; None when ``msg`` does not fit ``spec``.

    A state written under another genre list (retrieval serving a different
    model version), or a malformed one, is refused rather than misread: the
    caller then reads the user itself.
    """
    if not msg.known:
        return StoredUser(user_id, known=False)
    g = len(spec.genres)
    if len(msg.aggregates) != 8 * (3 + 3 * g) or tuple(msg.genres) != spec.genres:
        return None
    nums = np.frombuffer(msg.aggregates, "<f8")
    if not sane_state_numbers(nums):
        return None
    if msg.HasField("age") and not abs(msg.age) <= MAX_STATE_NUMBER:
        return None
    agg = UserAggregates.from_flat(nums, g)
    profile = UserProfile(
        **{f: getattr(msg, f) if msg.HasField(f) else None for f in PROFILE_FIELDS}
    )
    return StoredUser(user_id, True, profile, agg)


def _texts(values: Collection) -> Iterable[str]:
    """A reply's members as str; a plain client's bytes decode in C, not one call per id."""
    first = next(iter(values), None)
    return map(bytes.decode, values) if isinstance(first, bytes) else values


def _queue_reads(pipe, user_id: str, recent_n: int, with_watched: bool) -> int:
    """Adds one user's reads to a pipeline; returns how many commands it added."""
    pipe.hgetall(redis_keys.user_state(user_id))
    n = 1
    if recent_n > 0:
        pipe.lrange(redis_keys.user_recent(user_id), 0, recent_n - 1)
        n += 1
    if with_watched:
        pipe.smembers(redis_keys.user_watched(user_id))
        n += 1
    return n


async def _read_snapshot(
    redis, reads: Sequence[UserRead], raise_on_error: bool
) -> tuple[list[int], list]:
    """Runs ``reads``' commands as one snapshot: (commands per read, the replies in order).

    MULTI/EXEC: Redis runs another client's commands (a RecordInteraction
    script) between two socket reads of a large pipeline (~16 KB and up),
    so without it a user could be read with an interaction in the watched
    set but not yet in the aggregates. Per-command errors still come back
    per user, and the client parses the one EXEC reply no slower. A Redis
    at ``maxmemory`` with ``noeviction`` (how deploy/ runs it) refuses every
    command queued in MULTI, reads too, so then the reads go as a plain
    pipeline: served a little less consistent rather than not at all.
    """

    def queued(transaction: bool) -> tuple[list[int], Any]:
        pipe = redis.pipeline(transaction=transaction)
        return [_queue_reads(pipe, r.user_id, r.recent_n, r.with_watched) for r in reads], pipe

    sizes, pipe = queued(True)
    try:
        return sizes, await pipe.execute(raise_on_error=raise_on_error)
    except (OutOfMemoryError, ExecAbortError):
        _, pipe = queued(False)
        return sizes, await pipe.execute(raise_on_error=raise_on_error)


def _decode(
    spec: FeatureSpec, user_id: str, replies: Sequence, recent_n: int, with_watched: bool
) -> StoredUser:
    """One user's replies, in ``_queue_reads`` order → StoredUser."""
    corrupt = ""
    try:
        decoded = decode_user_state(spec, replies[0])
    except ValueError as exc:  # a corrupt hash: the other keys still count
        decoded, corrupt = None, str(exc)
    at = 1
    recent: list[str] = []
    if recent_n > 0:
        recent = list(_texts(replies[at]))
        at += 1
    watched = set(_texts(replies[at])) if with_watched else set()
    if decoded is None:
        known = bool(recent or watched)
        return StoredUser(user_id, known, recent=recent, watched=watched, corrupt=corrupt)
    profile, agg = decoded
    return StoredUser(user_id, True, profile, agg, recent, watched)


async def load_user(
    redis, spec: FeatureSpec, user_id: str, *, recent_n: int, with_watched: bool = True
) -> StoredUser:
    """Reads one user's state in a single pipelined round trip.

    Args:
        redis: ``redis.asyncio.Redis`` client.
        spec: Feature spec of the serving version (decodes aggregates).
        user_id: The user.
        recent_n: How many recent items to read (0: skip the list).
        with_watched: Also read the whole watched set.

    Raises:
        redis.RedisError: When Redis cannot be reached; callers degrade.
    """
    _, replies = await _read_snapshot(
        redis, [UserRead(spec, user_id, recent_n, with_watched)], True
    )
    return _decode(spec, user_id, replies, recent_n, with_watched)


@dataclass(frozen=True)
class UserRead:
    """One user's share of :func:`load_users`."""

    spec: FeatureSpec
    user_id: str
    recent_n: int = 1
    with_watched: bool = True


async def load_users(
    redis, reads: Sequence[UserRead], *, timeout_s: float | None = None
) -> list[StoredUser | Exception]:
    """Reads several users' state in one pipelined round trip.

    A micro-batch of requests pays redis-py's fixed cost per pipeline
    (packing, the transport round trip, reply dispatch) once: about 85 µs of
    CPU per user for six users against 210-250 µs each read alone.

    Args:
        redis: ``redis.asyncio.Redis`` client.
        reads: One entry per user.
        timeout_s: Bound on the whole round trip (None: the caller bounds
            it). The services' clients set no per-read socket timeout
            (:func:`recsys.serving.async_redis`).

    Returns:
        One entry per read, in order: the user, or the exception that read
        got (a wrong-typed key fails its own user, not the others).

    Raises:
        redis.RedisError: When Redis cannot be reached at all; callers degrade.
        TimeoutError: No answer within ``timeout_s``.
    """
    if not reads:
        return []
    async with asyncio.timeout(timeout_s):
        sizes, replies = await _read_snapshot(redis, reads, False)
    out: list[StoredUser | Exception] = []
    at = 0
    for r, size in zip(reads, sizes, strict=True):
        mine = replies[at : at + size]
        at += size
        failed = next((x for x in mine if isinstance(x, Exception)), None)
        if failed is not None:
            out.append(failed)
            continue
        try:
            out.append(_decode(r.spec, r.user_id, mine, r.recent_n, r.with_watched))
        except Exception as exc:  # a corrupt hash fails its own user only
            out.append(exc)
    return out


# Lua both user scripts share: the interaction log and its sums. Each log
# entry holds what RecordInteraction applied (item, event time ts, rating r
# ('' for a watch), i, then the aggregate increments, 'n' first); the two
# sums hashes hold the increments of the log's watches and of its ratings,
# summed, so that a publish adds a user's log back with one read per hash
# instead of one write per field of every entry (a full log was ~2,400
# writes, and Redis answers no one else meanwhile). Every change to the log
# goes through here and keeps the sums equal to it; sums that do not match
# the log (keys edited or deleted by hand) are rebuilt from it, and an entry
# no recording wrote is dropped then.
_LOG_LUA = (
    f"local MAX_STATE = {MAX_STATE_NUMBER!r}\n"
    + """
-- An aggregate field's kind by its name: HINCRBY counts, HINCRBYFLOAT sums.
local function counter(name)
  local p = string.sub(name, 1, 3)
  return name == 'n' or name == 'nr' or p == 'gw:' or p == 'gr:'
end
local function amount(name)
  return name == 'sum' or string.sub(name, 1, 3) == 'gs:'
end
-- A plain decimal within the readers' bound (MAX_STATE): Lua's tonumber also
-- takes hex and padding, which HINCRBY and the Python reader refuse, and the
-- reader refuses a number beyond the bound, so such a value would fail
-- mid-write or be written only to be refused on every read.
local function decimal(v, int)
  -- Redis's own integer syntax: no leading zero, no '-0' (HINCRBY refuses them).
  if int then
    if v == '0' then return true end
    if #v > 18 or string.match(v, '^%-?[1-9]%d*$') == nil then return false end
    return math.abs(tonumber(v)) <= MAX_STATE
  end
  local m, e = string.match(v, '^%-?(%d*%.?%d*)(.*)$')
  if not m or not string.find(m, '%d') then return false end
  if e ~= '' and string.match(e, '^[eE][%-+]?%d+$') == nil then return false end
  local x = tonumber(v)
  -- NaN fails the comparison too.
  return x ~= nil and math.abs(x) <= MAX_STATE
end
local function valid(name, v)
  if counter(name) then return decimal(v, true) end
  return amount(name) and decimal(v, false)
end
-- An entry's increments {name, value, ...} and whether it is a rating; nil
-- for an entry RecordInteraction did not write.
local function increments(f)
  local at, rated = nil, false
  for j = 1, #f - 1, 2 do
    if f[j] == 'r' then rated = f[j + 1] ~= '' end
    if f[j] == 'i' then at = j + 2 break end
  end
  if at == nil or f[at] ~= 'n' or f[at + 1] ~= '1' or (#f - at) % 2 == 0 then return nil end
  local out = {}
  for j = at, #f, 2 do
    if not valid(f[j], f[j + 1]) then return nil end
    out[#out + 1] = f[j]
    out[#out + 1] = f[j + 1]
  end
  return out, rated
end
-- Entries' increments added up in Lua, by kind ([false]: watches, [true]:
-- ratings; only_rated leaves watches out), and the ids of entries no
-- recording wrote. Written once a field afterwards, not once an entry.
local function total(entries, only_rated)
  local t, stray = {[false] = {}, [true] = {}}, {}
  for _, e in ipairs(entries) do
    local inc, rated = increments(e[2])
    if inc == nil then
      stray[#stray + 1] = e[1]
    elseif rated or not only_rated then
      local into = t[rated]
      for j = 1, #inc, 2 do into[inc[j]] = (into[inc[j]] or 0) + tonumber(inc[j + 1]) end
    end
  end
  return t, stray
end
-- A hash of numbers as a table.
local function numbers(key)
  local kv, t = redis.call('HGETALL', key), {}
  for j = 1, #kv, 2 do t[kv[j]] = tonumber(kv[j + 1]) end
  return t
end
-- Adds tbl (field -> amount) to hash key, one write a field; sign -1 takes
-- it away, and then a count back at 0 goes with its sum.
local function add(key, tbl, sign)
  local gone = {}
  for name, v in pairs(tbl) do
    if counter(name) then
      local now = redis.call('HINCRBY', key, name, string.format('%d', sign * v))
      if sign < 0 and now == 0 then
        gone[#gone + 1] = name
        if name == 'nr' then gone[#gone + 1] = 'sum' end
        if string.sub(name, 1, 3) == 'gr:' then gone[#gone + 1] = 'gs:' .. string.sub(name, 4) end
      end
    else
      redis.call('HINCRBYFLOAT', key, name, sign * v)
    end
  end
  -- After the loop: a sum taken off after its count went would come back.
  if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
end
-- Whether the sums describe the log (the log is a stream or missing): hashes
-- whose entry counts add up to its length, with valid numbers in every field
-- (names nil) or in the given fields of hash key (a record's cheaper check:
-- reading both hashes whole cost ~50 µs a record).
local function sums_ok(ilog, wsum, rsum, key, names)
  local seen = 0
  for _, k in ipairs({wsum, rsum}) do
    local t = redis.call('TYPE', k)['ok']
    if t ~= 'none' then
      if t ~= 'hash' then return false end
      local kv = names and {'n', redis.call('HGET', k, 'n')} or redis.call('HGETALL', k)
      for j = 1, #kv, 2 do
        if kv[j + 1] then
          if not valid(kv[j], kv[j + 1]) then return false end
          if kv[j] == 'n' then seen = seen + tonumber(kv[j + 1]) end
        end
      end
    end
  end
  if seen ~= redis.call('XLEN', ilog) then return false end
  if names and #names > 0 then
    local now = redis.call('HMGET', key, unpack(names))
    for i = 1, #names do
      if now[i] and not valid(names[i], now[i]) then return false end
    end
  end
  return true
end
local function rebuild(ilog, wsum, rsum)
  redis.call('DEL', wsum, rsum)
  local t, stray = total(redis.call('XRANGE', ilog, '-', '+'), false)
  for _, id in ipairs(stray) do redis.call('XDEL', ilog, id) end
  add(wsum, t[false], 1)
  add(rsum, t[true], 1)
end
-- Deletes the retired watches (xsum) unless they are a hash of counts
-- HINCRBY takes, in every field (names nil: a publish's check) or in the
-- given ones (a record's cheaper check). Edited by hand, they have nothing
-- to be rebuilt from, and must not fail a record or publish half-way.
local function check_retired(xsum, names)
  local t = redis.call('TYPE', xsum)['ok']
  if t == 'hash' and names then
    local now = redis.call('HMGET', xsum, unpack(names))
    for i = 1, #names do
      if now[i] and not decimal(now[i], true) then t = 'bad' break end
    end
  elseif t == 'hash' then
    local kv = redis.call('HGETALL', xsum)
    for j = 1, #kv, 2 do
      if not counter(kv[j]) or not decimal(kv[j + 1], true) then t = 'bad' break end
    end
  end
  if t ~= 'hash' and t ~= 'none' then redis.call('DEL', xsum) end
end
-- Adds the counts of watches that left the log to xsum: no training data
-- holds a watch, so a publish must add every watch back, not only the ones
-- still in the log (the oldest of an active user's were lost at each publish).
local function retire(xsum, tbl)
  local kept, names = {}, {}
  for name, v in pairs(tbl) do
    if counter(name) and v > 0 then
      kept[name] = v
      names[#names + 1] = name
    end
  end
  if #names == 0 then return end
  check_retired(xsum, names)
  add(xsum, kept, 1)
end
-- Keeps the newest cap entries, taking the ones that leave out of the sums
-- and their watches into xsum (cap 0: a record about to add the one entry a
-- log of length 1 keeps). XTRIM goes first: a script that has written goes
-- on past maxmemory, and XTRIM is not refused there (HINCRBY is). The log
-- turned off is not this: its callers delete xsum with the log.
local function cap_log(ilog, wsum, rsum, xsum, cap)
  if cap <= 0 then
    local watches = numbers(wsum)
    redis.call('DEL', ilog, wsum, rsum)
    retire(xsum, watches)
    return
  end
  local over = redis.call('XLEN', ilog) - cap
  if over <= 0 then return end
  if over > cap then  -- more leave than stay: add up the ones that stay
    local was = numbers(wsum)
    redis.call('XTRIM', ilog, 'MAXLEN', cap)
    rebuild(ilog, wsum, rsum)
    local now = numbers(wsum)
    for name, v in pairs(was) do was[name] = v - (now[name] or 0) end
    retire(xsum, was)
    return
  end
  local t = total(redis.call('XRANGE', ilog, '-', '+', 'COUNT', over), false)
  redis.call('XTRIM', ilog, 'MAXLEN', cap)
  retire(xsum, t[false])
  local keys = {[false] = wsum, [true] = rsum}
  for rated, key in pairs(keys) do
    local names = {}
    for name in pairs(t[rated]) do names[#names + 1] = name end
    if #names > 0 then
      local now = redis.call('HMGET', key, unpack(names))
      for i = 1, #names do
        if not now[i] or not valid(names[i], now[i]) then
          rebuild(ilog, wsum, rsum)  -- sums that lack what left: start over
          return
        end
      end
    end
  end
  for rated, key in pairs(keys) do
    add(key, t[rated], -1)
    -- None of its kind left: drop it whole (float sums seldom come back to 0).
    if not redis.call('HGET', key, 'n') then redis.call('DEL', key) end
  end
end
"""
)

# One interaction, applied all or nothing. A MULTI block cannot promise that:
# Redis runs the commands after a failing one (a key of the wrong type, a
# corrupt counter), so a refused write would still count the interaction and
# a retry would count it again. The script checks everything first, then
# writes. With an event key, a second call with the same key changes nothing
# (a retry after a lost reply). The interaction also goes to the user's log
# (a stream capped at the log length, oldest out first; 0: none) and its
# increments to the log's sums, for a publish that replaces the aggregates
# to add back (and a watch the cap pushes out of the log to the retired
# watches). Keys: state hash, recent list, watched set, log, watch sums,
# rating sums, retired watches, and the event marker only when there is one
# (every key must be in the user's Redis Cluster slot, so no placeholder
# key). ARGV: item, history length, event TTL, number of integer fields, log
# length, event time, rating ('' for a watch), then field/increment pairs
# (integers first, 'n' leading, then floats).
_RECORD_SCRIPT = (
    _LOG_LUA
    + """
local state, recent, watched, ilog = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local wsum, rsum, xsum, event = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local item, keep, ttl, n_int = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local log_len = tonumber(ARGV[5])
local kinds = {{state, 'hash'}, {recent, 'list'}, {watched, 'set'}, {ilog, 'stream'}}
for _, kv in ipairs(kinds) do
  local t = redis.call('TYPE', kv[1])['ok']
  if t ~= 'none' and t ~= kv[2] then
    return redis.error_reply('CORRUPT ' .. kv[1] .. ' is a ' .. t .. ', not a ' .. kv[2])
  end
end
local fields = {}
for i = 8, #ARGV, 2 do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then
  local now = redis.call('HMGET', state, unpack(fields))
  for i, v in ipairs(now) do
    if v and not decimal(v, i <= n_int) then
      local what = state .. ' field ' .. fields[i]
      return redis.error_reply('CORRUPT ' .. what .. ' is not a number')
    end
    -- At the bound, one more would write what every read then refuses.
    if v and math.abs(tonumber(v) + tonumber(ARGV[7 + 2 * i])) > MAX_STATE then
      local what = state .. ' field ' .. fields[i]
      return redis.error_reply('CORRUPT ' .. what .. ' would pass the bound readers keep to')
    end
  end
end
if event then
  if not redis.call('SET', event, '1', 'NX', 'EX', ttl) then
    return {redis.call('LLEN', recent), tonumber(redis.call('HGET', state, 'nr') or '0'), 1}
  end
end
-- The first write is one Redis refuses at maxmemory (noeviction): once a
-- script has written, Redis lets the rest of it past the limit, and LREM
-- is not refused.
redis.call('SADD', watched, item)
redis.call('LREM', recent, 0, item)
redis.call('LPUSH', recent, item)
redis.call('LTRIM', recent, 0, keep - 1)
for i = 8, #ARGV, 2 do
  if (i - 8) / 2 < n_int then
    redis.call('HINCRBY', state, ARGV[i], ARGV[i + 1])
  else
    redis.call('HINCRBYFLOAT', state, ARGV[i], ARGV[i + 1])
  end
end
if log_len > 0 then
  local into = ARGV[7] ~= '' and rsum or wsum
  if not sums_ok(ilog, wsum, rsum, into, fields) then rebuild(ilog, wsum, rsum) end
  cap_log(ilog, wsum, rsum, xsum, log_len - 1)
  redis.call('XADD', ilog, '*', 'item', item, 'ts', ARGV[6], 'r', ARGV[7], 'i', ARGV[4],
    unpack(ARGV, 8))
  local inc = {}
  for i = 8, #ARGV, 2 do inc[ARGV[i]] = tonumber(ARGV[i + 1]) end
  add(into, inc, 1)
else
  -- The log turned off: what it held goes with the user's next record.
  redis.call('DEL', ilog, wsum, rsum, xsum)
end
return {redis.call('LLEN', recent), tonumber(redis.call('HGET', state, 'nr') or '0'), 0}
"""
)

# One user's batch state, as one script: Redis runs every whole command it
# got, so a publisher cut off between a DEL and an HSET left the user with no
# state, and a recent list checked for in one pass and written in another took
# an online interaction recorded in between twice (and past the cap).
# KEYS: state hash, watched set, recent list, log, watch sums, rating sums,
#       retired watches.
# ARGV: version, history_length, number of hash fields n, force ("1": replace
#       whatever wrote the hash), the version's creation time (whole seconds
#       since the epoch), the log cutoff (ms since the epoch: the training
#       data holds the log's ratings before it; 0: none of them), the log
#       length to keep (-1: as it is), the n fields, then the history,
#       oldest first.
# The hash is replaced by a snapshot newer than the one that wrote it (hash
# fields pv and pt): one with a higher version number or a later creation
# time. Republishing a version (every `recsys up`), a rollback, or an older
# publish that lost a race is older by both, so it keeps the newer facts and
# the aggregates RecordInteraction added since. Either one alone is not
# enough: numbers are reused (a version directory deleted and trained again
# gets its number back, a model dir emptied starts from 1 again), and a
# trainer's clock may run behind the one before it. A hash stamped before pt
# existed, or a version without a creation time, is compared by number
# alone. The log is first cut to the configured length (a length lowered,
# or 0, frees its memory here). A replaced hash then gets back what the log
# holds and the batch values do not (in the same script, so one recorded
# meanwhile is counted once): every watch (the watch sums, and the retired
# watches: those the cap pushed out of the log), and the ratings
# from the cutoff on (the rating sums when there is no cutoff; else the
# entries from it, usually the few recorded since the export). The log is
# not trimmed at the cutoff: a later snapshot trained without the export
# needs all of it again. A key of the wrong type is corrupt and replaced, so
# one bad key cannot fail the whole publish. Returns {1 (hash replaced) + 2
# (recent written), interactions added back, entries left in the log}.
_SEED_USER_SCRIPT = (
    _LOG_LUA
    + """
local state, ilog, wsum, rsum, xsum = KEYS[1], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local version = tonumber(ARGV[1])
local keep = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local force = ARGV[4] == '1'
local made = tonumber(ARGV[5])
local cutoff = tonumber(ARGV[6]) or 0
local cap = tonumber(ARGV[7]) or -1
local kind = redis.call('TYPE', state)['ok']
local newer = false  -- the stored hash comes from this snapshot or a newer one
if kind == 'hash' and version then
  local stamp = redis.call('HMGET', state, 'pv', 'pt')
  local wrote, wrote_at = tonumber(stamp[1] or ''), tonumber(stamp[2] or '')
  -- A time of 0 is "not recorded" (and 0 is true in Lua): number alone then.
  if wrote and wrote_at and wrote_at > 0 and made and made > 0 then
    newer = wrote >= version and wrote_at >= made
  elseif wrote and (not stamp[2] or wrote_at == 0 or made == 0) then
    newer = wrote >= version
  end
end
-- A key of another type is corrupt: the batch state replaces it.
local replace = force or kind ~= 'hash' or not newer
local ltype = redis.call('TYPE', ilog)['ok']
if ltype ~= 'stream' and ltype ~= 'none' then redis.call('DEL', ilog, wsum, rsum) end
if not sums_ok(ilog, wsum, rsum) then rebuild(ilog, wsum, rsum) end
check_retired(xsum)
if cap == 0 then
  redis.call('DEL', ilog, wsum, rsum, xsum)  -- the log turned off: no replay either
elseif cap > 0 then
  cap_log(ilog, wsum, rsum, xsum, cap)
end
local replayed = 0
if replace then
  redis.call('DEL', state)
  if n > 0 then
    redis.call('HSET', state, 'pv', ARGV[1], 'pt', ARGV[5], unpack(ARGV, 8, 7 + n))
    local watches = numbers(wsum)
    for name, v in pairs(numbers(xsum)) do watches[name] = (watches[name] or 0) + v end
    add(state, watches, 1)
    local ratings = numbers(rsum)
    if cutoff > 0 then
      -- Ratings before the cutoff are in the batch values already. Whichever
      -- side of it is shorter is read: from the cutoff on (usually the few
      -- recorded since the export), or before it, taken off the sums.
      local half = math.floor(redis.call('XLEN', ilog) / 2) + 1
      local from = string.format('%d', cutoff)
      local after = redis.call('XRANGE', ilog, from, '+', 'COUNT', half)
      if #after < half then
        ratings = total(after, true)[true]
      else
        local before = redis.call('XRANGE', ilog, '-', string.format('%d', cutoff - 1))
        for name, v in pairs(total(before, true)[true]) do
          ratings[name] = (ratings[name] or 0) - v
        end
      end
    end
    add(state, ratings, 1)
    replayed = (watches['n'] or 0) + (ratings['n'] or 0)
  end
end
local first, last = 8 + n, #ARGV
local wtype = redis.call('TYPE', KEYS[2])['ok']
if wtype ~= 'set' and wtype ~= 'none' then redis.call('DEL', KEYS[2]) end
local recent = 0
if last >= first then
  for i = first, last, 5000 do
    redis.call('SADD', KEYS[2], unpack(ARGV, i, math.min(i + 4999, last)))
  end
  local rtype = redis.call('TYPE', KEYS[3])['ok']
  if rtype ~= 'list' and rtype ~= 'none' then redis.call('DEL', KEYS[3]) end
  if redis.call('EXISTS', KEYS[3]) == 0 then
    for i = last, math.max(first, last - keep + 1), -1 do
      redis.call('RPUSH', KEYS[3], ARGV[i])
    end
    recent = 2
  end
end
return {(replace and 1 or 0) + recent, replayed, redis.call('XLEN', ilog)}
"""
)

# Largest share of the time left on a request's deadline that its user read
# may wait for Redis: a hung Redis must not use up the whole deadline, or the
# rest of the request (sources, scoring) gets no turn and the caller no
# degraded answer, only DEADLINE_EXCEEDED.
READ_SHARE_OF_DEADLINE = 0.5

# How long an event key is remembered: retries come within seconds; a day
# also covers a client replaying a queue after an outage.
EVENT_TTL_S = 24 * 3600


class CorruptUserState(ValueError):
    """A user's stored keys cannot take the write (wrong type, a non-numeric counter)."""


@dataclass(frozen=True)
class Recorded:
    """What :func:`record_interaction` left in Redis."""

    history_length: int
    rating_count: int
    duplicate: bool  # the event key had been seen: nothing was written


async def record_interaction(
    redis,
    spec: FeatureSpec,
    user_id: str,
    item_id: str,
    item_genres: Sequence[str],
    rating: float | None,
    *,
    history_length: int,
    event_id: str = "",
    event_ttl_s: int = 0,
    log_length: int = 0,
    timestamp: int = 0,
) -> Recorded:
    """Applies one interaction atomically: all of it or, on an error, none of it.

    Appends to the recent list (capped at ``history_length``, an older
    occurrence of the item moved to the front), adds to the watched set and
    increments the feature aggregates exactly as
    :meth:`recsys.features.UserAggregates.add` would, and appends the
    interaction and those increments to the user's log (when
    ``log_length``). One Lua script, so the checks and the writes are one
    step for Redis.

    Args:
        redis: ``redis.asyncio.Redis`` client.
        spec: Feature spec of the serving version (which counters exist).
        user_id: The user.
        item_id: The item (already checked against the catalogue).
        item_genres: The item's genres.
        rating: Explicit rating, or None for an implicit watch.
        history_length: Recent-list cap.
        event_id: Idempotency key: a second call with the same key for the
            same user within :data:`EVENT_TTL_S` writes nothing and reports
            ``duplicate``. Empty: no de-duplication.
        event_ttl_s: How long ``event_id`` is remembered (0: :data:`EVENT_TTL_S`).
        log_length: Cap of the user's interaction log, which ``recsys publish``
            replays onto the batch aggregates it writes (0: not logged).
        timestamp: The event's time (seconds since the epoch, 0: unknown), kept in the log.

    Raises:
        CorruptUserState: A key of the wrong type or a corrupt counter;
            nothing was written.
        redis.RedisError: Redis unreachable or slow (the write may or may
            not have happened; retry with the same ``event_id``).
    """
    from redis.exceptions import ResponseError

    ints, floats = interaction_increments(spec, item_genres, rating)
    keys = [
        redis_keys.user_state(user_id),
        redis_keys.user_recent(user_id),
        redis_keys.user_watched(user_id),
        redis_keys.user_log(user_id),
        redis_keys.user_log_sums(user_id, "watches"),
        redis_keys.user_log_sums(user_id, "ratings"),
        redis_keys.user_retired_watches(user_id),
    ]
    if event_id:
        keys.append(redis_keys.user_event(user_id, event_id))
    args: list = [item_id, history_length, event_ttl_s or EVENT_TTL_S, len(ints), log_length]
    args += [timestamp, "" if rating is None else repr(float(rating))]
    for f, v in (*ints.items(), *floats.items()):
        args += [f, v]
    script = redis.register_script(_RECORD_SCRIPT)
    try:
        length, rated, dup = await script(keys=keys, args=args)
    except ResponseError as exc:
        if str(exc).startswith("CORRUPT"):
            raise CorruptUserState(str(exc).removeprefix("CORRUPT ")) from exc
        raise
    return Recorded(int(length), int(rated), bool(dup))


def seed_user_commands(
    pipe,
    spec: FeatureSpec,
    user_id: str,
    profile: UserProfile,
    agg: UserAggregates,
    history: Sequence[str],
    *,
    history_length: int,
    version: str,
    created_at: int,
    force: bool = False,
    log_cutoff_ms: int = 0,
    log_length: int | None = None,
) -> None:
    """Queues the script that writes one user's batch-computed state (its reply: see below).

    Used by ``recsys publish``. The aggregates hash is replaced when this
    snapshot is newer than the one that last wrote it: a higher ``version``
    or a later ``created_at`` (training data is the source of truth up to
    its snapshot; an older or the same snapshot would only undo what was
    recorded since; a reused or restarted version number with a later
    ``created_at`` is a new snapshot); the watched set is a union, so
    interactions recorded online are kept; the recent list is written only
    where the user has none, so online history is never overwritten.
    ``force`` replaces the hash whatever version wrote it (a model dir
    started over under lower numbers). A replaced hash gets the logged
    interactions the batch values leave out added back: every unrated one
    (those the log's cap pushed out too), and the ratings from
    ``log_cutoff_ms`` on (the training data holds the
    log's ratings before it, :mod:`trainer.interactions`; 0: none). With
    ``log_length``, the log is first cut to that many newest entries (0:
    removed, with the retired watches), so a lowered
    ``retrieval.interaction_log_length`` frees its memory. The script answers
    ``[flags, replayed, left]``: flags 1 when it replaced the hash plus 2
    when it wrote the list, the interactions it replayed (retired watches
    included), and the entries the log holds now.
    """
    keys = [
        redis_keys.user_state(user_id),
        redis_keys.user_watched(user_id),
        redis_keys.user_recent(user_id),
        redis_keys.user_log(user_id),
        redis_keys.user_log_sums(user_id, "watches"),
        redis_keys.user_log_sums(user_id, "ratings"),
        redis_keys.user_retired_watches(user_id),
    ]
    fields = [x for kv in encode_user_state(spec, profile, agg).items() for x in kv]
    args = [version, history_length, len(fields), "1" if force else "0", created_at]
    args += [log_cutoff_ms, -1 if log_length is None else log_length, *fields, *history]
    pipe.register_script(_SEED_USER_SCRIPT)(keys=keys, args=args, client=pipe)
