"""gRPC load generator: ``recsys loadtest`` and a library for tests and benchmarks.

Two ways to drive load:

* **Closed loop** (default): ``concurrency`` workers each keep one request in
  flight; throughput is whatever the server sustains. Latency is measured
  from the moment a request is sent.
* **Open loop** (``rate`` set): request ``i`` is *due* at ``start + i / rate`` on a
  fixed schedule. Up to ``concurrency`` requests are in flight; a request whose
  due time has passed while every slot was busy is sent late, and its latency
  is still counted **from its due time**. A slow server therefore shows up
  as growing latency, not as a politely reduced request rate (the
  "coordinated omission" that makes many load tools under-report tails).

The loop is bounded by ``duration_s`` and/or ``requests``; no new request is
started after either bound, and every call carries a deadline
(``timeout_s``), so a run always ends by itself. In open loop, calls that
were due before the end but never started because every slot was busy are
reported as ``not_sent`` rather than sent late after the end.

Client cost is kept low and out of the figures' way: requests are built and
serialised once per user (cached, up to 16,384 users; past that a ``Rank``
request is its user's few bytes joined to one of the cached candidate lists),
sent as raw bytes, and responses are not parsed. Calls are spread over
several channels (one TCP connection each, one channel per
``streams_per_channel`` workers). The process CPU time the
generator used is reported (``client_cpu_s``, ``client_cores``) because on a
small machine the generator competes with the servers for the same cores;
benchmarks run it in a process of its own, separate from the servers.

Latency percentiles are exact (all samples kept, in ``array('d')`` buffers,
and sorted; nearest-rank definition): 8 bytes per request, 16 in open loop,
which also keeps each call's send lag.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from recsys import redis_keys
from recsys.errors import UserFacingError

if TYPE_CHECKING:
    from recsys.config import TLSSettings

RPCS = ("Recommend", "Rank", "Retrieve", "SimilarItems")
# Which service owns each RPC (decides the default target).
_SERVICE_OF = {
    "Recommend": "RankingService",
    "Rank": "RankingService",
    "Retrieve": "RetrievalService",
    "SimilarItems": "RetrievalService",
}
SYNTHETIC_USERS = 1000
SYNTHETIC_ITEMS = 1000
# A run with neither bound given stops starting requests after this long.
DEFAULT_DURATION_S = 10.0
# Open loop's default bound on calls in flight. It must exceed rate x latency
# or the generator's own queue shows up as latency: 16 slots at 1,000 req/s
# against a 50 ms server read as a 770 ms p50.
OPEN_LOOP_CONCURRENCY = 512
# Open loop's highest rate: above this the schedule's float arithmetic
# (start + i / rate) stops advancing.
MAX_RATE = 1e6
# Requests built and serialised ahead of the run (per user/item index).
_PREBUILD = 2048
_CACHE_CAP = 16384


class LoadTestError(UserFacingError, ValueError):
    """A load test that cannot run as configured; the message names the field."""


def method_path(rpc: str) -> str:
    """Full gRPC method path, e.g. ``/recsys.v1.RankingService/Recommend``."""
    if rpc not in _SERVICE_OF:
        raise LoadTestError(f"rpc: {rpc!r} is not one of {', '.join(RPCS)}")
    return f"/recsys.v1.{_SERVICE_OF[rpc]}/{rpc}"


# --- configuration and report ------------------------------------------------------


@dataclass
class LoadConfig:
    """What to send, how hard and for how long.

    Attributes:
        rpc: ``Recommend``, ``Rank``, ``Retrieve`` or ``SimilarItems``.
        target: ``host:port`` of the server, or any gRPC target (``dns:///name:port``,
            ``ipv4:a:p,b:p``): calls are spread over every address it resolves to.
        concurrency: Closed loop: workers, each with one call in flight
            (default 16). Open loop: the most calls in flight at once (default
            :data:`OPEN_LOOP_CONCURRENCY`); a call due while all are busy
            waits, and the wait counts in its latency.
        rate: Open loop at this many requests per second; None for closed loop.
        duration_s: Stop starting requests after this many seconds (None: no limit).
        requests: Stop after this many requests (None: no limit).
        warmup_s: Unrecorded load before the measured run (same settings).
        users: ``uniform`` or ``zipf`` over ``user_ids`` (items for SimilarItems).
        zipf_exponent: Exponent ``s`` of the Zipf law, P(rank r) ∝ 1 / r^s.
        user_ids: Known users; synthetic ``"1".."N"`` when empty.
        item_ids: Catalogue for Rank candidates and SimilarItems; synthetic when empty.
        candidates: Candidate list size for Rank, cut to the catalogue's size
            (``LoadReport.candidates`` is what was sent).
        k: Items asked for (Recommend, Rank top_k, SimilarItems).
        budget: Retrieval budget for Recommend and Retrieve (0: server default).
        retrieve_packed: Retrieve asks for the packed answer without per-source
            scores, as the ranking service does; False asks for one
            ``Candidate`` message per item with score maps (an older client).
        streams_per_channel: Workers sharing one channel (TCP connection).
        timeout_s: Deadline of each call.
        seed: Seeds user sampling and candidate lists.
        metadata: Extra call metadata, e.g. ``(("authorization", "Bearer x"),)``.
        tls: Client TLS (a CA to trust; a certificate and key for mutual TLS);
            None for plaintext.
        variant: Force this A/B variant on every request (``UserContext.variant``,
            ``SimilarItemsRequest.variant``) to load one arm of an experiment;
            empty: users fall into their buckets (SimilarItems: the default arm).
        progress: Print a live one-line status to stderr.
        max_message_bytes: Largest message accepted either way.
        inspect: Optional check of each OK response's bytes; a returned label
            (e.g. ``"retrieval_fallback"``) is counted in ``LoadReport.flagged``.
            It parses responses, so it costs client CPU; None skips it.
    """

    rpc: str = "Recommend"
    target: str = "127.0.0.1:50052"
    concurrency: int | None = None
    rate: float | None = None
    duration_s: float | None = DEFAULT_DURATION_S
    requests: int | None = None
    warmup_s: float = 0.0
    users: str = "uniform"
    zipf_exponent: float = 1.1
    user_ids: Sequence[str] = ()
    item_ids: Sequence[str] = ()
    candidates: int = 1000
    k: int = 20
    budget: int = 0
    retrieve_packed: bool = True
    streams_per_channel: int = 16
    timeout_s: float = 5.0
    seed: int = 0
    metadata: tuple[tuple[str, str], ...] = ()
    tls: TLSSettings | None = None
    variant: str = ""
    progress: bool = False
    max_message_bytes: int = 16 * 1024 * 1024
    inspect: Callable[[bytes], str | None] | None = None

    def __post_init__(self) -> None:
        method_path(self.rpc)
        if self.concurrency is None:
            self.concurrency = 16 if self.rate is None else OPEN_LOOP_CONCURRENCY

        def finite_positive(x: float | None) -> bool:
            return x is None or (math.isfinite(x) and x > 0)

        checks = [
            ("concurrency", self.concurrency >= 1, "must be at least 1"),
            ("rate", finite_positive(self.rate), "must be a finite positive number"),
            ("rate", self.rate is None or self.rate <= MAX_RATE, f"must be at most {MAX_RATE:g}"),
            ("duration_s", finite_positive(self.duration_s), "must be a finite positive number"),
            ("requests", self.requests is None or self.requests >= 1, "must be at least 1"),
            (
                "duration_s/requests",
                self.duration_s is not None or self.requests is not None,
                "set at least one bound so the run ends",
            ),
            (
                "warmup_s",
                math.isfinite(self.warmup_s) and self.warmup_s >= 0,
                "must be a finite number, not negative",
            ),
            ("users", self.users in ("uniform", "zipf"), "must be 'uniform' or 'zipf'"),
            (
                "zipf_exponent",
                finite_positive(self.zipf_exponent),
                "must be a finite positive number",
            ),
            ("candidates", self.candidates >= 1, "must be at least 1"),
            ("k", self.k >= 1, "must be at least 1"),
            ("budget", self.budget >= 0, "must not be negative"),
            ("streams_per_channel", self.streams_per_channel >= 1, "must be at least 1"),
            ("timeout_s", finite_positive(self.timeout_s), "must be a finite positive number"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise LoadTestError(f"{name}: {why} (got {getattr(self, name, None)!r})")

    @property
    def mode(self) -> str:
        """``open`` (fixed rate) or ``closed`` (fixed concurrency)."""
        return "open" if self.rate is not None else "closed"

    @property
    def channels(self) -> int:
        """Number of client channels: one per ``streams_per_channel`` workers."""
        return max(1, math.ceil(self.concurrency / self.streams_per_channel))


def percentile(sorted_samples: np.ndarray | Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted samples (NaN when empty).

    The smallest sample such that at least ``p`` percent of samples are less
    than or equal to it: no interpolation, so the answer is always a latency
    that was actually observed, and ``p = 100`` is the maximum.
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is outside [0, 100]")
    n = len(sorted_samples)
    if n == 0:
        return float("nan")
    # Rounding first keeps 99.9% of 1000 at rank 999, not 1000 (0.999 is inexact in binary).
    rank = max(1, math.ceil(round(p / 100.0 * n, 9)))
    return float(sorted_samples[min(rank, n) - 1])


@dataclass
class LatencySummary:
    """Latency distribution in milliseconds."""

    count: int
    mean_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    @classmethod
    def from_seconds(cls, samples: Sequence[float] | np.ndarray) -> LatencySummary:
        """Summarises raw samples given in seconds."""
        s = np.sort(np.asarray(samples, dtype=np.float64)) * 1000.0
        if s.size == 0:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan, nan, nan)
        return cls(
            count=int(s.size),
            mean_ms=float(s.mean()),
            min_ms=float(s[0]),
            p50_ms=percentile(s, 50),
            p90_ms=percentile(s, 90),
            p99_ms=percentile(s, 99),
            p999_ms=percentile(s, 99.9),
            max_ms=float(s[-1]),
        )


@dataclass
class LoadReport:
    """Outcome of one run (the warm-up excluded).

    ``sent`` counts every completed call; ``ok + sum(errors.values()) == sent``.
    ``latency`` covers successful calls and calls that ran out of their
    deadline (``DEADLINE_EXCEEDED``, at the time they took): other failures
    are left out so fast ones cannot flatter the percentiles, and slow ones
    are kept so a server slower than the deadline cannot either. In open loop
    it is measured from each call's due time. ``send_lag`` (open loop) is how
    late calls left compared with the schedule; ``slot_waits`` how many of
    them were late because every one of the ``concurrency`` slots was busy.
    ``flagged`` counts OK responses that ``LoadConfig.inspect`` labelled.
    """

    rpc: str
    target: str
    mode: str
    concurrency: int
    rate: float | None
    channels: int
    users: str
    n_users: int
    elapsed_s: float
    sent: int
    ok: int
    errors: dict[str, int]
    qps: float
    ok_qps: float
    latency: LatencySummary
    send_lag: LatencySummary | None
    client_cpu_s: float
    client_cores: float
    warmup_s: float = 0.0
    tls: bool = False
    error_examples: dict[str, str] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)
    # Open loop: calls due before the end that were never started because
    # every slot was still busy when the run's time was up.
    not_sent: int = 0
    # Open loop: calls that found every in-flight slot busy at their due time.
    slot_waits: int = 0
    # Rank: candidates per request (run_load: cut to the catalogue's size).
    candidates: int | None = None
    # False when no channel reached the target within timeout_s at the start.
    connected: bool = True

    @property
    def error_count(self) -> int:
        """Calls that did not return OK."""
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN becomes None)."""
        return _clean(asdict(self))

    def table(self) -> str:
        """A human-readable summary."""
        lat = self.latency
        mode = f"open loop at {self.rate:g}/s" if self.rate else "closed loop"
        cands = f", {self.candidates} candidates" if self.candidates is not None else ""
        lines = (
            []
            if self.connected
            else [
                f"!! {self.target} accepted no connection at the start: the errors below are "
                "the generator failing to connect, not the server answering"
            ]
        )
        lines += [
            f"{self.rpc} -> {self.target}: {mode}, concurrency {self.concurrency}, "
            f"{self.channels} {'TLS' if self.tls else 'plaintext'} channel(s), "
            f"users {self.users} over {self.n_users}{cands}",
            f"  duration     {self.elapsed_s:10.2f} s  (warm-up {self.warmup_s:g} s excluded)",
            f"  requests     {self.sent:10d}  ok {self.ok}  errors {self.error_count}",
            f"  throughput   {self.qps:10.1f} req/s  ({self.ok_qps:.1f} ok/s)",
            "  latency (ms)      p50      p90      p99    p99.9      max     mean",
            f"  {'':12s}{lat.p50_ms:9.2f}{lat.p90_ms:9.2f}{lat.p99_ms:9.2f}"
            f"{lat.p999_ms:9.2f}{lat.max_ms:9.2f}{lat.mean_ms:9.2f}",
        ]
        if self.send_lag is not None:
            lag = self.send_lag
            lines.append(
                f"  send lag     p50 {lag.p50_ms:.2f} ms  p99 {lag.p99_ms:.2f} ms  "
                f"max {lag.max_ms:.2f} ms (behind schedule; counted in latency)"
            )
        if self.slot_waits:
            lines.append(
                f"  slot waits   {self.slot_waits:10d}  due while all {self.concurrency} "
                "in-flight slots were busy (rate x latency > --concurrency; counted in latency)"
            )
        if self.not_sent:
            lines.append(
                f"  not sent     {self.not_sent:10d}  due before the end, never started: all "
                f"{self.concurrency} in-flight slots were still busy"
            )
        lines.append(
            f"  client CPU   {self.client_cpu_s:10.2f} s  ({self.client_cores:.2f} cores busy "
            f"of {os.cpu_count()})"
        )
        for label, n in sorted(self.flagged.items()):
            lines.append(f"  flagged {label:18s} {n:8d}  (OK responses)")
        for code, n in sorted(self.errors.items(), key=lambda kv: -kv[1]):
            example = self.error_examples.get(code, "")
            lines.append(f"  error {code:20s} {n:8d}  {example[:80]}")
        return "\n".join(lines)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --- sampling ------------------------------------------------------------------------


