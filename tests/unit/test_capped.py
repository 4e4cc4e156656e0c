"""CappedDict: a bounded memo that starts over instead of freezing when full."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsys.capped import CappedDict


def test_a_full_memo_starts_over_with_the_new_key():
    memo: CappedDict[str, int] = CappedDict(2)
    memo.put("a", 1)
    memo.put("b", 2)
    memo.put("a", 3)  # a key already there is replaced, nothing dropped
    assert memo == {"a": 3, "b": 2}
    memo.put("c", 4)
    assert memo == {"c": 4}


def test_the_cap_must_hold_something():
    with pytest.raises(ValueError, match="cap"):
        CappedDict(0)


@given(st.integers(1, 8), st.lists(st.integers(0, 20), max_size=200))
def test_never_more_than_the_cap_and_the_last_put_is_always_there(cap, keys):
    memo: CappedDict[int, int] = CappedDict(cap)
    for n, key in enumerate(keys):
        memo.put(key, n)
        assert len(memo) <= cap
        assert memo[key] == n
