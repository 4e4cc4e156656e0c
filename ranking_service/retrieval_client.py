"""Client of ``RetrievalService.Retrieve`` used by ``Recommend``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from ranking_service import metrics as M
from recsys.batching import MicroBatcher
from recsys.channels import create_channel
from recsys.config import RankingSettings
from recsys.packed import Catalogue, candidates_of
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc

Req = TypeVar("Req")
Res = TypeVar("Res")

# Share of the client's remaining deadline kept back from the retrieval call.
DEADLINE_RESERVE = 0.2


class RetrievalUnavailable(Exception):
    """Retrieval could not answer; ``reason`` is safe to show a client."""

    def __init__(self, reason: str, code: str):
        super().__init__(reason)
        self.reason = reason
        self.code = code


class RetrievalRejected(Exception):
    """Retrieval refused the request itself (INVALID_ARGUMENT): the caller's fault."""


@dataclass
class RetrievalAnswer:
    """Candidates with provenance and per-source reports.

    Attributes:
        candidates: Supports ``len()`` and ``candidates[p]``, which gives an
            object with ``item_id``, ``sources``, ``score``, ``source_scores``,
            ``seed_item_id`` and ``genre`` (``recsys.packed.PackedCandidate``,
            decoded on access, or ``recsys.v1.Candidate`` from an older server).
        item_ids: Candidate ids in retrieval order (no per-candidate decoding);
            empty when the answer came by rows.
        rows: The candidates' rows in the caller's catalogue when retrieval
            shares it and answered by rows (then no ids were sent), else None.
        reports: ``recsys.v1.SourceReport`` per source.
        index_version: Version that produced the answer.
        user_state: ``recsys.v1.StoredUserState`` as retrieval read it, when
            asked for and retrieval could read it, else None.
    """

    candidates: Sequence[Any]
    reports: Sequence[Any]
    index_version: str
    item_ids: Sequence[str] = ()
    rows: np.ndarray | None = None
    user_state: Any | None = None


