"""Micro-batching: coalesce concurrent requests into one call (a model, a Redis read).

Shared by both services: ranking batches the whole hydrate-and-score step,
retrieval batches the user reads of concurrent ``Retrieve`` calls.

Like TensorFlow Serving's batching: requests queue up; a batch is cut when
it reaches ``max_batch_size`` or when its oldest request has waited
``max_wait_s``. While a batch runs, the next one keeps filling, so batches
grow with load on their own and throughput grows with concurrency instead
of paying the per-call overhead of TensorFlow for every request.

Two ways to run a batch:

* ``inline=True`` (both services use it): on the event loop itself, from a
  timer callback; ``fn`` may be a coroutine function, and a batch that
  awaits I/O then runs as a task while the next one gathers. On a CPU a
  ranking batch is a few hundred microseconds of mostly GIL-holding numpy
  and one ``Session.run``; a worker thread would add a thread wake-up, a
  cross-thread future and GIL hand-offs to every batch (measured at ~250
  µs of CPU per batch, as much as the scoring) and buy no parallelism.
* ``inline=False`` (the constructor's default): a synchronous ``fn`` on one
  worker thread, so the event loop keeps accepting requests while a long
  batch runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

log = logging.getLogger("recsys.batching")

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
    """Queues requests and runs ``fn`` on batches of them.

    Args:
        fn: Takes a list of requests and returns one result per request, in
            order. If it raises, every request of that batch gets the error.
            With ``inline=True`` it may be a coroutine function: each batch
            then runs as a task, and the next batch gathers while it awaits.
        max_batch_size: Most requests in one call of ``fn``.
        max_wait_s: Longest time the oldest queued request waits for the
            batch to fill before it is run anyway (0: run whatever is
            queued once the loop has handled the requests already arrived).
        on_batch: Called on the loop with each batch's size (metrics).
        name: Worker thread name (``inline=False``).
        inline: Run ``fn`` on the event loop rather than on a worker thread.
        adaptive: (inline) Hold a partial batch for up to ``max_wait_s``
            only while it pays off: while another batch is still running
            (awaiting its I/O), or when the previous batch had more than one
            request. Otherwise a batch starts at once, so a lone request on a
            quiet server pays no batching delay, while a busy server keeps
            gathering full windows of requests per tower call.
        max_in_flight: (inline, coroutine ``fn``) Most batches running at
            once; None for no bound. While that many run, a partial batch
            does not start until one of them finishes, even past
            ``max_wait_s`` (a full batch still starts at once). For batches
            that queue behind each other downstream anyway (one server
            handles them in turn), starting one later costs no latency, and
            fewer, larger batches cost less per request on both ends.
    """

    def __init__(
        self,
        fn: Callable[[list[Req]], Sequence[Res]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
        name: str = "ranking-batch",
        inline: bool = False,
        adaptive: bool = False,
        max_in_flight: int | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1 (None: no bound)")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.inline = inline
        self._async_fn = inspect.iscoroutinefunction(fn)
        if self._async_fn and not inline:
            raise ValueError("an async batch function needs inline=True")
        self._batch_tasks: set[asyncio.Task] = set()
        self.adaptive = adaptive and inline
        # Only batches that run as tasks can be in flight together.
        self.max_in_flight = max_in_flight if inline and self._async_fn else None
        self._last_size = 0
        self._executor = (
            None if inline else ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        )
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._immediate = False
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
        return await self.enqueue(request)

    def enqueue(self, request: Req) -> asyncio.Future[Res]:
        """Queues one request; its future gets the result.

        For a caller that may stop waiting without giving the request up
        (``asyncio.shield`` it): the batch still runs it. Cancelling the
        future itself withdraws the request if its batch has not started.
        """
        if self._closed:
            raise BatcherClosed("the scoring queue is shut down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Res] = loop.create_future()
        self._pending.append(_Pending(request, fut, time.monotonic()))
        if self.inline:
            self._schedule(loop)
        else:
            self._ensure_started()
            assert self._wake is not None
            self._wake.set()
        return fut

    # --- inline: batches run from loop callbacks -------------------------------------

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arms the one flush callback: now if a batch is full, else when the oldest is due."""
        if not self._pending:
            return
        full = len(self._pending) >= self.max_batch_size
        bounded = self.max_in_flight is not None and len(self._batch_tasks) >= self.max_in_flight
        if full and bounded:
            # Callers that gave up (their deadline passed while the bound held
            # the queue) still sit in it: only live ones make a batch full, or
            # a batch of one live request would start past the bound.
            self._pending = deque(p for p in self._pending if not p.future.done())
            full = len(self._pending) >= self.max_batch_size
        if not full and bounded:
            return  # re-armed by _batch_done when a running batch finishes
        now = full or (
            # Adaptive: wait only when waiting has been paying off (the last
            # batch had company) or a batch is running (whose arrivals queue
            # anyway); a lone request on a quiet server runs at once.
            self.adaptive and not self._batch_tasks and self._last_size <= 1
        )
        if self._timer is not None:
            if self._immediate or not now:
                return  # already armed early enough
            self._timer.cancel()
        due = self._pending[0].enqueued + self.max_wait_s - time.monotonic()
        self._immediate = now or due <= 0
        if self._immediate:
            self._timer = loop.call_soon(self._flush_inline)
        else:
            self._timer = loop.call_later(due, self._flush_inline)

    def _flush_inline(self) -> None:
        self._timer = None
        batch = self._take()
        if batch:
            self._count(batch)
            if self._async_fn:
                # The batch awaits I/O (e.g. one Redis read for all its users);
                # the next batch gathers meanwhile.
                task = asyncio.get_running_loop().create_task(self._execute_async(batch))
                self._batch_tasks.add(task)
                task.add_done_callback(partial(self._batch_done, batch))
            else:
                try:
                    results = self.fn([p.request for p in batch])
                except Exception as exc:
                    self._fail(batch, exc)
                else:
                    self._deliver(batch, results)
        if self._pending and not self._closed:
            self._schedule(asyncio.get_running_loop())

    def _batch_done(self, batch: list[_Pending[Req, Res]], task: asyncio.Task) -> None:
        self._batch_tasks.discard(task)
        if task.cancelled():
            # Cancelled before its first step (close() right after the flush):
            # _settle never ran, so nothing else would answer these callers.
            self._fail(batch, BatcherClosed("the scoring queue is shut down"), quiet=True)
        # What queued while this batch awaited is the next batch (adaptive).
        if self._pending and not self._closed:
            self._schedule(asyncio.get_running_loop())

    async def _execute_async(self, batch: list[_Pending[Req, Res]]) -> None:
        await self._settle(batch, partial(self.fn, [p.request for p in batch]))  # type: ignore[arg-type]

    async def _settle(
        self, batch: list[_Pending[Req, Res]], start: Callable[[], Awaitable[Any]]
    ) -> None:
        """Runs one batch and hands each caller its own result (or the failure).

        ``start()`` is called inside the guard, so a batch that cannot even
        start still fails its callers instead of the worker.
        """
        try:
            results = await start()
        except asyncio.CancelledError:
            self._fail(batch, BatcherClosed("the scoring queue is shut down"), quiet=True)
            raise
        except Exception as exc:
            self._fail(batch, exc)
        else:
            self._deliver(batch, results)

    def _count(self, batch: list[_Pending[Req, Res]]) -> None:
        self._last_size = len(batch)
        self.batches += 1
        self.requests += len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch))

    def _fail(self, batch: list[_Pending[Req, Res]], exc: BaseException, quiet: bool = False):
        if not quiet:
            log.error("batch of %d failed", len(batch), exc_info=exc)
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)

    def _deliver(self, batch: list[_Pending[Req, Res]], results: Sequence[Res]) -> None:
        if len(results) != len(batch):
            self._fail(
                batch,
                RuntimeError(
                    f"batch function returned {len(results)} results for {len(batch)} requests"
                ),
            )
            return
        for p, r in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(r)

    # --- worker thread ----------------------------------------------------------------

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
                # A timeout scope, not wait_for: no task wrapped around the wait.
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
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
            self._count(batch)
            await self._settle(
                batch,
                partial(loop.run_in_executor, self._executor, self.fn, [p.request for p in batch]),
            )

    @property
    def idle(self) -> bool:
        """An inline batcher with nothing queued, armed or running: dropping it leaves nothing."""
        return self.inline and not (self._pending or self._batch_tasks or self._timer)

    async def close(self) -> None:
        """Stops the worker; queued and later requests fail with BatcherClosed."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Cancel every running batch before awaiting any: awaiting one first
        # would let a later one start meanwhile.
        running = list(self._batch_tasks)
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(BatcherClosed("the scoring queue is shut down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