class IndexSampler:
    """Draws indices in ``[0, n)``: uniform, or Zipf with index 0 the most popular.

    Zipf here is the finite law P(i) = (i + 1)^-s / H(n, s), which is what
    "a few users send most requests" looks like, and unlike
    ``numpy.random.zipf`` it never draws outside the known population.
    """

    def __init__(self, n: int, dist: str = "uniform", exponent: float = 1.1, seed: int = 0):
        if n < 1:
            raise LoadTestError(f"users: need at least one id to sample from (got {n})")
        if dist not in ("uniform", "zipf"):
            raise LoadTestError(f"users: {dist!r} is not 'uniform' or 'zipf'")
        self.n = n
        self.dist = dist
        self.rng = np.random.default_rng(seed)
        self._cdf: np.ndarray | None = None
        if dist == "zipf":
            self._cdf = np.cumsum(self.probabilities(n, exponent))
            self._cdf[-1] = 1.0  # guard the last bucket against rounding
        self._block = np.empty(0, np.int64)
        self._pos = 0

    @staticmethod
    def probabilities(n: int, exponent: float) -> np.ndarray:
        """The Zipf probabilities of indices ``0..n-1``."""
        w = np.arange(1, n + 1, dtype=np.float64) ** -float(exponent)
        return w / w.sum()

    def sample(self, size: int) -> np.ndarray:
        """``size`` indices at once."""
        if self._cdf is None:
            return self.rng.integers(0, self.n, size=size)
        return np.searchsorted(self._cdf, self.rng.random(size), side="right").clip(0, self.n - 1)

    def __call__(self) -> int:
        """One index (drawn from a pre-sampled block, which is much cheaper)."""
        if self._pos >= self._block.size:
            self._block = self.sample(4096)
            self._pos = 0
        v = int(self._block[self._pos])
        self._pos += 1
        return v


