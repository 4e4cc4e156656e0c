"""Prometheus metrics of the ranking service (per-RPC latency lives in the interceptor)."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

BATCH_SIZE = Histogram(
    "recsys_ranking_batch_size",
    "Requests coalesced into one user-tower call.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
RETRIEVAL_BATCH_SIZE = Histogram(
    "recsys_ranking_retrieval_batch_size",
    "Recommend requests sent to retrieval in one call (1: a plain Retrieve).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_CANDIDATES = Histogram(
    "recsys_ranking_batch_candidates",
    "Candidates scored in one batched gather/dot.",
    buckets=(10, 100, 1_000, 10_000, 50_000, 100_000, 500_000),
)
# Gauges say how several workers' values combine (recsys.serving.run_service).
DEVICE = Gauge(
    "recsys_ranking_device_info",
    "Where item vectors live (value 1).",
    ["device"],
    multiprocess_mode="livemax",
)
UNKNOWN_IDS = Counter(
    "recsys_ranking_unknown_ids_total", "Candidate ids the serving version does not know."
)
WATCHED_DROPPED = Counter(
    "recsys_ranking_watched_dropped_total", "Candidates dropped as watched or excluded."
)
USER_FEATURES = Counter(
    "recsys_ranking_user_features_total",
    "Where each request's user features came from.",
    ["source", "variant"],
)
USER_STATE_READS = Counter(
    "recsys_ranking_user_state_reads_total",
    "How Recommend got the user's stored state: passed on by retrieval, or read"
    " here (retrieval could not read it, or it did not fit the model's genres).",
    ["origin"],
)
# Looked up once: labels() takes a lock and hashes on every call.
STATE_FROM_RETRIEVAL = USER_STATE_READS.labels("retrieval")
STATE_READ_HERE = USER_STATE_READS.labels("redis")
REDIS_ERRORS = Counter(
    "recsys_ranking_redis_errors_total", "User reads that failed and fell back to defaults."
)
RETRIEVAL_FALLBACK = Counter(
    "recsys_ranking_retrieval_fallback_total",
    "Recommend calls answered from the popular list.",
    ["reason", "variant"],
)
MODEL_LOAD_SECONDS = Gauge(
    "recsys_ranking_model_load_seconds",
    "Time to open, verify, load and warm the version (the slowest worker's).",
    multiprocess_mode="livemax",
)
CATALOGUE_ITEMS = Gauge(
    "recsys_ranking_catalogue_items",
    "Items in the serving version (the newest load among workers).",
    multiprocess_mode="livemostrecent",
)


@functools.cache
def user_features(source: str, variant: str) -> Any:
    """The ``USER_FEATURES`` child for one source and variant.

    Cached like retrieval's ``source_children``: ``labels()`` hashes and locks
    on every call, and both labels come from a small set (feature sources,
    configured variants).
    """
    return USER_FEATURES.labels(source, variant)
