"""settle_heap freezes the heap once per process, then only collects.

An unfreeze and full collection on every swap walked TensorFlow's hundreds
of thousands of objects (~150 ms in the ranking process, stalling every
in-flight call); a swap that leaves few tracked objects now collects only
those, which still frees a retired version's reference cycles.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from recsys.serving import settle_heap


class _Node:
    """A container that can be put in a reference cycle and weakly referenced."""

    def __init__(self) -> None:
        self.me = self


def _tracked(obj: object) -> bool:
    """Whether the collector walks ``obj`` (frozen objects are not listed)."""
    return any(o is obj for o in gc.get_objects())


@pytest.fixture
def unfrozen(monkeypatch):
    gc.unfreeze()
    yield monkeypatch
    gc.unfreeze()  # leave the test process as other modules expect it


def test_a_large_heap_is_frozen(unfrozen):
    alive = _Node()
    settle_heap()
    assert gc.get_freeze_count() > 0
    assert not _tracked(alive)


def test_a_small_swap_only_collects(unfrozen):
    settle_heap()
    frozen = gc.get_freeze_count()
    retired = _Node()  # a version loaded after the freeze, then swapped out
    dead = weakref.ref(retired)
    kept = _Node()
    del retired
    settle_heap()
    assert dead() is None  # its cycle was collected without unfreezing
    assert gc.get_freeze_count() == frozen  # nothing unfrozen, nothing newly frozen
    assert _tracked(kept)  # a later version stays with the collector


def test_a_frozen_cycle_stays_frozen(unfrozen):
    early = _Node()  # the first version, alive at the freeze
    dead = weakref.ref(early)
    settle_heap()
    del early
    settle_heap()
    assert dead() is not None  # the documented one-time cost: not walked, not freed
