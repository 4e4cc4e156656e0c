"""Domain errors of the retrieval service; the servicer maps ``code`` to a gRPC status."""

from __future__ import annotations


class RetrievalError(Exception):
    """Base of errors a caller sees; ``code`` names the gRPC status it becomes."""

    code = "INTERNAL"


class InvalidArgument(RetrievalError):
    """A request field is malformed; the message names the field."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(RetrievalError):
    """An id the request names is not in the served catalogue."""

    code = "NOT_FOUND"


class Unavailable(RetrievalError):
    """No model version loaded yet, Redis unreachable, or every source failed.

    Args:
        message: What failed.
        retry: False when an immediate retry would fail the same way (every
            source just failed): the status then tells gRPC clients not to
            retry it, where a replica still loading its version is worth
            another try on the next one.
    """

    code = "UNAVAILABLE"

    def __init__(self, message: str, *, retry: bool = True):
        super().__init__(message)
        self.retry = retry


class FailedPrecondition(RetrievalError):
    """Stored data cannot take the operation (e.g. a corrupt user key); a retry will not help."""

    code = "FAILED_PRECONDITION"


class DeadlineExceeded(RetrievalError):
    """The request's deadline passed before an answer was ready."""

    code = "DEADLINE_EXCEEDED"


class SourceConfigError(ValueError):
    """A ``retrieval.sources`` entry that cannot be used; the message names source and key."""
