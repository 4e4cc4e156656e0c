"""Micro-batching: coalesce concurrent requests into one model call.

Like TensorFlow Serving's batching: requests queue up; a batch is cut when
it reaches ``max_batch_size`` or when its oldest request has waited
``max_wait_s``. While the worker is busy with one batch the next one keeps
filling, so batches grow with load on their own and throughput grows with
concurrency instead of paying the per-call overhead of TensorFlow for every
request. The batch function runs on a single worker thread, so the event
loop keeps accepting and parsing requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger("ranking_service.batcher")

Req = TypeVar("Req")
Res = TypeVar("Res")


class BatcherClosed(RuntimeError):
    """Raised to callers submitting to (or waiting on) a closed batcher."""


@dataclass
class _Pending(Generic[Req, Res]):
    request: Req
    future: asyncio.Future[Res]
    enqueued: float


class MicroBatcher(Generic[Req, Res]):
    """Queues requests and runs ``fn`` on batches of them on one worker thread.

    Args:
        fn: Takes a list of requests and returns one result per request, in
            order. If it raises, every request of that batch gets the error.
        max_batch_size: Most requests in one call of ``fn``.
        max_wait_s: Longest time the oldest queued request waits for the
            batch to fill before it is run anyway (0: run whatever is queued).
        on_batch: Called on the loop with each batch's size (metrics).
        name: Worker thread name.
    """

    def __init__(
        self,
        fn: Callable[[list[Req]], Sequence[Res]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
        name: str = "ranking-batch",
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: deque[_Pending[Req, Res]] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self.batches = 0
        self.requests = 0

    def _ensure_started(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def submit(self, request: Req) -> Res:
        """Queues one request and waits for its own result."""
        if self._closed:
            raise BatcherClosed("the scoring queue is shut down")
        self._ensure_started()
        fut: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(request, fut, time.monotonic()))
        assert self._wake is not None
        self._wake.set()
        return await fut

    def _take(self) -> list[_Pending[Req, Res]]:
        batch: list[_Pending[Req, Res]] = []
        while self._pending and len(batch) < self.max_batch_size:
            p = self._pending.popleft()
            # A caller that gave up (deadline, cancellation) costs no model time.
            if not p.future.done():
                batch.append(p)
        return batch

    async def _fill(self) -> None:
        """Waits until the queue holds a full batch or its oldest entry is due."""
        assert self._wake is not None
        while self._pending and len(self._pending) < self.max_batch_size:
            remaining = self._pending[0].enqueued + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._fill()
            batch = self._take()
            if not batch:
                continue
            self.batches += 1
            self.requests += len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = await loop.run_in_executor(
                    self._executor, self.fn, [p.request for p in batch]
                )
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"batch function returned {len(results)} results for {len(batch)} requests"
                    )
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(BatcherClosed("the scoring queue is shut down"))
                raise
            except Exception as exc:
                log.exception("batch of %d failed", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, r in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(r)

    async def close(self) -> None:
        """Stops the worker; queued and later requests fail with BatcherClosed."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(BatcherClosed("the scoring queue is shut down"))
        self._executor.shutdown(wait=False, cancel_futures=True)
