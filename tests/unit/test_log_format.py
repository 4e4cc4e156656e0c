"""The text log format keeps the fields the JSON one carries."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Callable

import pytest

from recsys.config import RecsysSettings
from recsys.serving import JsonFormatter, TextFormatter, WorkerSlot, configure_logging


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


def _json_logging(capsys: pytest.CaptureFixture[str]) -> Callable[[], list[str]]:
    """``configure_logging`` in JSON; returns a function giving the lines written so far.

    Called in the test itself: the handler keeps the ``sys.stderr`` of that
    moment, and the one capsys gives a fixture is closed before the test runs.
    """
    configure_logging(RecsysSettings(log_format="json"))
    return lambda: capsys.readouterr().err.splitlines()


def test_a_library_warning_is_a_json_line(capsys):
    """A warning printed as is put a non-JSON line in the stream a log pipeline parses."""
    lines = _json_logging(capsys)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("something is deprecated", UserWarning, stacklevel=1)
    [line] = lines()
    doc = json.loads(line)
    assert doc["logger"] == "py.warnings" and "something is deprecated" in doc["msg"]


def test_a_worker_tags_each_record_with_its_index_and_pid(capsys):
    lines = _json_logging(capsys)
    WorkerSlot(index=1, count=2, port=50051, notify_fd=-1).tag_logs()
    logging.getLogger("recsys.test").warning("plain")
    logging.getLogger("recsys.test").warning("with fields", extra={"fields": {"version": "7"}})
    docs = [json.loads(line) for line in lines()]
    pid = os.getpid()
    assert [(d["msg"], d.get("version"), d["worker"], d["pid"]) for d in docs] == [
        ("plain", None, 1, pid),
        ("with fields", "7", 1, pid),
    ]