def retrieval_batcher(
    fn: Callable[[list[Req]], Awaitable[Sequence[Res]]],
    settings: RankingSettings,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> MicroBatcher[Req, Res]:
    """The batcher that carries concurrent Recommends' retrievals as one call.

    ``fn`` sends one batch upstream. Built from the ranking settings
    (``retrieval_batch_size``, ``retrieval_batch_wait_ms``,
    ``retrieval_max_in_flight``); the benchmark's relay (``bench/relay.py``)
    builds its hop with this too, so its floor has the same batching.
    """
    return MicroBatcher(
        fn,  # type: ignore[arg-type]
        max_batch_size=settings.retrieval_batch_size,
        max_wait_s=settings.retrieval_batch_wait_ms / 1000.0,
        inline=True,
        adaptive=True,
        max_in_flight=settings.retrieval_max_in_flight or None,
        on_batch=on_batch,
    )


# After an old retrieval server refused RetrieveMany, how long the client
# sends one Retrieve per request before trying batches again.
RETRY_BATCHING_S = 60.0


class RetrievalClient:
    """One long-lived ``grpc.aio`` channel to the retrieval service."""

    def __init__(self, settings: RankingSettings):
        self.address = settings.retrieval_address
        self.timeout_s = settings.retrieval_timeout_s
        # One retry of UNAVAILABLE (a dropped connection) is worth it; more would
        # only spend the deadline that the popular-list fallback needs.
        self.channel = create_channel(
            self.address,
            aio=True,
            tls=settings.retrieval_tls,
            tls_setting="ranking.retrieval_tls",
            max_message_bytes=settings.max_message_bytes,
            max_attempts=2,
        )
        token = settings.retrieval_auth_token
        self.metadata = (
            (("authorization", f"Bearer {token.get_secret_value()}"),) if token else None
        )
        self.stub = retrieval_pb2_grpc.RetrievalServiceStub(self.channel)
        # Room for the RetrieveMany envelope (a few bytes per member) under the limit.
        self.max_batch_bytes = int(settings.max_message_bytes * 0.9)
        # Concurrent Recommends share one RetrieveMany call: gRPC's per-call
        # CPU (both ends, all Python) was about a third of each service's
        # time per Recommend. Off (None) with a batch size of 1.
        self._batcher: MicroBatcher[tuple[Any, float], Any] | None = None
        # Batchers switched off on UNIMPLEMENTED and still busy; kept so close() stops them.
        self._retired: list[MicroBatcher[tuple[Any, float], Any]] = []
        self._settings = settings
        # When batching, switched off by an old server, is tried again (monotonic).
        self._retry_batching_at: float | None = None
        # After a batch's answer came back too big: the most members one call
        # carries, and until when (monotonic). Without it every batch paid
        # the failed call and the halving again.
        self._answer_fit: tuple[int, float] | None = None
        if settings.retrieval_batch_size > 1:
            self._batcher = self._new_batcher()

    def _new_batcher(self) -> MicroBatcher[tuple[Any, float], Any]:
        return retrieval_batcher(
            self._retrieve_many, self._settings, on_batch=M.RETRIEVAL_BATCH_SIZE.observe
        )

    async def retrieve(
        self,
        user: Any,
        budget: int,
        sources: Sequence[str],
        time_remaining: float | None,
        *,
        source_scores: bool = True,
        trace_metadata: Sequence[tuple[str, str]] = (),
        catalogue: Catalogue | None = None,
        user_state: bool = False,
    ) -> RetrievalAnswer:
        """Calls Retrieve with the caller's deadline propagated.

        The deadline is ``min(retrieval_timeout_s, 80% of the time the caller
        has left)``; the rest is kept to rank the popular list if retrieval
        does not answer. The answer comes packed (parallel arrays, see
        :mod:`recsys.packed`). ``source_scores=False`` asks retrieval to leave
        the per-source scores out (only debug output shows them).
        ``trace_metadata`` (a W3C ``traceparent``) goes out with the call.
        With ``catalogue`` (the caller's model version), retrieval names the
        candidates by row when it serves the same catalogue. ``user_state``
        asks for the user's stored state as retrieval read it.

        Raises:
            RetrievalUnavailable: Down, timed out, overloaded or failing.
            RetrievalRejected: Retrieval found the request invalid.
        """
        timeout = self.timeout_s
        if time_remaining is not None:
            # Keep a share of the caller's deadline to rank the fallback list
            # if retrieval does not answer in time.
            timeout = max(min(timeout, time_remaining * (1.0 - DEADLINE_RESERVE)), 0.001)
        request = retrieval_pb2.RetrieveRequest(
            user=user,
            budget=budget,
            sources=list(sources),
            omit_source_scores=not source_scores,
            packed=True,
            catalogue=catalogue.catalogue_id if catalogue is not None else "",
            with_user_state=user_state,
        )
        if self._retry_batching_at is not None and time.monotonic() >= self._retry_batching_at:
            # The old server may have been a rollback or a pod mid-rollout:
            # batching comes back, and goes again if it still answers UNIMPLEMENTED.
            self._retry_batching_at = None
            self._batcher = self._new_batcher()
        try:
            if self._batcher is not None and not trace_metadata:
                # A trace context is per request, so a traced call goes alone.
                resp = await self._batched(request, timeout)
            else:
                metadata = self.metadata
                if trace_metadata:
                    metadata = (*(metadata or ()), *trace_metadata)
                resp = await self.stub.Retrieve(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise _failure(exc.code(), exc.details(), timeout) from exc
        try:
            candidates, item_ids, rows = candidates_of(resp, catalogue)
        except ValueError as exc:  # a malformed packed answer: treat as retrieval failing
            raise RetrievalUnavailable("retrieval sent a malformed answer", "INTERNAL") from exc
        return RetrievalAnswer(
            candidates=candidates,
            reports=resp.source_reports,
            index_version=resp.index_version,
            item_ids=item_ids or (),
            rows=rows,
            user_state=resp.user_state if resp.HasField("user_state") else None,
        )

    async def _batched(self, request: Any, timeout: float) -> Any:
        """One request's answer through the shared RetrieveMany calls."""
        assert self._batcher is not None
        try:
            # A timeout scope, not wait_for: no extra task per request.
            async with asyncio.timeout(timeout):
                # The absolute deadline travels with the request: time spent
                # queued behind the in-flight bound is time the call no longer has.
                got = await self._batcher.submit((request, time.monotonic() + timeout))
        except TimeoutError:
            raise _failure(grpc.StatusCode.DEADLINE_EXCEEDED, "", timeout) from None
        if isinstance(got, grpc.aio.AioRpcError):
            raise got  # the whole call failed; mapped like a single Retrieve
        code, message, resp = got
        if code:
            raise _failure(_CODES.get(code, grpc.StatusCode.UNKNOWN), message, timeout)
        return resp

    async def _retrieve_many(self, jobs: list[tuple[Any, float]]) -> list[Any]:
        """Sends a batch of (request, absolute deadline) as one RetrieveMany; one outcome each."""
        if len(jobs) == 1:  # no company: the plain call is cheaper
            request, deadline = jobs[0]
            try:
                resp = await self.stub.Retrieve(
                    request, timeout=_left(deadline), metadata=self.metadata
                )
            except grpc.aio.AioRpcError as exc:
                return [exc]
            return [(0, "", resp)]
        parts = _by_size(jobs, self.max_batch_bytes)
        fit = self._answer_fit
        if fit is not None and time.monotonic() >= fit[1]:
            fit = self._answer_fit = None  # try whole batches again
        if fit is not None and len(parts) == 1 and len(jobs) > fit[0]:
            parts = [jobs[i : i + fit[0]] for i in range(0, len(jobs), fit[0])]
        if len(parts) > 1:  # a few large requests: several calls rather than one too big
            got = await asyncio.gather(*(self._retrieve_many(part) for part in parts))
            return [one for part in got for one in part]
        # The call may run as long as its most patient member; each caller
        # stops waiting at its own deadline (``_batched``).
        timeout = _left(max(d for _, d in jobs))
        batch = retrieval_pb2.RetrieveManyRequest(requests=[r for r, _ in jobs])
        try:
            answer = await self.stub.RetrieveMany(batch, timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # A retrieval server older than RetrieveMany: one call each from now on.
                if self._batcher is not None:
                    # Batching is retried every RETRY_BATCHING_S for as long as the
                    # old server serves: keep only the retired batchers still busy.
                    done = [b for b in self._retired if b.idle]
                    self._retired = [b for b in self._retired if not b.idle]
                    self._retired.append(self._batcher)
                    self._batcher = None
                    self._retry_batching_at = time.monotonic() + RETRY_BATCHING_S
                    for b in done:
                        await b.close()
                alone = await asyncio.gather(*(self._retrieve_many([j]) for j in jobs))
                return [one for (one,) in alone]
            if _answer_too_big(exc):
                # Each member's answer fits the limit, their sum did not (long
                # ids, large budgets): halves, until they fit or go alone.
                # _by_size can only bound the requests' side.
                half = len(jobs) // 2
                known = self._answer_fit[0] if self._answer_fit is not None else len(jobs)
                self._answer_fit = (
                    max(1, min(known, half)),
                    time.monotonic() + RETRY_BATCHING_S,
                )
                got = await asyncio.gather(
                    self._retrieve_many(jobs[:half]), self._retrieve_many(jobs[half:])
                )
                return [one for part in got for one in part]
            return [exc] * len(jobs)
        if len(answer.outcomes) != len(jobs):
            bad = (grpc.StatusCode.INTERNAL.value[0], "RetrieveMany answer count mismatch", None)
            return [bad] * len(jobs)
        return [(o.code, o.message, o.response) for o in answer.outcomes]

    async def close(self) -> None:
        """Stops the batcher and closes the channel."""
        for batcher in (self._batcher, *self._retired):
            if batcher is not None:
                await batcher.close()
        await self.channel.close()


def _left(deadline: float) -> float:
    """Seconds until ``deadline`` (monotonic), at least 1 ms so gRPC gets a real deadline."""
    return max(deadline - time.monotonic(), 0.001)


def _answer_too_big(exc: grpc.aio.AioRpcError) -> bool:
    """True when this client refused an answer over its receive limit.

    Not the server's own RESOURCE_EXHAUSTED (its overload bound), which a
    retry in halves would only add to.
    """
    return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (
        exc.details() or ""
    )


def _by_size(jobs: list[tuple[Any, float]], limit: int) -> list[list[tuple[Any, float]]]:
    """Splits a batch so no call carries more than ``limit`` bytes of requests.

    Requests within the message limit are valid alone; batched blindly, a
    few large ones (10k excluded ids each) made the combined message too big
    and failed every member with RESOURCE_EXHAUSTED.
    """
    sizes = [r.ByteSize() for r, _ in jobs]
    if sum(sizes) <= limit:
        return [jobs]
    parts: list[list[tuple[Any, float]]] = [[]]
    total = 0
    for job, size in zip(jobs, sizes, strict=True):
        if parts[-1] and total + size > limit:
            parts.append([])
            total = 0
        parts[-1].append(job)
        total += size
    return parts


# google.rpc.Code number -> grpc.StatusCode (RetrieveOutcome.code).
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def _failure(
    code: grpc.StatusCode, details: str | None, timeout: float
) -> RetrievalUnavailable | RetrievalRejected:
    """The domain error for a failed retrieval, whichever call carried it."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return RetrievalRejected(_caller_field(details or "invalid request"))
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RetrievalUnavailable(
            f"retrieval did not answer within {timeout * 1000:.0f} ms", code.name
        )
    return RetrievalUnavailable(f"retrieval unavailable ({code.name})", code.name)


def _caller_field(details: str) -> str:
    """Retrieval's message with its field named as in the caller's RecommendRequest."""
    # The other fields retrieval checks (user.*, sources[i]) have the same names in both.
    if details.startswith("budget:"):
        return "retrieval_budget:" + details[len("budget:") :]
    return details
