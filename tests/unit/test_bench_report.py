"""How the bench's Markdown report writes numbers."""

from __future__ import annotations

import math

import pytest

from bench.common import _fmt


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0123456, "0.01235"),
        (999.94, "999.9"),
        (36980.0, "36,980.0"),
        (99999.0, "99,999.0"),
        (100000.0, "100,000"),
        (-12345.67, "-12,345.7"),
        (math.nan, "n/a"),
        (None, "n/a"),
        (7, "7"),
    ],
)
def test_numbers_are_written_without_exponents(value, text):
    """``.4g`` wrote 36,980 as ``3.698e+04`` in the committed reports."""
    assert _fmt(value) == text
