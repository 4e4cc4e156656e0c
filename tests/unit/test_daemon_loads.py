"""Version loads run in daemon threads: a process stopping mid-load exits at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from recsys.serving import in_daemon_thread


async def test_it_returns_the_result_and_raises_the_error_in_a_daemon_thread():
    seen = []

    def work(x, *, y):
        seen.append(threading.current_thread().daemon)
        return x + y

    assert await in_daemon_thread(work, 2, y=3) == 5 and seen == [True]
    with pytest.raises(ZeroDivisionError):
        await in_daemon_thread(lambda: 1 / 0)


@pytest.mark.parametrize("runner", ["in_daemon_thread", "asyncio.to_thread"])
def test_a_process_stopping_during_a_load_exits_without_waiting_for_it(runner):
    """With to_thread, asyncio.run (and the interpreter) waited for the load to end."""
    code = textwrap.dedent(f"""
        import asyncio, time
        from recsys.serving import in_daemon_thread

        async def main():
            load = asyncio.ensure_future({runner}(time.sleep, 8))  # a slow version load
            await asyncio.sleep(0.3)
            load.cancel()  # the watcher cancelled at SIGTERM

        asyncio.run(main())
        print("exited", flush=True)
    """)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    took = time.monotonic() - start
    if runner == "asyncio.to_thread":
        # The old way, kept as the control: it does wait out the load.
        assert took >= 7.5, took
        return
    assert proc.returncode == 0 and "exited" in proc.stdout, proc.stderr
    assert took < 6, took


async def test_a_result_after_the_await_was_cancelled_is_dropped_quietly():
    gate = threading.Event()
    task = asyncio.ensure_future(in_daemon_thread(gate.wait, 5))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    await asyncio.sleep(0.05)  # the thread's settle call finds the future cancelled
