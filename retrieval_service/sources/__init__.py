"""Candidate sources: the plugin interface (:mod:`.base`) and the built-ins."""

from retrieval_service.sources.base import (
    Candidate,
    CandidateSource,
    RedisBatch,
    RedisUnavailable,
    RetrievalContext,
    SourceBase,
    SourceConfig,
)

__all__ = [
    "Candidate",
    "CandidateSource",
    "RedisBatch",
    "RedisUnavailable",
    "RetrievalContext",
    "SourceBase",
    "SourceConfig",
]
