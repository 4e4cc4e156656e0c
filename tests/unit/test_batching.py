import asyncio
import contextlib
import threading
import time

import pytest

from recsys.batching import BatcherClosed, MicroBatcher


class Recorder:
    """A batch function that records what it was given and where it ran."""

    def __init__(self, sleep_s: float = 0.0, fail_on: object = None):
        self.batches: list[list] = []
        self.threads: set[str] = set()
        self.sleep_s = sleep_s
        self.fail_on = fail_on

    def __call__(self, batch):
        self.batches.append(list(batch))
        self.threads.add(threading.current_thread().name)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.fail_on is not None and self.fail_on in batch:
            raise ValueError(f"bad request {self.fail_on}")
        return [("answer", x, len(batch)) for x in batch]


@pytest.mark.parametrize("inline", [False, True])
async def test_each_caller_gets_its_own_result_under_concurrency(inline):
    fn = Recorder(sleep_s=0.002)
    b = MicroBatcher(fn, max_batch_size=16, max_wait_s=0.002, inline=inline)
    try:
        results = await asyncio.gather(*(b.submit(i) for i in range(200)))
    finally:
        await b.close()
    assert [r[1] for r in results] == list(range(200))
    assert all(len(batch) <= 16 for batch in fn.batches)
    assert sorted(x for batch in fn.batches for x in batch) == list(range(200))
    # Coalescing happened: far fewer calls than requests.
    assert len(fn.batches) <= 200 // 4


@pytest.mark.parametrize("inline", [False, True])
async def test_fills_a_batch_within_the_wait_and_runs_a_lone_request_after_it(inline):
    fn = Recorder()
    b = MicroBatcher(fn, max_batch_size=8, max_wait_s=0.05, inline=inline)
    try:
        first = asyncio.ensure_future(b.submit("a"))
        await asyncio.sleep(0.005)
        second = asyncio.ensure_future(b.submit("b"))
        assert await first == ("answer", "a", 2)
        assert await second == ("answer", "b", 2)
        t0 = time.monotonic()
        assert await b.submit("c") == ("answer", "c", 1)
        waited = time.monotonic() - t0
    finally:
        await b.close()
    assert fn.batches == [["a", "b"], ["c"]]
    assert waited >= 0.04  # the lone request waited for company, then ran anyway


@pytest.mark.parametrize("inline", [False, True])
async def test_full_batch_does_not_wait(inline):
    fn = Recorder()
    b = MicroBatcher(fn, max_batch_size=3, max_wait_s=5.0, inline=inline)
    try:
        t0 = time.monotonic()
        out = await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(3))), 2.0)
    finally:
        await b.close()
    assert time.monotonic() - t0 < 1.0
    assert [r[2] for r in out] == [3, 3, 3]


@pytest.mark.parametrize("inline", [False, True])
async def test_batches_grow_while_the_worker_is_busy(inline):
    """Requests queue while a batch runs, so concurrent ones share calls."""
    fn = Recorder(sleep_s=0.02)
    b = MicroBatcher(fn, max_batch_size=64, max_wait_s=0.0, inline=inline)
    try:
        for _ in range(10):
            await b.submit(0)
        await asyncio.gather(*(b.submit(i) for i in range(320)))
    finally:
        await b.close()
    # 10 serial requests cost ~10 calls; 320 concurrent ones fit in far fewer calls.
    assert len(fn.batches) - 10 <= 320 // 16


@pytest.mark.parametrize("inline", [False, True])
async def test_a_failing_batch_fails_its_callers_only(inline):
    fn = Recorder(fail_on="bad")
    b = MicroBatcher(fn, max_batch_size=2, max_wait_s=0.05, inline=inline)
    try:
        r = await asyncio.gather(b.submit("bad"), b.submit("ok1"), return_exceptions=True)
        assert all(isinstance(x, ValueError) for x in r)
        assert await b.submit("ok2") == ("answer", "ok2", 1)
    finally:
        await b.close()


@pytest.mark.parametrize("inline", [False, True])
async def test_a_batch_function_that_loses_answers_fails_its_callers(inline):
    """Too few results cannot be matched to callers: each one fails instead of waiting forever."""
    b = MicroBatcher(lambda batch: batch[1:], max_batch_size=2, max_wait_s=0.05, inline=inline)
    try:
        r = await asyncio.wait_for(
            asyncio.gather(b.submit("a"), b.submit("b"), return_exceptions=True), timeout=5
        )
        assert all(isinstance(x, RuntimeError) for x in r), r
        assert "returned 1 results for 2 requests" in str(r[0])
    finally:
        await b.close()


@pytest.mark.parametrize("inline", [False, True])
async def test_cancelled_callers_cost_no_model_time(inline):
    fn = Recorder()
    b = MicroBatcher(fn, max_batch_size=8, max_wait_s=0.05, inline=inline)
    try:
        gone = asyncio.ensure_future(b.submit("gone"))
        await asyncio.sleep(0)
        gone.cancel()
        assert await b.submit("kept") == ("answer", "kept", 1)
    finally:
        await b.close()
    assert fn.batches == [["kept"]]


