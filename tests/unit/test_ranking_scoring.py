import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ranking_service.model import (
    HostVectors,
    LoadedModel,
    ScoreRequest,
    TensorVectors,
    resolve_device,
    score_batch,
    top_k,
    top_k_segments,
)
from ranking_service.testing import embed, write_synthetic_version
from recsys.artifacts import USER_TOWER, ArtifactError
from recsys.errors import UserFacingError


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory):
    return write_synthetic_version(tmp_path_factory.mktemp("models"), n_items=300, dim=8)


@pytest.fixture(scope="module")
def model(version_dir):
    return LoadedModel.load(version_dir, "cpu")


@settings(deadline=None)  # timing-free: the machine is shared
@given(
    dots=arrays(np.float32, st.integers(0, 60), elements=st.floats(-1, 1, width=32)),
    k=st.integers(0, 80),
)
def test_top_k_matches_a_full_stable_sort(dots, k):
    expected = np.argsort(-dots, kind="stable")[:k]
    assert top_k(dots, k).tolist() == expected.tolist()


@settings(deadline=None)
@given(
    segments=st.lists(
        st.tuples(
            # Few distinct values: ties at the cut are the common case.
            st.lists(st.sampled_from([-1.0, -0.0, 0.0, 0.25, 0.5, 3.0]), max_size=40),
            st.integers(-2, 45),
        ),
        max_size=6,
    )
)
def test_top_k_segments_match_a_stable_sort_of_each_segment(segments):
    dots = np.asarray([v for values, _ in segments for v in values], np.float32)
    bounds = np.cumsum([0, *(len(values) for values, _ in segments)]).astype(np.int64)
    ks = np.asarray([k for _, k in segments], np.int64)
    picked, out_bounds = top_k_segments(dots, bounds, ks)
    assert out_bounds.shape == (len(segments) + 1,)
    for j, (values, k) in enumerate(segments):
        mine = picked[out_bounds[j] : out_bounds[j + 1]] - bounds[j]
        expected = np.argsort(-np.asarray(values, np.float32), kind="stable")[: max(k, 0)]
        assert mine.tolist() == expected.tolist()


def test_top_k_breaks_ties_by_position():
    assert top_k(np.array([0.5, 0.9, 0.5, 0.9, 0.1], np.float32), 3).tolist() == [1, 3, 0]


def _user_vectors(version_dir, feats):
    return embed(version_dir / USER_TOWER, np.asarray(feats, np.float32))


def test_batch_scores_equal_one_request_at_a_time(model, version_dir):
    rng = np.random.default_rng(1)
    spec = model.version.spec
    requests = []
    for n, k in ((300, 10), (1, 5), (57, 57), (120, 200)):
        feats = rng.normal(0, 3, spec.n_user_features).astype(np.float32)
        rows = rng.choice(300, size=n, replace=False).astype(np.int64)
        requests.append(ScoreRequest(model, feats, rows, k))
    results = score_batch(requests)
    vectors = np.asarray(model.version.item_vectors)
    users = _user_vectors(version_dir, np.stack([r.features for r in requests]))
    for req, res, u in zip(requests, results, users, strict=True):
        full = vectors[req.rows] @ u
        pos = {int(r): j for j, r in enumerate(req.rows)}
        assert len(res.rows) == min(req.k, len(req.rows))
        assert len(set(res.rows.tolist())) == len(res.rows)
        # Each returned dot is that row's own score, and they are the k best.
        np.testing.assert_allclose(res.dots, full[[pos[r] for r in res.rows.tolist()]], atol=1e-5)
        np.testing.assert_allclose(res.dots, np.sort(full)[::-1][: req.k], atol=1e-5)
        assert np.all(np.diff(res.dots) <= 0)
    # Different users really got different answers (the batch did not share one user).
    assert not np.allclose(users[0], users[1])


def test_requests_of_two_versions_in_one_batch_use_their_own(model, tmp_path):
    other_dir = write_synthetic_version(tmp_path, n_items=300, dim=8, seed=7)
    other = LoadedModel.load(other_dir, "cpu")
    feats = model.default_features
    rows = np.arange(50, dtype=np.int64)
    a, b = score_batch([ScoreRequest(model, feats, rows, 5), ScoreRequest(other, feats, rows, 5)])
    (a_alone,) = score_batch([ScoreRequest(model, feats, rows, 5)])
    (b_alone,) = score_batch([ScoreRequest(other, feats, rows, 5)])
    np.testing.assert_array_equal(a.dots, a_alone.dots)
    np.testing.assert_array_equal(b.dots, b_alone.dots)
    assert not np.allclose(a.dots, b.dots)


def test_tensor_vectors_agree_with_host_vectors(model):
    rng = np.random.default_rng(2)
    vec = np.asarray(model.version.item_vectors)
    users = rng.normal(size=(3, vec.shape[1])).astype(np.float32)
    rows = rng.integers(0, vec.shape[0], 40).astype(np.int64)
    seg = np.repeat(np.arange(3, dtype=np.int64), [10, 25, 5])
    host = HostVectors(vec).dots(users, rows, seg)
    dev = TensorVectors(vec, "/CPU:0").dots(users, rows, seg)
    np.testing.assert_allclose(host, dev, atol=1e-6)
    np.testing.assert_allclose(host[:10], vec[rows[:10]] @ users[0], atol=1e-6)


