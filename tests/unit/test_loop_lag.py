"""The event-loop lag probe: a blocked loop shows up in the histogram, an idle one does not."""

import asyncio
import time

from prometheus_client import REGISTRY

from recsys.serving import watch_loop_lag


def _sample(service: str, suffix: str, le: str | None = None) -> float:
    labels = {"service": service} if le is None else {"service": service, "le": le}
    return REGISTRY.get_sample_value(f"recsys_event_loop_lag_seconds{suffix}", labels) or 0.0


async def test_a_blocked_loop_is_recorded_as_lag():
    probe = asyncio.ensure_future(watch_loop_lag("lag_test_blocked", interval_s=0.01))
    await asyncio.sleep(0.05)
    time.sleep(0.15)  # holds the loop, as a long inline batch would
    await asyncio.sleep(0.05)
    probe.cancel()
    count = _sample("lag_test_blocked", "_count")
    assert count >= 3
    # The timer due during the block fired ~0.14 s late: one observation above 0.1 s.
    assert count - _sample("lag_test_blocked", "_bucket", "0.1") >= 1
    assert _sample("lag_test_blocked", "_sum") >= 0.1


async def test_an_idle_loop_has_little_lag():
    probe = asyncio.ensure_future(watch_loop_lag("lag_test_idle", interval_s=0.01))
    await asyncio.sleep(0.2)
    probe.cancel()
    count = _sample("lag_test_idle", "_count")
    assert count >= 5
    # Generous for a shared CI machine; a blocked loop is 0.1 s and more.
    assert _sample("lag_test_idle", "_bucket", "0.05") == count