async def test_runs_off_the_event_loop_which_stays_responsive():
    fn = Recorder(sleep_s=0.2)
    b = MicroBatcher(fn, max_batch_size=4, max_wait_s=0.0, name="score-worker")
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.ensure_future(ticker())
    try:
        await b.submit(1)
    finally:
        t.cancel()
        await b.close()
    assert fn.threads and all(name.startswith("score-worker") for name in fn.threads)
    assert ticks >= 5


async def test_close_fails_pending_and_later_requests():
    fn = Recorder(sleep_s=0.1)
    b = MicroBatcher(fn, max_batch_size=1, max_wait_s=0.0)
    running = asyncio.ensure_future(b.submit(1))
    queued = asyncio.ensure_future(b.submit(2))
    await asyncio.sleep(0.02)
    await b.close()
    for fut in (running, queued):
        with pytest.raises(BatcherClosed):
            await fut
    with pytest.raises(BatcherClosed):
        await b.submit(3)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(lambda b: b, max_batch_size=0, max_wait_s=0.0)
    with pytest.raises(ValueError, match="max_wait_s"):
        MicroBatcher(lambda b: b, max_batch_size=1, max_wait_s=-1.0)


async def test_inline_runs_on_the_loop_thread_and_coalesces_one_loop_turn():
    fn = Recorder()
    b = MicroBatcher(fn, max_batch_size=64, max_wait_s=0.0, inline=True)
    try:
        # Submitted in one loop turn: one batch even with no wait at all.
        out = await asyncio.gather(*(b.submit(i) for i in range(10)))
        alone = await b.submit("x")
    finally:
        await b.close()
    assert [r[2] for r in out] == [10] * 10 and alone == ("answer", "x", 1)
    assert fn.threads == {threading.current_thread().name}


async def test_inline_close_fails_queued_and_later_requests():
    fn = Recorder()
    b = MicroBatcher(fn, max_batch_size=8, max_wait_s=5.0, inline=True)
    queued = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0.01)
    await b.close()
    with pytest.raises(BatcherClosed):
        await queued
    with pytest.raises(BatcherClosed):
        await b.submit(2)
    assert fn.batches == []


async def test_adaptive_runs_a_lone_request_at_once_and_gathers_behind_a_running_batch():
    calls: list[list] = []
    release = asyncio.Event()

    async def fn(batch):
        calls.append(list(batch))
        if len(calls) == 1:
            await release.wait()  # the first batch "awaits Redis" for a while
        return [("answer", x, len(batch)) for x in batch]

    b = MicroBatcher(fn, max_batch_size=8, max_wait_s=5.0, inline=True, adaptive=True)
    try:
        t0 = time.monotonic()
        first = asyncio.ensure_future(b.submit("first"))
        await asyncio.sleep(0.01)
        assert calls == [["first"]]  # nothing running: it started at once, no 5 s wait
        later = [asyncio.ensure_future(b.submit(x)) for x in ("a", "b", "c")]
        await asyncio.sleep(0.01)
        assert calls == [["first"]]  # held while the first batch runs
        release.set()
        out = await asyncio.wait_for(asyncio.gather(first, *later), 2.0)
        assert time.monotonic() - t0 < 1.0
    finally:
        await b.close()
    assert calls == [["first"], ["a", "b", "c"]]
    assert out[0] == ("answer", "first", 1) and out[1] == ("answer", "a", 3)


async def test_adaptive_does_not_hold_past_the_max_wait():
    release = asyncio.Event()
    calls: list[list] = []

    async def fn(batch):
        calls.append(list(batch))
        if len(calls) == 1:
            await release.wait()
        return list(batch)

    b = MicroBatcher(fn, max_batch_size=8, max_wait_s=0.05, inline=True, adaptive=True)
    try:
        stuck = asyncio.ensure_future(b.submit("stuck"))
        await asyncio.sleep(0.01)
        # The running batch never finishes by itself; the next one starts after max_wait.
        assert await asyncio.wait_for(b.submit("next"), 2.0) == "next"
        release.set()
        assert await stuck == "stuck"
    finally:
        await b.close()


async def test_async_batches_fail_alone_and_close_fails_running_ones():
    async def fn(batch):
        if "bad" in batch:
            raise ValueError("bad batch")
        if "hang" in batch:
            await asyncio.sleep(60)
        return list(batch)

    b = MicroBatcher(fn, max_batch_size=1, max_wait_s=0.0, inline=True, adaptive=True)
    with pytest.raises(ValueError, match="bad batch"):
        await b.submit("bad")
    assert await b.submit("ok") == "ok"
    hang = asyncio.ensure_future(b.submit("hang"))
    await asyncio.sleep(0.01)
    await b.close()
    with pytest.raises(BatcherClosed):
        await hang