# --- requests ------------------------------------------------------------------------


class RequestFactory:
    """Serialised requests for one RPC, built once per user (or item) index."""

    def __init__(self, config: LoadConfig):
        self.config = config
        self.user_ids = list(config.user_ids) or [str(i) for i in range(1, SYNTHETIC_USERS + 1)]
        self.item_ids = list(config.item_ids) or [str(i) for i in range(1, SYNTHETIC_ITEMS + 1)]
        # Rank: never more candidates than the catalogue holds (the report
        # and the CLI say so when that cut the asked-for size).
        self.candidates = min(config.candidates, len(self.item_ids))
        # SimilarItems is keyed by item, every other RPC by user.
        self.population = self.item_ids if config.rpc == "SimilarItems" else self.user_ids
        self._cache: dict[int, bytes] = {}
        # Rank's candidate lists, serialised, by index modulo the cache size:
        # past the cache a request is its user's few bytes plus one of these,
        # so building it inside the timed call costs microseconds, not the
        # ~0.3 ms of serialising 1,000 candidate ids.
        self._candidates: dict[int, bytes] = {}

    def prebuild(self, order: Sequence[int] | None = None) -> None:
        """Builds the first requests ahead of time so the run measures the server."""
        for i in order if order is not None else range(min(_PREBUILD, len(self.population))):
            self.payload(i)

    def payload(self, index: int) -> bytes:
        """The serialised request for population member ``index``."""
        if self.config.rpc == "Rank":
            # Fields concatenated on the wire read as one message. Only the
            # user's few bytes are cached per index: whole payloads would hold
            # every candidate list twice.
            head = self._cache.get(index)
            if head is None:
                head = self._rank_head(index).SerializeToString()
                if len(self._cache) < _CACHE_CAP:
                    self._cache[index] = head
            return head + self._rank_candidates(index % _CACHE_CAP)
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        data = self.build(index).SerializeToString()
        if len(self._cache) < _CACHE_CAP:
            self._cache[index] = data
        return data

    def build(self, index: int):  # -> a generated request message
        """The request message for population member ``index``."""
        from recsys.v1 import common_pb2, ranking_pb2, retrieval_pb2

        c = self.config
        if c.rpc == "SimilarItems":
            return retrieval_pb2.SimilarItemsRequest(
                item_id=self.item_ids[index], k=c.k, variant=c.variant
            )
        user = common_pb2.UserContext(user_id=self.user_ids[index], variant=c.variant)
        if c.rpc == "Recommend":
            return ranking_pb2.RecommendRequest(user=user, k=c.k, retrieval_budget=c.budget)
        if c.rpc == "Retrieve":
            return retrieval_pb2.RetrieveRequest(
                user=user,
                budget=c.budget,
                packed=c.retrieve_packed,
                omit_source_scores=c.retrieve_packed,
            )
        request = self._rank_head(index)
        request.MergeFromString(self._rank_candidates(index % _CACHE_CAP))
        return request

    def _rank_head(self, index: int):  # -> ranking_pb2.RankRequest
        """A Rank request with only its user: the part that differs for every index."""
        from recsys.v1 import common_pb2, ranking_pb2

        user = common_pb2.UserContext(user_id=self.user_ids[index], variant=self.config.variant)
        return ranking_pb2.RankRequest(user=user)

    def _rank_candidates(self, slot: int) -> bytes:
        """The serialised candidate list (and ``top_k``) of ``slot``, made once."""
        from recsys.v1 import ranking_pb2

        data = self._candidates.get(slot)
        if data is None:
            c = self.config
            n = len(self.item_ids)
            rng = np.random.default_rng((c.seed, slot))
            rows = rng.choice(n, size=self.candidates, replace=False)
            data = ranking_pb2.RankRequest(
                candidate_item_ids=[self.item_ids[r] for r in rows], top_k=c.k
            ).SerializeToString()
            self._candidates[slot] = data
        return data


