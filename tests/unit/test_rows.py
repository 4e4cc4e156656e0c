import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.rows import RowMarks


@settings(deadline=None)
@given(
    rows=st.lists(st.integers(0, 29), max_size=80),
    members=st.lists(st.integers(0, 29), max_size=20),
)
def test_row_marks_match_unique_and_isin(rows, members):
    marks = RowMarks(30)
    arr = np.asarray(rows, np.int64)
    firsts = [r for i, r in enumerate(rows) if r not in rows[:i]]
    for _ in range(2):  # a second round must not see the first one's leftovers
        assert arr[marks.first(arr)].tolist() == firsts
        g = marks.mark(0, np.asarray(members, np.int64))
        assert marks.has(0, g, arr).tolist() == [r in members for r in rows]