def test_an_async_function_needs_inline():
    async def fn(batch):
        return batch

    with pytest.raises(ValueError, match="inline"):
        MicroBatcher(fn, max_batch_size=1, max_wait_s=0.0)


class Gated:
    """An async batch function (``run``) whose every call waits until its gate opens."""

    def __init__(self):
        self.calls: list[list] = []
        self.gates: list[asyncio.Event] = []

    async def run(self, batch):
        self.calls.append(list(batch))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()  # the batch "waits for the server" until released
        return list(batch)

    def open_all(self):
        for g in self.gates:
            g.set()


async def test_in_flight_bound_holds_partial_batches_past_the_wait_until_one_finishes():
    fn = Gated()
    b = MicroBatcher(fn.run, max_batch_size=8, max_wait_s=0.01, inline=True, adaptive=True,
                     max_in_flight=2)  # fmt: skip
    try:
        first = [asyncio.ensure_future(b.submit(x)) for x in ("a", "b")]
        await asyncio.sleep(0.05)
        second = [asyncio.ensure_future(b.submit(x)) for x in ("c", "d")]
        await asyncio.sleep(0.05)
        assert fn.calls == [["a", "b"], ["c", "d"]]  # two running: the bound
        held = [asyncio.ensure_future(b.submit(x)) for x in ("e", "f", "g")]
        await asyncio.sleep(0.1)  # ten times max_wait
        assert len(fn.calls) == 2  # held: no third call while two run
        fn.gates[0].set()
        assert await asyncio.wait_for(asyncio.gather(*first), 2.0) == ["a", "b"]
        await asyncio.sleep(0.05)
        assert fn.calls[2] == ["e", "f", "g"]  # went as soon as a slot freed, as one batch
        fn.open_all()
        assert await asyncio.wait_for(asyncio.gather(*second, *held), 2.0) == list("cdefg")
    finally:
        fn.open_all()
        await b.close()


async def test_in_flight_bound_lets_a_full_batch_go():
    fn = Gated()
    b = MicroBatcher(fn.run, max_batch_size=3, max_wait_s=0.01, inline=True, adaptive=True,
                     max_in_flight=1)  # fmt: skip
    try:
        running = asyncio.ensure_future(b.submit("a"))
        await asyncio.sleep(0.05)
        full = [asyncio.ensure_future(b.submit(x)) for x in ("b", "c", "d")]
        await asyncio.sleep(0.05)
        assert fn.calls == [["a"], ["b", "c", "d"]]  # full: not held by the bound
        fn.open_all()
        assert await asyncio.wait_for(asyncio.gather(running, *full), 2.0) == list("abcd")
    finally:
        fn.open_all()
        await b.close()


def test_rejects_a_zero_in_flight_bound():
    async def fn(batch):
        return batch

    with pytest.raises(ValueError, match="max_in_flight"):
        MicroBatcher(fn, max_batch_size=4, max_wait_s=0.0, inline=True, max_in_flight=0)


async def test_close_answers_a_batch_cancelled_before_it_started():
    """A batch task that close() cancels before its first step still fails its callers."""
    started: list[list[str]] = []
    closing: list[asyncio.Task] = []

    async def fn(batch):
        started.append(list(batch))
        await asyncio.sleep(0.05)
        return list(batch)

    def on_batch(size: int) -> None:
        if b.batches == 2:
            # Runs in the flush callback, before the batch's task is created:
            # the loop runs close() first, so the task is cancelled unstarted.
            closing.append(asyncio.ensure_future(b.close()))

    b = MicroBatcher(fn, max_batch_size=4, max_wait_s=0.01, inline=True, adaptive=True,
                     on_batch=on_batch)  # fmt: skip
    calls = [asyncio.ensure_future(b.submit(s)) for s in "pqrstu"]
    done, waiting = await asyncio.wait(calls, timeout=1.0)
    assert closing and started == [list("pqrs")], started
    assert not waiting, f"{len(waiting)} callers never answered"
    assert all(isinstance(c.exception(), BatcherClosed) for c in done)


async def test_callers_that_gave_up_do_not_make_a_batch_full_past_the_in_flight_bound():
    """A slow downstream, callers timing out while the bound holds the queue."""
    running = peak = 0

    async def slow(requests):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.3)
        finally:
            running -= 1
        return requests

    b = MicroBatcher(
        slow, max_batch_size=8, max_wait_s=0.002, inline=True, adaptive=True, max_in_flight=1
    )

    async def impatient(i: int) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await b.submit(i)

    callers = []
    for i in range(40):
        callers.append(asyncio.ensure_future(impatient(i)))
        await asyncio.sleep(0.01)
    await asyncio.gather(*callers)
    await b.close()
    assert peak == 1
