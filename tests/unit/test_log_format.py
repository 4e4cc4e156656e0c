"""The text log format keeps the fields the JSON one carries."""

from __future__ import annotations

import logging
import sys

from recsys.serving import JsonFormatter, TextFormatter


def _record(msg: str, fields: dict | None = None, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("recsys.serving", logging.ERROR, __file__, 1, msg, (), exc_info)
    if fields is not None:
        rec.fields = fields
    return rec


def test_text_lines_carry_the_fields():
    rec = _record("version rejected", {"version": "7", "error": "manifest missing", "n": 3})
    line = TextFormatter().format(rec)
    assert line.endswith(
        "ERROR recsys.serving version rejected version=7 error='manifest missing' n=3"
    )
    assert '"version": "7"' in JsonFormatter().format(rec)


def test_a_field_cannot_fake_a_line_or_another_field():
    line = TextFormatter().format(_record("source failed", {"user": "u\nERROR x=1", "s": "a=b"}))
    assert "\n" not in line
    assert "user='u\\nERROR x=1'" in line and "s='a=b'" in line


def test_a_traceback_stays_below_the_line_with_its_fields():
    out = TextFormatter().format(_record("hydrate failed", {"user": "u1"}, exc=True))
    first, rest = out.split("\n", 1)
    assert first.endswith("hydrate failed user=u1")
    assert "ValueError: boom" in rest


def test_a_line_without_fields_is_unchanged():
    rec = _record("started")
    assert TextFormatter().format(rec) == logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s"
    ).format(rec)
