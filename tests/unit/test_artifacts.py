"""The artifact reader refuses every kind of broken version with a named reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from annoy import AnnoyIndex

from recsys import artifacts as A
from recsys.features import FeatureSpec, TargetScale

SPEC = FeatureSpec(genres=("Action", "Comedy"), countries=("us",))


def _write_version(
    model_dir: Path,
    n_items: int = 5,
    annoy_items: int | None = None,
    *,
    bad_row: int | None = None,
    target: dict | None = None,
) -> Path:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(n_items, 4)).astype(np.float32)
    with A.VersionWriter(model_dir) as w:
        for tower in (A.USER_TOWER, A.ITEM_TOWER):
            (w.path / tower).mkdir()
            (w.path / tower / "saved_model.pb").write_bytes(b"not really a graph")
        w.write_json(A.ITEM_IDS, [f"i{k}" for k in range(n_items)])
        written = vecs.copy()
        if bad_row is not None:
            written[bad_row, 1] = np.nan
        w.write_npy(A.ITEM_VECTORS, written)
        w.write_npy(A.ITEM_GENRES, np.zeros((n_items, 2), np.uint8))
        w.write_npy(A.ITEM_FEATURES, np.zeros((n_items, SPEC.n_item_features), np.float32))
        w.write_json(A.ITEMS_META, {"title": ["t"] * n_items, "year": [2000] * n_items})
        index = AnnoyIndex(4, "angular")
        for k in range(annoy_items or n_items):
            index.add_item(k, vecs[k % n_items])
        index.build(2)
        index.save(str(w.path / A.ANNOY_INDEX))
        w.write_json(A.TOP_LISTS, {"popular": [], "genre": {}, "country": {}})
        w.write_json(A.USERS, {"user_id": []})
        w.write_npy(A.USER_AGGREGATES, np.zeros((0, 3 + 3 * 2)))
        w.write_npy(A.USER_FEATURES, np.zeros((0, SPEC.n_user_features), np.float32))
        target = target or TargetScale().to_dict()
        return w.commit({"feature_spec": SPEC.to_dict(), "target": target,
                         "annoy": {"metric": "angular"}})  # fmt: skip


def test_writer_numbers_versions_and_reader_verifies(tmp_path: Path):
    first = _write_version(tmp_path)
    second = _write_version(tmp_path)
    assert (first.name, second.name) == ("1", "2")
    assert A.list_versions(tmp_path) == ["1", "2"]
    mv = A.open_version(tmp_path)
    assert mv.version == "2"
    assert mv.item_index["i3"] == 3
    assert mv.annoy_index().get_n_items() == 5
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_failed_write_leaves_no_version(tmp_path: Path):
    with pytest.raises(RuntimeError), A.VersionWriter(tmp_path) as w:
        w.write_json(A.ITEM_IDS, [])
        raise RuntimeError("crash mid-export")
    assert list(tmp_path.iterdir()) == []
    assert A.latest_version(tmp_path) is None


def test_object_arrays_are_refused(tmp_path: Path):
    with A.VersionWriter(tmp_path) as w, pytest.raises(ValueError, match="pickle"):
        w.write_npy("x.npy", np.array([{"a": 1}], dtype=object))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / A.MANIFEST).unlink(), "incomplete: no manifest"),
        (lambda p: (p / A.ITEM_VECTORS).unlink(), "item_vectors.npy is missing"),
        (lambda p: _truncate(p / "user_tower" / "saved_model.pb"), "truncated"),
        (lambda p: _flip_byte(p / A.ITEM_IDS), "checksum mismatch for item_ids.json"),
        (lambda p: _edit_manifest(p, schema_version=A.SCHEMA_VERSION + 1), "newer than this code"),
        (lambda p: _edit_manifest(p, drop="feature_spec"), "lacks the 'feature_spec'"),
        (lambda p: (p / A.MANIFEST).write_text("{"), "not valid JSON"),
    ],
)
def test_broken_versions_are_refused_with_a_reason(tmp_path: Path, damage, message):
    path = _write_version(tmp_path)
    damage(path)
    with pytest.raises(A.ArtifactError, match=message):
        A.ModelVersion.open(path)


def test_a_non_finite_item_vector_is_refused_naming_its_row(tmp_path: Path):
    """One NaN row would scramble the order of every answer holding that item."""
    path = _write_version(tmp_path, n_items=5, bad_row=3)
    with pytest.raises(
        A.ArtifactError, match=r"item_vectors\.npy row 3 \(item 'i3'\) is not finite"
    ):
        A.ModelVersion.open(path)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"objective": "binary", "logit_scale": -3.0}, "logit_scale -3.0 must be positive"),
        ({"objective": "binary", "logit_scale": 0.0}, "logit_scale 0.0 must be positive"),
        ({"objective": "binary", "logit_bias": float("nan")}, "logit_bias nan must be finite"),
        ({"rating_min": 5.0, "rating_max": 1.0}, "rating_max 1.0 must exceed rating_min 5.0"),
    ],
)
def test_a_target_map_that_would_misorder_scores_is_refused(tmp_path: Path, target, message):
    """Items are ordered by the dot product; the map to scores must increase."""
    path = _write_version(tmp_path, target={**TargetScale().to_dict(), **target})
    with pytest.raises(A.ArtifactError, match=message):
        A.ModelVersion.open(path)


def test_annoy_index_from_another_version_is_refused(tmp_path: Path):
    good = _write_version(tmp_path / "a", n_items=5)
    other = _write_version(tmp_path / "b", n_items=5, annoy_items=7)
    shutil.copy(other / A.ANNOY_INDEX, good / A.ANNOY_INDEX)
    with pytest.raises(A.ArtifactError, match=r"annoy\.ann"):
        A.ModelVersion.open(good)
    # Even when the manifest is rewritten to bless the foreign file, the
    # item-count check catches the mismatch at load.
    m = json.loads((good / A.MANIFEST).read_text())
    m["files"][A.ANNOY_INDEX] = {
        "sha256": A.sha256_file(good / A.ANNOY_INDEX),
        "bytes": (good / A.ANNOY_INDEX).stat().st_size,
    }
    (good / A.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(A.ArtifactError, match="another version"):
        A.ModelVersion.open(good).annoy_index()


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:3])


def _flip_byte(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[1] ^= 0x01
    p.write_bytes(bytes(b))


def _edit_manifest(p: Path, schema_version: int | None = None, drop: str | None = None) -> None:
    m = json.loads((p / A.MANIFEST).read_text())
    if schema_version is not None:
        m["schema_version"] = schema_version
    if drop:
        del m[drop]
    (p / A.MANIFEST).write_text(json.dumps(m))
