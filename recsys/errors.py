"""Exceptions shared across components, and how a repeated one is logged."""

from __future__ import annotations

import logging
import math
import time


class UserFacingError(Exception):
    """An error whose message is the whole story (printed without a traceback)."""


# Longest slice of a caller's value repeated in an error message: the message
# travels in a gRPC trailer (16 KiB limit), so echoing an oversized value in
# full would turn INVALID_ARGUMENT into RESOURCE_EXHAUSTED.
SHOWN_CHARS = 64


def shown(value: str) -> str:
    """``repr(value)``, cut to about :data:`SHOWN_CHARS` characters for an error message."""
    if len(value) <= SHOWN_CHARS:
        return repr(value)
    return f"{value[:SHOWN_CHARS]!r}… ({len(value)} characters)"


def describe_error(exc: BaseException, *, waited: str = "") -> str:
    """An exception as a log or error phrase: ``Type: message``, or ``Type`` alone.

    ``str()`` of an exception raised without a message is empty: asyncio's
    ``TimeoutError`` above all, which is how every bounded Redis call fails
    when Redis stalls, so a warning read "features:  (1 since last report)".

    Args:
        exc: The exception.
        waited: What bounded the wait (e.g. ``"250 ms"``): a
            ``TimeoutError`` without a message reads ``TimeoutError: no reply
            within <waited>``.
    """
    name = type(exc).__name__
    text = str(exc)
    if not text and waited and isinstance(exc, TimeoutError):
        text = f"no reply within {waited}"
    return f"{name}: {text}" if text else name


class ThrottledWarning:
    """Logs a failure that every request repeats (Redis down) once per interval, with a count.

    Args:
        logger: Where the warning goes.
        message: Its text; ``%s`` is the latest error (an exception as
            :func:`describe_error` puts it), ``%d`` the failures since the last line.
        every_s: Least time between two lines.
    """

    def __init__(self, logger: logging.Logger, message: str, every_s: float = 10.0):
        self.logger, self.message, self.every_s = logger, message, every_s
        self._last = -math.inf
        self._count = 0

    def __call__(self, exc: BaseException | str, fields: dict[str, object] | None = None) -> None:
        """Counts one failure; logs it (with ``fields``, if any) when the interval has passed."""
        self._count += 1
        now = time.monotonic()
        if now - self._last >= self.every_s:
            extra = {"fields": fields} if fields else None
            text = describe_error(exc) if isinstance(exc, BaseException) else exc
            self.logger.warning(self.message, text, self._count, extra=extra)
            self._last, self._count = now, 0
