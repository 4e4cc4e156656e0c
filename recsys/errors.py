"""Exceptions shared across components."""


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