def test_host_vector_dots_equal_brute_force_in_any_row_order(model):
    """Grouped rows take one matrix-vector product per user; any other order the general path."""
    rng = np.random.default_rng(3)
    vec = model.vectors.vectors
    users = rng.normal(size=(4, vec.shape[1])).astype(np.float32)
    rows = rng.integers(0, vec.shape[0], 60).astype(np.int64)
    grouped = np.repeat(np.array([0, 2, 3], np.int64), [25, 1, 34])  # user 1 has no rows
    mixed = rng.permutation(grouped)
    for seg in (grouped, mixed, np.zeros(60, np.int64)):
        want = np.array([np.dot(vec[r], users[u]) for r, u in zip(rows, seg, strict=True)])
        got = model.vectors.dots(users, rows, seg)
        assert got.dtype == np.float32 and got.shape == (60,)
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert model.vectors.dots(users, rows[:0], grouped[:0]).shape == (0,)


def test_host_vectors_stay_memory_mapped(model):
    assert isinstance(model.vectors, HostVectors)
    assert isinstance(model.vectors.vectors, np.memmap)


def test_load_rejects_a_corrupt_version(version_dir, tmp_path):
    bad = tmp_path / "bad-copy"
    shutil.copytree(version_dir, bad)
    vec = bad / "item_vectors.npy"
    data = bytearray(vec.read_bytes())
    data[-1] ^= 0xFF
    vec.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        LoadedModel.load(bad, "cpu")


def test_popular_rows_and_metadata(model):
    popular = model.version.top_lists["popular"]
    assert model.popular_rows.tolist()[:5] == [int(p[0][1:]) for p in popular[:5]]
    assert model.title(3) == "Item 3"
    assert list(model.genres(3)) == model.version.item_genre_names(3)


def test_device_resolution():
    import tensorflow as tf

    assert resolve_device("cpu") == "cpu"
    if tf.config.list_physical_devices("GPU"):
        assert resolve_device("auto") == "gpu"
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(UserFacingError, match="no GPU"):
            resolve_device("gpu")


def test_serving_on_a_gpu_turns_tf32_off(monkeypatch):
    """TF32 (TensorFlow's default on Ampere+) put ~1e-3 into the user vector on GPU
    replicas only. No GPU here: TensorFlow's device list is made to show one."""
    import tensorflow as tf

    before = tf.config.experimental.tensor_float_32_execution_enabled()
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"])
    try:
        tf.config.experimental.enable_tensor_float_32_execution(True)
        assert resolve_device("cpu") == "cpu"
        assert tf.config.experimental.tensor_float_32_execution_enabled()
        assert resolve_device("gpu") == "gpu"
        assert not tf.config.experimental.tensor_float_32_execution_enabled()
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(before)


def test_the_frozen_session_tower_reproduces_the_signature(model, version_dir):
    assert model.runtime == "session" and model.session_tower is not None
    feats = np.random.default_rng(5).normal(0, 2, (33, model.version.spec.n_user_features))
    feats = feats.astype(np.float32)
    expected = _user_vectors(version_dir, feats)
    np.testing.assert_allclose(model.embed(feats), expected, atol=1e-6)
    # The eager path stays available and agrees.
    eager = LoadedModel.load(version_dir, "cpu", runtime="eager")
    assert eager.runtime == "eager" and eager.session_tower is None
    np.testing.assert_allclose(eager.embed(feats), expected, atol=1e-6)


def test_a_frozen_tower_that_disagrees_falls_back_to_eager(version_dir, monkeypatch, caplog):
    import ranking_service.model as model_module

    # Any real gap exceeds a negative tolerance: the check must reject the freeze.
    monkeypatch.setattr(model_module, "FROZEN_TOLERANCE", -1.0)
    loaded = LoadedModel.load(version_dir, "cpu")
    assert loaded.runtime == "eager" and loaded.session_tower is None
    assert "calling it eagerly" in caplog.text


@settings(deadline=None)
@given(
    n=st.integers(65, 3000),
    k=st.integers(65, 1200),
    distinct=st.sampled_from([3, 50, 100_000]),
    rising=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_large_top_k_matches_a_full_stable_sort(n, k, distinct, rising, seed):
    """Past INSERTION_MAX_K the segment is sorted rather than inserted into."""
    dots = np.random.default_rng(seed).integers(0, distinct, n).astype(np.float32) / distinct
    if rising:
        dots.sort()  # every candidate gets in: the insertion's worst case
    bounds = np.asarray([0, n // 3, n], np.int64)
    ks = np.asarray([k, k], np.int64)
    picked, out_bounds = top_k_segments(dots, bounds, ks)
    for j in range(2):
        seg = dots[bounds[j] : bounds[j + 1]]
        expected = np.argsort(-seg, kind="stable")[:k]
        mine = picked[out_bounds[j] : out_bounds[j + 1]] - bounds[j]
        assert mine.tolist() == expected.tolist()


def test_the_popular_scores_by_row_are_built_once_per_model(model):
    """Every popular fallback rebuilt this dict (~60 µs), all through a retrieval outage."""
    scores = model.popular_score_of
    assert scores is model.popular_score_of
    rows, values = model.popular_rows.tolist(), model.popular_scores.tolist()
    assert scores == dict(zip(rows, values, strict=True))
    assert len(scores) == len(model.popular_rows) > 0
