"""``format_table``: long cells are cut with an ellipsis, short ones kept whole."""

from __future__ import annotations

from recsys.client import Reason, Recommendation, Recommendations, format_table


def _recs(title: str, reason: str) -> Recommendations:
    item = Recommendation(
        item_id="7",
        score=4.25,
        title=title,
        genres=["Comedy"],
        sources=["similar_to_recent"],
        reasons=[Reason("similar_to", "3", reason)],
    )
    return Recommendations(items=[item], model_version="5")


def test_long_cells_end_in_an_ellipsis_at_the_column_width():
    long_reason = "Because you watched " + "A Very Long Film Title Indeed (1999)"
    row = format_table(_recs("T" * 60, long_reason)).splitlines()[2]
    assert "T" * 39 + "…" in row and "T" * 40 not in row
    assert long_reason[:43] + "…" in row and long_reason[:44] not in row


def test_short_cells_are_not_cut():
    table = format_table(_recs("Heat (1995)", "Top in Crime"))
    assert "Heat (1995)" in table and "Top in Crime" in table and "…" not in table
    assert table.splitlines()[-1].startswith("model 5")


def test_a_status_a_newer_server_added_stays_a_number():
    from recsys.client import _status_name
    from recsys.v1 import common_pb2

    assert _status_name(common_pb2.SOURCE_STATUS_OK) == "OK"
    assert _status_name(99) == "99"


def test_debug_fields_get_columns_only_when_present():
    """`recsys recommend --debug` printed the same table as without it."""
    recs = _recs("Heat (1995)", "Top in Crime")
    plain = format_table(recs)
    assert "raw" not in plain.splitlines()[0]
    recs.items[0].debug = {
        "raw_score": 0.8123456,
        "source_scores": {"similar_to_recent": 0.91, "popular": 120.0},
        "sources": ["similar_to_recent", "popular"],
        "model_version": "5",
    }
    lines = format_table(recs).splitlines()
    assert lines[0].split()[-3:] == ["raw", "source", "scores"]
    assert "0.8123" in lines[2] and "similar_to_recent=0.91 popular=120" in lines[2]