# --- the engine ------------------------------------------------------------------------

# A call takes the request's sequence number and returns its status code name
# ("OK", "UNAVAILABLE", ...). Keeping gRPC out of the engine lets tests drive
# the scheduling logic directly.
CallFn = Callable[[int], Awaitable[str]]


@dataclass
class _Recorder:
    latencies: array.array = field(default_factory=lambda: array.array("d"))
    lags: array.array = field(default_factory=lambda: array.array("d"))
    codes: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    sent: int = 0
    issued: int = 0
    last_done: float = 0.0
    not_sent: int = 0
    slot_waits: int = 0


async def _phase(
    config: LoadConfig,
    call: CallFn,
    duration_s: float | None,
    requests: int | None,
    rec: _Recorder,
    start: float,
) -> None:
    """Runs workers until the bounds are reached and every call has returned."""
    deadline = start + duration_s if duration_s is not None else math.inf
    interval = 1.0 / config.rate if config.rate else 0.0
    clock = time.perf_counter

    def ticket() -> tuple[int, float] | None:
        seq = rec.issued
        if requests is not None and seq >= requests:
            return None
        if config.rate:
            due = start + seq * interval
            if due >= deadline:
                return None
            if clock() >= deadline:
                # Behind schedule at the end: the calls still due are not
                # started (the run must end on time) but counted as not sent,
                # so a server that could not keep up is not flattered.
                due_total = math.ceil((deadline - start) / interval)
                # Settled with the test the schedule itself uses (a call is due
                # while start + seq * interval < deadline): float rounding in
                # the division can be one off either way.
                while due_total > 0 and start + (due_total - 1) * interval >= deadline:
                    due_total -= 1
                while start + due_total * interval < deadline:
                    due_total += 1
                if requests is not None:
                    due_total = min(due_total, requests)
                rec.not_sent = max(due_total - seq, 0)
                return None
        else:
            due = clock()
            if due >= deadline:
                return None
        rec.issued += 1
        return seq, due

    async def worker() -> None:
        after_a_call = False
        while (t := ticket()) is not None:
            seq, due = t
            if config.rate:
                delay = due - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -_SLOT_WAIT_S and after_a_call:
                    # Idle workers hold the next tickets ahead of time, so one
                    # fresh from a call finding its new ticket overdue means
                    # every slot was busy at the due time. (A first ticket late
                    # is the start-up of the workers, not a slot wait.)
                    rec.slot_waits += 1
                after_a_call = True
            sent = clock()
            try:
                code = await call(seq)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken call is a result, not a crash
                code = _code_of(exc)
                rec.examples.setdefault(code, _details(exc))
            done = clock()
            rec.sent += 1
            rec.codes[code] += 1
            rec.last_done = max(rec.last_done, done)
            if code in _TIMED:
                # Open loop: from the due time, so waiting for a free slot counts.
                rec.latencies.append(done - due)
            if config.rate:
                rec.lags.append(max(0.0, sent - due))

    await asyncio.gather(*(worker() for _ in range(config.concurrency)))


