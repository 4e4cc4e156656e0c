"""``await_each``: a source's queued reads in order, inline when done, nothing left unread."""

from __future__ import annotations

import asyncio
import gc

import pytest

from retrieval_service.sources.base import await_each


def test_done_futures_are_read_without_suspending():
    async def main():
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(3)]
        for i, f in enumerate(futs):
            f.set_result(i)
        coro = await_each(futs)
        # One step runs it to the end: a source answered from copies stays inline.
        with pytest.raises(StopIteration) as done:
            coro.send(None)
        return done.value.value

    assert asyncio.run(main()) == [0, 1, 2]


def _run_collecting_loop_errors(body) -> list[dict]:
    seen: list[dict] = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: seen.append(ctx))
        await body()
        await asyncio.sleep(0)  # the consuming callbacks run here
        gc.collect()

    asyncio.run(main())
    return [c for c in seen if "never retrieved" in str(c.get("message", ""))]


def test_a_failure_leaves_no_unretrieved_errors_behind():
    async def body():
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(3)]
        task = asyncio.ensure_future(await_each(futs))
        futs[0].set_exception(RuntimeError("first read failed"))
        futs[2].set_exception(RuntimeError("third failed too"))
        with pytest.raises(RuntimeError, match="first"):
            await task
        futs[1].set_exception(RuntimeError("second failed later"))

    assert _run_collecting_loop_errors(body) == []


def test_a_cancelled_source_leaves_no_unretrieved_errors_behind():
    async def body():
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(3)]
        task = asyncio.ensure_future(await_each(futs))
        await asyncio.sleep(0)
        task.cancel()  # the source's timeout
        with pytest.raises(asyncio.CancelledError):
            await task
        for f in futs[1:]:  # the shared read fails after the source gave up
            f.set_exception(RuntimeError("read failed"))

    assert _run_collecting_loop_errors(body) == []


def test_the_unguarded_pattern_does_leave_them_behind():
    # The check above can fail: awaiting in turn without consuming the rest logs.
    async def body():
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(3)]
        for f in futs:
            f.set_exception(RuntimeError("read failed"))
        with pytest.raises(RuntimeError):
            [await f for f in futs]

    assert len(_run_collecting_loop_errors(body)) == 2
