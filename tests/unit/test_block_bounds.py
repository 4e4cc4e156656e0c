"""The catalogue bounds check every source's block passes through (``engine._outside``)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_service.engine import _outside


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.intp])
@pytest.mark.parametrize(
    ("rows", "outside"),
    [
        ([], False),
        ([0, 4, 9], False),
        ([9], False),
        ([10], True),
        ([3, -1, 2], True),
        ([-(2**31)], True),
        ([0, 2**31 - 1], True),
    ],
)
def test_rows_outside_the_catalogue_are_caught(rows, outside, dtype):
    arr = np.array(rows, dtype=dtype)
    assert _outside(arr, 10) is outside
    # Same answer on a strided view (a source may hand out a slice).
    spaced = np.repeat(arr, 2)[::2]
    assert _outside(spaced, 10) is outside


def test_the_most_negative_int64_is_caught():
    assert _outside(np.array([0, np.iinfo(np.int64).min], np.int64), 10)
