"""bench.soak's pure parts: how the measured time is cut into intervals."""

import pytest

from bench.soak import intervals, main


@pytest.mark.parametrize(
    ("duration", "count"), [(7, 4), (10, 4), (30, 6), (60, 12), (65, 6), (95, 10), (300, 30)]
)
def test_the_intervals_add_up_to_the_duration_asked_for(duration, count):
    interval, n = intervals(duration)
    # --duration 10 measured 4 intervals of 5 s (20 s), 95 measured 100 s.
    assert n == count and interval * n == pytest.approx(duration)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--duration", "0"),
        ("--duration", "-5"),
        ("--duration", "nan"),
        ("--duration", "inf"),
        ("--rate", "0"),
        ("--rate", "nan"),
    ],
)
def test_a_duration_or_rate_that_is_no_positive_number_is_refused(capsys, flag, value):
    """nan and inf passed the check and ended in a traceback from round()."""
    with pytest.raises(SystemExit) as exc:
        main([flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{flag} must be a number" in err and value in err