# Outcomes whose time goes into the latency figures (see LoadReport).
_TIMED = frozenset({"OK", "DEADLINE_EXCEEDED"})
# Later than this past its due time at the ticket, a call waited for a slot
# (not merely for the event loop).
_SLOT_WAIT_S = 0.001


def _code_of(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        with contextlib.suppress(Exception):
            c = code()
            return getattr(c, "name", str(c))
    return f"CLIENT_{type(exc).__name__}"


def _details(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        with contextlib.suppress(Exception):
            return str(details())
    return str(exc)


async def _progress(rec: _Recorder, start: float, stream: TextIO, config: LoadConfig) -> None:
    last_sent, last_t, seen = 0, start, 0
    while True:
        await asyncio.sleep(0.5)
        now = time.perf_counter()
        window = np.sort(np.asarray(rec.latencies[seen:])) * 1000.0
        seen = len(rec.latencies)
        rate = (rec.sent - last_sent) / max(now - last_t, 1e-9)
        last_sent, last_t = rec.sent, now
        errors = rec.sent - rec.codes.get("OK", 0)
        total = f"/{config.requests}" if config.requests else ""
        stream.write(
            f"\r{config.rpc} {now - start:6.1f}s  sent {rec.sent}{total}  errors {errors}  "
            f"{rate:8.1f} req/s  p50 {percentile(window, 50):7.2f} ms  "
            f"p99 {percentile(window, 99):7.2f} ms   "
        )
        stream.flush()


async def drive(
    config: LoadConfig,
    call: CallFn,
    *,
    n_users: int = 0,
    progress_stream: TextIO | None = None,
    on_start: Callable[[], None] | None = None,
) -> LoadReport:
    """Runs the warm-up and the measured phase against ``call`` and reports.

    Args:
        config: Load settings (rate, bounds, concurrency).
        call: Sends request ``seq`` and returns its status code name.
        n_users: Size of the sampled population, for the report.
        progress_stream: Where the live progress line goes (when enabled).
        on_start: Called after the warm-up, just before the measured phase.

    Returns:
        The report of the measured phase.
    """
    if config.warmup_s > 0:
        warm = _Recorder()
        await _phase(config, call, config.warmup_s, None, warm, time.perf_counter())
    if on_start is not None:
        on_start()
    rec = _Recorder()
    cpu0 = time.process_time()
    start = time.perf_counter()
    ticker = None
    if config.progress and progress_stream is not None:
        ticker = asyncio.ensure_future(_progress(rec, start, progress_stream, config))
    try:
        await _phase(config, call, config.duration_s, config.requests, rec, start)
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            progress_stream.write("\r" + " " * 100 + "\r")
            progress_stream.flush()
    end = max(rec.last_done, start)
    if config.rate:
        # Open loop: the schedule's own span (N calls at R/s take N/R seconds),
        # or longer when the replies ran late. Ending at the last reply alone
        # counted (N-1)/R + one latency: 4 calls at 2/s read as 2.66/s. A
        # duration bound caps the span: 1 call at 0.1/s in a 1 s run is 1 s.
        span = (rec.issued + rec.not_sent) / config.rate
        if config.duration_s is not None:
            span = min(span, config.duration_s)
        end = max(end, start + span)
    elapsed = max(end - start, 1e-9)
    cpu = time.process_time() - cpu0
    ok = rec.codes.get("OK", 0)
    return LoadReport(
        rpc=config.rpc,
        target=config.target,
        mode=config.mode,
        concurrency=config.concurrency,
        rate=config.rate,
        channels=config.channels,
        users=config.users,
        n_users=n_users,
        elapsed_s=elapsed,
        sent=rec.sent,
        ok=ok,
        errors={k: v for k, v in sorted(rec.codes.items()) if k != "OK"},
        qps=rec.sent / elapsed,
        ok_qps=ok / elapsed,
        latency=LatencySummary.from_seconds(rec.latencies),
        send_lag=LatencySummary.from_seconds(rec.lags) if config.rate else None,
        client_cpu_s=cpu,
        client_cores=cpu / elapsed,
        warmup_s=config.warmup_s,
        tls=config.tls is not None,
        error_examples=dict(rec.examples),
        not_sent=rec.not_sent,
        slot_waits=rec.slot_waits,
    )


def _channel_options(config: LoadConfig) -> list[tuple[str, Any]]:
    from recsys.serving import grpc_options

    return [
        *grpc_options(config.max_message_bytes),
        # A private subchannel pool gives every channel its own TCP connection
        # (otherwise equal channels share one and the client is the bottleneck).
        ("grpc.use_local_subchannel_pool", 1),
        # A load test reports what the server answered, so no transparent retries.
        ("grpc.enable_retries", 0),
        # A target naming several backends (`dns:///` of a headless Service, or
        # `ipv4:a:p,b:p`) gets calls on every one of them; gRPC's default
        # (pick_first) would send every channel's calls to the first address.
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
    ]


def _open_channel(config: LoadConfig):
    import grpc

    options = _channel_options(config)
    if config.tls is None:
        return grpc.aio.insecure_channel(config.target, options=options)
    from recsys.serving import channel_credentials

    return grpc.aio.secure_channel(config.target, channel_credentials(config.tls), options=options)


async def run_load(config: LoadConfig, *, progress_stream: TextIO | None = None) -> LoadReport:
    """Drives ``config.rpc`` at ``config.target`` over real gRPC channels.

    Args:
        config: What to send, how hard and for how long.
        progress_stream: Stream for the live progress line (``config.progress``).

    Returns:
        The report of the measured phase.
    """
    import grpc

    factory = RequestFactory(config)
    sampler = IndexSampler(
        len(factory.population), config.users, config.zipf_exponent, seed=config.seed
    )
    factory.prebuild()
    first = _open_channel(config)
    if first.get_state(try_to_connect=False) == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
        # A new channel fails before any connection attempt only when gRPC could
        # not build it ("dns:///", "dns://host:port"); waiting for it to become
        # ready then hung the process at exit instead of ending the run.
        await first.close()
        raise LoadTestError(
            f"target: gRPC cannot open a channel to {config.target!r} (expected host:port, "
            "dns:///host:port, ipv4:addr:port or unix:path)"
        )
    channels = [first] + [_open_channel(config) for _ in range(config.channels - 1)]
    path = method_path(config.rpc)
    # No (de)serialisers: requests go out pre-serialised and responses stay bytes.
    stubs = [ch.unary_unary(path) for ch in channels]
    metadata = tuple(config.metadata) or None
    n_ch = len(stubs)

    async def call(seq: int) -> str:
        payload = factory.payload(sampler())
        try:
            resp = await stubs[seq % n_ch](payload, timeout=config.timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            examples.setdefault(code, exc.details() or "")
            return code
        if inspect is not None and (label := inspect(resp)):
            flagged[label] += 1
        return "OK"

    examples: dict[str, str] = {}
    flagged: Counter = Counter()
    inspect = config.inspect

    def measured_phase_starts() -> None:
        examples.clear()
        flagged.clear()

    try:
        ready = await asyncio.gather(
            *(asyncio.wait_for(ch.channel_ready(), timeout=config.timeout_s) for ch in channels),
            return_exceptions=True,
        )
        report = await drive(
            config,
            call,
            n_users=len(factory.population),
            progress_stream=progress_stream,
            on_start=measured_phase_starts,
        )
    finally:
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)
    report.connected = any(not isinstance(r, BaseException) for r in ready)
    if config.rpc == "Rank":
        report.candidates = factory.candidates
    report.error_examples = {**examples, **report.error_examples}
    report.flagged = dict(sorted(flagged.items()))
    return report


# --- known users ------------------------------------------------------------------------


def known_ids(
    model_dir: str | Path, version: str | None = None
) -> tuple[list[str], list[str], str | None]:
    """User ids and item ids of ``version`` (default: the latest) under ``model_dir``.

    Returns:
        ``(user_ids, item_ids, version)``; empty lists and None when there is
        no readable version (the caller falls back to synthetic ids).
    """
    from recsys.artifacts import ArtifactError, open_version

    if version is not None and not (Path(model_dir) / version).is_dir():
        version = None
    try:
        mv = open_version(model_dir, version)
        users = mv.users
        user_ids = [str(u) for u in users.get("user_id", [])] if isinstance(users, dict) else []
        return user_ids, list(mv.item_ids), mv.version
    except (ArtifactError, OSError):
        return [], [], None


# --- CLI ----------------------------------------------------------------------------------


def _published_version(settings) -> str | None:
    """The version Redis names, which the services serve; None when Redis is not reached.

    The newest directory is not it after a rollback: ids drawn from it were
    reported as the served version, and some were users the served one lacks.
    """
    import redis

    try:
        client = redis.Redis.from_url(
            settings.redis_url.get_secret_value(), socket_timeout=1, socket_connect_timeout=1
        )
        try:
            raw = client.get(redis_keys.CURRENT_VERSION)
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return None
    return raw.decode() if isinstance(raw, bytes) else raw


def _default_target(rpc: str, settings) -> str:
    server = settings.ranking if _SERVICE_OF[rpc] == "RankingService" else settings.retrieval
    return server.local_address


def cli_loadtest(args, settings) -> int:
    """``recsys loadtest``: runs one load test and prints a table or JSON."""
    from recsys.cli import client_tls

    rpc = args.rpc
    target = args.target or _default_target(rpc, settings)
    tls = client_tls(args)
    server = settings.ranking if _SERVICE_OF[rpc] == "RankingService" else settings.retrieval
    metadata: tuple[tuple[str, str], ...] = ()
    if server.auth_token is not None:
        metadata = (("authorization", f"Bearer {server.auth_token.get_secret_value()}"),)
    user_ids, item_ids, version = known_ids(settings.model_dir, _published_version(settings))
    if not user_ids:
        print(
            f"recsys loadtest: no model version under {settings.model_dir}; "
            f"using synthetic user ids 1..{SYNTHETIC_USERS}",
            file=sys.stderr,
        )
    config = LoadConfig(
        rpc=rpc,
        target=target,
        concurrency=args.concurrency,
        rate=args.rate,
        # A run bounded by count only is not cut off at an unasked-for 10 s.
        duration_s=(
            args.duration
            if args.duration is not None or args.requests is not None
            else DEFAULT_DURATION_S
        ),
        requests=args.requests,
        users=args.users,
        user_ids=user_ids,
        item_ids=item_ids,
        candidates=args.candidates,
        k=args.k,
        retrieve_packed=not getattr(args, "unpacked", False),
        metadata=metadata,
        tls=tls,
        variant=args.variant,
        progress=sys.stderr.isatty() and not args.json,
    )
    report = asyncio.run(run_load(config, progress_stream=sys.stderr))
    if report.candidates is not None and report.candidates < config.candidates:
        print(
            f"recsys loadtest: --candidates {config.candidates} is more than the catalogue's "
            f"{report.candidates} items; each Rank request carried all {report.candidates}",
            file=sys.stderr,
        )
    if args.json:
        doc = report.to_dict()
        doc["model_version"] = version
        print(json.dumps(doc, indent=2))
    else:
        print(report.table())
    return 0 if report.ok > 0 else 1
