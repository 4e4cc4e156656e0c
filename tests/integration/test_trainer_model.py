"""Two-tower model, SavedModel export and a real (short) training run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from recsys import artifacts as A
from recsys.artifacts import ArtifactError, ModelVersion
from recsys.features import FeatureSpec

SPEC = FeatureSpec(genres=("a", "b", "c"), countries=("us", "de"), genders=("F", "M"))


def _samples(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    u = rng.normal(3, 2, (n, SPEC.n_user_features)).astype(np.float32)
    i = rng.normal(1990, 20, (n, SPEC.n_item_features)).astype(np.float32)
    return u, i


def test_towers_give_unit_vectors_and_dot_predictions():
    import keras

    from trainer.model import build_two_tower

    # Seeded: with a tiny random tower some row could hit all-dead ReLUs (a zero vector).
    keras.utils.set_random_seed(0)
    u, i = _samples()
    tt = build_two_tower(SPEC, hidden_units=(32, 16), embedding_dim=6, user_sample=u, item_sample=i)
    ue = np.asarray(tt.user_tower(u))
    ie = np.asarray(tt.item_tower(i))
    assert ue.shape == (64, 6) and ie.shape == (64, 6)
    np.testing.assert_allclose(np.linalg.norm(ue, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ie, axis=1), 1.0, atol=1e-5)
    pred = tt.model.predict([u, i], verbose=0)
    assert pred.shape == (64, 1)
    np.testing.assert_allclose(pred[:, 0], np.sum(ue * ie, axis=1), atol=1e-5)
    assert tt.embedding_dim == 6
    with pytest.raises(ValueError, match="objective"):
        build_two_tower(SPEC, objective="ranking")  # type: ignore[arg-type]


def test_binary_head_matches_target_scale():
    from trainer.model import build_two_tower

    u, i = _samples(seed=1)
    y = (np.arange(64) % 2).astype(np.float32)[:, None]
    tt = build_two_tower(
        SPEC, hidden_units=(8,), embedding_dim=4, objective="binary", user_sample=u, item_sample=i
    )
    tt.model.fit([u, i], y, epochs=2, verbose=0)
    target = tt.target_scale(SPEC)
    assert target.objective == "binary" and target.logit_scale != 1.0
    dots = np.sum(np.asarray(tt.user_tower(u)) * np.asarray(tt.item_tower(i)), axis=1)
    np.testing.assert_allclose(
        target.from_model(dots), tt.model.predict([u, i], verbose=0)[:, 0], atol=1e-5
    )


def test_saved_model_equals_keras_tower(tmp_path):
    import tensorflow as tf

    from trainer.export import save_tower
    from trainer.model import build_two_tower

    u, i = _samples(seed=2)
    tt = build_two_tower(SPEC, hidden_units=(16,), embedding_dim=5, user_sample=u, item_sample=i)
    save_tower(tt.user_tower, tmp_path / "user")
    fn = tf.saved_model.load(str(tmp_path / "user")).signatures[A.SIGNATURE]
    assert fn.structured_input_signature[1][A.INPUT_KEY].shape.as_list() == [
        None, SPEC.n_user_features,
    ]  # fmt: skip
    # Raw (unnormalised) features go in: the normalisation is inside the graph.
    out = fn(**{A.INPUT_KEY: tf.constant(u)})[A.OUTPUT_KEY].numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.asarray(tt.user_tower(u)), atol=1e-5)


def test_exported_version_is_complete_and_consistent(trained_version):
    import tensorflow as tf

    mv = ModelVersion.open(trained_version)
    for rel in A.REQUIRED_FILES:
        assert (trained_version / rel).is_file()
    n_users = len(mv.users["user_id"])
    assert mv.user_features.shape == (n_users, mv.spec.n_user_features)
    assert mv.user_aggregates.shape == (n_users, len(A.aggregate_columns(mv.spec)))
    assert mv.item_features.shape == (len(mv.item_ids), mv.spec.n_item_features)
    np.testing.assert_allclose(np.linalg.norm(mv.item_vectors, axis=1), 1.0, atol=1e-5)
    # The item SavedModel reproduces item_vectors.npy (computed by the Keras tower).
    fn = mv.load_tower(A.ITEM_TOWER).signatures[A.SIGNATURE]
    out = fn(**{A.INPUT_KEY: tf.constant(np.asarray(mv.item_features))})[A.OUTPUT_KEY].numpy()
    np.testing.assert_allclose(out, mv.item_vectors, atol=1e-5)
    # Annoy row i is item i: its nearest neighbour is itself.
    index = mv.annoy_index()
    for row in (0, len(mv.item_ids) // 2, len(mv.item_ids) - 1):
        assert index.get_nns_by_item(row, 1)[0] == row
    m = mv.manifest
    assert m["target"]["objective"] == "rating"
    assert m["dataset"]["sha256"] and m["dataset"]["split"]["seed"] == 0
    assert m["annoy"] == {"metric": "angular", "trees": 10, "seed": 0}
    assert m["model"]["hidden_units"] == [64, 32]
    assert not [p for p in trained_version.parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "no_manifest"])
def test_damaged_version_is_refused(trained_version, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(trained_version, broken)
    if damage == "corrupt":
        arr = np.load(broken / A.ITEM_VECTORS, allow_pickle=False)
        arr[0, 0] += 1.0
        np.save(broken / A.ITEM_VECTORS, arr)
        match = "checksum mismatch for item_vectors.npy"
    elif damage == "truncate":
        data = (broken / A.USERS).read_bytes()
        (broken / A.USERS).write_bytes(data[: len(data) // 2])
        match = "users.json has"
    else:
        (broken / A.MANIFEST).unlink()
        match = "no manifest.json"
    with pytest.raises(ArtifactError, match=match):
        ModelVersion.open(broken)


def test_same_seed_same_model_other_seed_differs(trained_version, train_version, tmp_path):
    again = train_version(tmp_path / "a", seed=0)
    other = train_version(tmp_path / "b", seed=1)
    base = ModelVersion.open(trained_version)
    np.testing.assert_array_equal(ModelVersion.open(again).item_vectors, base.item_vectors)
    assert (again / A.TOP_LISTS).read_bytes() == (trained_version / A.TOP_LISTS).read_bytes()
    # The index too, byte for byte: its build threads used to change the trees.
    assert (again / A.ANNOY_INDEX).read_bytes() == (trained_version / A.ANNOY_INDEX).read_bytes()
    assert not np.allclose(ModelVersion.open(other).item_vectors, base.item_vectors)


@pytest.fixture(scope="module")
def evaluated_version(tmp_path_factory):
    from trainer.synthetic import generate
    from trainer.train import TrainConfig, train

    data = generate(600, 400, 30_000, 3, 1)
    cfg = TrainConfig(
        epochs=6, hidden_units=(64, 32), annoy_trees=5, patience=2, data_spec="synthetic:test"
    )
    return train(data, tmp_path_factory.mktemp("eval_models"), cfg, quiet=True)


def test_short_training_run_beats_global_mean(evaluated_version):
    m = evaluated_version.metrics
    assert m["model"]["rmse"] < m["baselines"]["global_mean"]["rmse"]
    assert m["model"]["rmse"] < 1.0
    curve = m["retrieval_curve"]
    assert [c["budget"] for c in curve] == [50, 100, 200, 500, 1000]
    recalls = [c["retrieval_recall"] for c in curve]
    assert recalls == sorted(recalls) and recalls[-1] > recalls[0]
    assert 0 < m["top10"]["model"]["recall@10"] <= 1


def test_report_files_are_checksummed(evaluated_version):
    from trainer.evaluate import format_report

    path = evaluated_version.version_dir
    manifest = json.loads((path / A.MANIFEST).read_text())
    for name in ("metrics.json", "retrieval_curve.png", "baselines.png"):
        assert name in manifest["files"]
        assert (path / name).stat().st_size > 0
    assert (path / "retrieval_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((path / "metrics.json").read_text()) == manifest["metrics"]
    table = format_report(manifest["metrics"])
    assert "user/item bias" in table and f"{manifest['metrics']['model']['rmse']:.4f}" in table


# --- hybrid mode (item id embeddings) --------------------------------------------


def test_hybrid_item_vectors_add_id_offsets_to_the_content_tower():
    import keras

    from trainer.model import build_two_tower

    keras.utils.set_random_seed(0)
    u, i = _samples(seed=3)
    tt = build_two_tower(
        SPEC, hidden_units=(16,), embedding_dim=4, user_sample=u, item_sample=i, n_items=64
    )
    assert tt.hybrid and [x.name for x in tt.model.inputs][-1] == "item_index"
    assert tt.config["id_embeddings"] is True and tt.config["n_items"] == 64
    rows = np.arange(64, dtype=np.int32)
    y = np.linspace(-0.9, 0.9, 64, dtype=np.float32)[:, None]
    tt.model.fit([u, i, rows], y, epochs=3, verbose=0)
    content = np.asarray(tt.item_tower(i))
    known = np.arange(64) % 2 == 0
    vectors = tt.item_vectors(i, known=known)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Items without training ratings keep the content vector; the others moved.
    np.testing.assert_allclose(vectors[~known], content[~known], atol=1e-6)
    assert np.abs(vectors[known] - content[known]).max() > 1e-3
    # The trained model scores with exactly these vectors.
    pred = tt.model.predict([u, i, rows], verbose=0)[:, 0]
    all_known = tt.item_vectors(i)
    np.testing.assert_allclose(pred, np.sum(np.asarray(tt.user_tower(u)) * all_known, 1), atol=1e-5)
    with pytest.raises(ValueError, match="catalogue has 63"):
        tt.item_vectors(i[:63])


@pytest.fixture(scope="module")
def hybrid_pair(tmp_path_factory):
    """Content-only and hybrid versions trained identically on the same synthetic data."""
    from trainer.synthetic import generate
    from trainer.train import TrainConfig, train

    data = generate(600, 400, 40_000, 3, 2)
    out = {}
    for hybrid in (False, True):
        cfg = TrainConfig(
            epochs=8, hidden_units=(64, 32), annoy_trees=5, patience=2, dropout=0.1,
            id_embeddings=hybrid, data_spec="synthetic:users=600,items=400,ratings=40000,"
            "countries=3,seed=2",
        )  # fmt: skip
        out[hybrid] = train(data, tmp_path_factory.mktemp("hybrid"), cfg, plots=False, quiet=True)
    return out


def test_hybrid_version_keeps_the_serving_contract(hybrid_pair):
    import tensorflow as tf

    path = hybrid_pair[True].version_dir
    mv = ModelVersion.open(path)
    assert mv.manifest["model"]["id_embeddings"] is True
    assert mv.manifest["training"]["id_embeddings"] is True
    user = mv.load_tower(A.USER_TOWER).signatures[A.SIGNATURE]
    got = user(**{A.INPUT_KEY: tf.constant(np.asarray(mv.user_features[:5]))})[A.OUTPUT_KEY]
    assert got.shape == (5, mv.dim)
    np.testing.assert_allclose(np.linalg.norm(mv.item_vectors, axis=1), 1.0, atol=1e-5)
    # The item SavedModel is the content tower (what a new item gets): rated catalogue
    # items differ from it by their id offsets, unrated ones do not.
    item = mv.load_tower(A.ITEM_TOWER).signatures[A.SIGNATURE]
    content = item(**{A.INPUT_KEY: tf.constant(np.asarray(mv.item_features))})[A.OUTPUT_KEY]
    rated = np.asarray(mv.item_features)[:, mv.spec.item_feature_names.index("log_rating_count")]
    gap = np.abs(content.numpy() - mv.item_vectors).max(axis=1)
    assert gap[rated > 0].max() > 1e-3
    np.testing.assert_allclose(gap[rated == 0], 0.0, atol=1e-5)
    assert mv.annoy_index().get_nns_by_item(0, 1)[0] == 0


def test_hybrid_beats_content_only_on_synthetic_data(hybrid_pair):
    # Synthetic items have latent tastes beyond their genres, which only an id can learn.
    content = hybrid_pair[False].metrics["model"]["rmse"]
    hybrid = hybrid_pair[True].metrics["model"]["rmse"]
    assert hybrid < content - 0.003, (hybrid, content)


def test_bad_plateau_factor_is_refused_before_training():
    from trainer.prepare import prepare
    from trainer.synthetic import generate
    from trainer.train import TrainConfig, fit

    data = generate(50, 40, 1_000, 2, 0)
    train_rows, test_rows = data.split(0.2, 0)
    with pytest.raises(ValueError, match="lr_plateau_factor"):
        fit(prepare(data, train_rows, test_rows), TrainConfig(lr_plateau_factor=1.5), quiet=True)


@pytest.fixture(scope="module")
def binary_pair(tmp_path_factory):
    """The same binary model trained on ratings alone and with 4 sampled negatives per rating."""
    from trainer.synthetic import generate
    from trainer.train import TrainConfig, train

    data = generate(600, 400, 30_000, 3, 1)
    out = {}
    for negatives in (0, 4):
        cfg = TrainConfig(objective="binary", negatives=negatives, epochs=6, hidden_units=(64, 32),
                          annoy_trees=5, patience=2, data_spec="synthetic:test")  # fmt: skip
        out[negatives] = train(data, tmp_path_factory.mktemp(f"neg{negatives}"), cfg, quiet=True)
    return out


def test_sampled_negatives_teach_the_model_what_users_pick(binary_pair):
    # Rated pairs alone say how a watched item is liked, not which items get
    # watched: top-10 over the whole catalogue is where negatives help.
    alone = binary_pair[0].metrics["top10"]["model"]["recall@10"]
    sampled = binary_pair[4].metrics["top10"]["model"]["recall@10"]
    assert sampled > 1.5 * alone, (sampled, alone)
    manifest = json.loads((binary_pair[4].version_dir / "manifest.json").read_text())
    assert manifest["training"]["negatives"] == 4
    assert binary_pair[4].metrics["negatives"] == 4 and binary_pair[0].metrics["negatives"] == 0


def test_negatives_need_the_binary_objective():
    from trainer.prepare import prepare
    from trainer.synthetic import generate
    from trainer.train import TrainConfig, fit

    data = generate(50, 40, 1_000, 2, 0)
    train_rows, test_rows = data.split(0.2, 0)
    with pytest.raises(ValueError, match="binary objective"):
        fit(prepare(data, train_rows, test_rows), TrainConfig(negatives=2), quiet=True)


def test_a_column_constant_in_training_does_not_swamp_the_tower():
    """age_missing was 0 for every training user; a 1 at serving became 1e7 after scaling."""
    import keras

    from trainer.model import build_two_tower, normalization_moments

    keras.utils.set_random_seed(0)
    u, i = _samples()
    u[:, 0] = 0.0  # never varies in training
    mean, variance = normalization_moments(u)
    np.testing.assert_allclose(mean, u.astype(np.float64).mean(axis=0))
    np.testing.assert_allclose(variance[1:], u[:, 1:].astype(np.float64).var(axis=0))
    assert variance[0] >= 1e12
    tt = build_two_tower(SPEC, hidden_units=(32, 16), embedding_dim=6, user_sample=u, item_sample=i)
    a, b = u[:2].copy(), u[:2].copy()
    b[:, 0] = 1.0  # the never-seen value
    ea, eb = np.asarray(tt.user_tower(a)), np.asarray(tt.user_tower(b))
    # The other features still decide: the two users stay apart, each as before.
    np.testing.assert_allclose(ea, eb, atol=1e-4)
    assert abs(float(ea[0] @ ea[1])) < 0.999


def test_a_numbered_directory_must_hold_that_version(trained_version, tmp_path):
    """models/5 holding version 1 was served as 5 while reading version 1's top lists."""
    copy = tmp_path / "5"
    shutil.copytree(trained_version, copy)
    with pytest.raises(A.ArtifactError, match=r"version 5 but its manifest says version '1'"):
        A.ModelVersion.open(copy)
    named = tmp_path / "candidate"  # not a number: any name may hold a version
    shutil.copytree(trained_version, named)
    assert A.ModelVersion.open(named).version == trained_version.name
