"""A cold-start genre is valid when any served model knows it, whatever the caller's arm.

Checked against the arm's own model, the same request was INVALID_ARGUMENT in one
arm and answered in another when the versions' genre lists differ."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis

from recsys.config import ExperimentSettings, RetrievalSettings
from recsys.experiments import Experiment


def _train(model_dir: Path, genres) -> Path:
    from trainer.synthetic import generate
    from trainer.train import TrainConfig, train

    data = generate(300, 250, 15_000, 3, 0, genres=genres)
    cfg = TrainConfig(seed=0, epochs=1, hidden_units=(64, 32), annoy_trees=10, patience=0)
    return train(data, model_dir, cfg, evaluate=False, quiet=True).version_dir


async def test_genre_validity_does_not_depend_on_the_arm(tmp_path: Path, redis_url: str):
    from retrieval_service.engine import RequestFeatures, RetrievalEngine, RetrieveQuery
    from retrieval_service.registry import build_sources

    v1 = _train(tmp_path, 20)  # the 18 default genres + Genre19, Genre20
    v2 = _train(tmp_path, None)  # the 18 default genres
    assert (v1.name, v2.name) == ("1", "2")
    exp = Experiment(
        ExperimentSettings(
            name="t",
            variants=[
                {"name": "control", "share": 0.5},
                {"name": "pinned", "share": 0.5, "model_version": "1"},
            ],
        )
    )
    rs = RetrievalSettings()
    client = aioredis.Redis.from_url(redis_url)
    try:
        eng = RetrievalEngine(rs, build_sources(rs.sources), client, experiment=exp)
        eng.swap(await asyncio.to_thread(eng.load_version, v2))
        eng.swap(await asyncio.to_thread(eng.load_version, v1), "1")
        outcome = {}
        for arm in ("control", "pinned"):
            q = RetrieveQuery(
                "cold-user",
                features=RequestFeatures(genre_ratings={"Genre19": 5.0}),
                variant=arm,
            )
            try:
                await eng.retrieve(q, timeout_s=2.0)
                outcome[arm] = "OK"
            except Exception as exc:
                outcome[arm] = f"{type(exc).__name__}: {exc}"[:90]
    finally:
        await client.aclose()
    assert outcome["control"] == outcome["pinned"], outcome
