"""Prometheus metrics of the retrieval service (RPC latency lives in recsys.serving)."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import Counter, Histogram

_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

SOURCE_LATENCY = Histogram(
    "recsys_retrieval_source_latency_seconds",
    "Wall time of one candidate source in one Retrieve call.",
    ["source", "variant"],
    buckets=_FAST,
)
SOURCE_CANDIDATES = Histogram(
    "recsys_retrieval_source_candidates",
    "Candidates a source returned before merging and filtering.",
    ["source", "variant"],
    buckets=(0, 1, 5, 10, 25, 50, 100, 200, 500, 1000, 2000),
)
SOURCE_STATUS = Counter(
    "recsys_retrieval_source_total", "Source runs by outcome.", ["source", "status", "variant"]
)
HYDRATE_LATENCY = Histogram(
    "recsys_retrieval_hydrate_latency_seconds",
    "Time to load the user's state from Redis (one pipelined round trip).",
    buckets=_FAST,
)
HYDRATE_FAILURES = Counter(
    "recsys_retrieval_hydrate_failures_total",
    "Hydrations that fell back to an empty user (Redis unreachable or slow, or a corrupt hash).",
)
HYDRATE_CUT_SHORT = Counter(
    "recsys_retrieval_hydrate_cut_short_total",
    "Hydrations abandoned because the request's deadline left too little time for Redis "
    "(under 50 ms of waiting; a longer wait counts as a hydrate failure).",
)
REDIS_ROUND_TRIPS = Histogram(
    "recsys_retrieval_redis_round_trips",
    "Redis round trips per Retrieve call.",
    buckets=(0, 1, 2, 3, 4, 6, 8),
)
RETURNED = Histogram(
    "recsys_retrieval_candidates_returned",
    "Candidates returned per Retrieve call.",
    buckets=(0, 10, 50, 100, 200, 500, 1000, 2000, 5000),
)


@functools.cache
def source_children(source: str, variant: str) -> tuple[Any, Any]:
    """(latency, candidates) histogram children of one source and variant.

    ``labels()`` hashes the values and takes a lock on every call; label
    values here come from config (source names, variants), so the set is
    bounded and each child is looked up once per process.
    """
    return SOURCE_LATENCY.labels(source, variant), SOURCE_CANDIDATES.labels(source, variant)


@functools.cache
def source_status(source: str, status: str, variant: str) -> Any:
    """The status counter child of one source, status and variant (cached, see above)."""
    return SOURCE_STATUS.labels(source, status, variant)
