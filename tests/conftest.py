"""Fixtures shared by every test: a real Redis on a free loopback port."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recsys.embedded_redis import EmbeddedRedis

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server child process for the whole session."""
    server = EmbeddedRedis().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of an empty Redis database (flushed before each test)."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """MovieLens 100K from ../shared/data, or skip."""
    path = SHARED_DATA / "ml-100k"
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens 100K not found at {path}")
    return path


@pytest.fixture(scope="session")
def ml_latest_small_dir() -> Path:
    """MovieLens latest-small from ../shared/data, or skip."""
    path = SHARED_DATA / "ml-latest-small"
    if not (path / "ratings.csv").is_file():
        pytest.skip(f"MovieLens latest-small not found at {path}")
    return path
