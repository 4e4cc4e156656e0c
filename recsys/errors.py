"""Exceptions shared across components."""


class UserFacingError(Exception):
    """An error whose message is the whole story (printed without a traceback)."""
