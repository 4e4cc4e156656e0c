"""The model-version artifact contract: one writer, one verifying reader.

A model directory holds numbered versions, TF-Serving style::

    <model_dir>/
      1/
      2/
        manifest.json        schema, dataset + hash, feature spec, target scaling,
                             metrics and the sha256 of every other file
        user_tower/          SavedModel: float32 [n, F_user] -> float32 [n, D]
        item_tower/          SavedModel: float32 [n, F_item] -> float32 [n, D]
        item_ids.json        catalogue order (row i of every item array)
        item_vectors.npy     float32 [n_items, D], L2-normalised item-tower outputs
        item_genres.npy      uint8 [n_items, G] multi-hot genres
        item_features.npy    float32 [n_items, F_item] item-tower inputs (re-embedding, checks)
        items.json           {"title": [...], "year": [...]} in catalogue order
        annoy.ann            Annoy index (angular) over item_vectors, item i = row i
        top_lists.json       {"popular": [[id, score]..], "genre": {g: [..]}, "country": {c: [..]}}
        users.json           known users: ids, demographics, training history, all watched
        user_aggregates.npy  float64 [n_users, 3 + 3G] (see AGGREGATE_COLUMNS)
        user_features.npy    float32 [n_users, F_user] precomputed user features
        logged/*.npy         the ratings from the interaction logs it trained on, when
                             trained with --interactions (see LOGGED_RATINGS)
        logged/user_ids.json the users only those logs knew (see LOGGED_USERS)
        metrics.json, *.png  evaluation report (optional, checksummed when present)

Versions are written to a hidden temporary directory and renamed into place
only once complete, so a reader never sees half a version; the reader still
refuses any directory without a manifest, with a missing file, or with a
checksum that does not match. No pickle anywhere: JSON, ``.npy`` loaded with
``allow_pickle=False``, SavedModel and Annoy.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from recsys.features import FeatureSpec, TargetScale

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
USER_TOWER = "user_tower"
ITEM_TOWER = "item_tower"
ITEM_IDS = "item_ids.json"
ITEM_VECTORS = "item_vectors.npy"
ITEM_GENRES = "item_genres.npy"
ITEM_FEATURES = "item_features.npy"
ITEMS_META = "items.json"
ANNOY_INDEX = "annoy.ann"
TOP_LISTS = "top_lists.json"
USERS = "users.json"
USER_AGGREGATES = "user_aggregates.npy"
USER_FEATURES = "user_features.npy"
REQUIRED_FILES = (
    ITEM_IDS, ITEM_VECTORS, ITEM_GENRES, ITEM_FEATURES, ITEMS_META, ANNOY_INDEX,
    TOP_LISTS, USERS, USER_AGGREGATES, USER_FEATURES,
)  # fmt: skip
REQUIRED_DIRS = (USER_TOWER, ITEM_TOWER)
# The ratings from the services' interaction logs a version trained on
# (trainer.interactions), column -> file: user and item rows int32, rating
# float32, timestamp int64 (Unix seconds). `recsys evaluate` rebuilds the
# version's training data from them, not from an export since replaced.
LOGGED_RATINGS = {
    name: f"logged/{name}.npy" for name in ("rating_user", "rating_item", "rating", "timestamp")
}
# The users only those logs knew, appended to the dataset's own (JSON list of
# ids, in row order); absent when there were none.
LOGGED_USERS = "logged/user_ids.json"
# The tower SavedModels are called through this signature with these names.
SIGNATURE = "serving_default"
INPUT_KEY = "features"
OUTPUT_KEY = "embedding"


def aggregate_columns(spec: FeatureSpec) -> list[str]:
    """Column names of ``user_aggregates.npy``."""
    g = spec.genres
    return (
        ["watch_count", "rated_count", "rating_sum"]
        + [f"genre_watch:{x}" for x in g]
        + [f"genre_rated:{x}" for x in g]
        + [f"genre_sum:{x}" for x in g]
    )


class ArtifactError(Exception):
    """A version directory that cannot be served; the message names the problem."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _walk_files(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            yield p


def list_versions(model_dir: str | Path) -> list[str]:
    """Complete versions (numeric directories with a manifest), oldest first."""
    root = Path(model_dir)
    if not root.is_dir():
        return []
    found = [
        p.name
        for p in root.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / MANIFEST).is_file()
    ]
    return sorted(found, key=int)


def manifest_digest(version_dir: str | Path) -> str | None:
    """The sha256 of a version's manifest, or None when it has none (or it cannot be read).

    What tells apart two versions under one number (a directory deleted and
    trained again gets its number back): the manifest holds its
    ``created_at`` and the checksum of every other file.
    """
    try:
        return hashlib.sha256((Path(version_dir) / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None


def latest_version(model_dir: str | Path) -> str | None:
    """Highest complete version, or None."""
    versions = list_versions(model_dir)
    return versions[-1] if versions else None


class ModelVersion:
    """A verified, read-only view of one version directory.

    Arrays are loaded lazily and cached; ``item_vectors`` is memory-mapped so
    several worker processes share one copy through the page cache.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], digest: str = ""):
        self.path = path
        self.manifest = manifest
        # The manifest's sha256 (manifest_digest) as opened: which build of the version this is.
        self.digest = digest
        self.version = str(manifest["version"])
        self.spec = FeatureSpec.from_dict(manifest["feature_spec"])
        self.target = TargetScale.from_dict(manifest["target"])

    @property
    def log_cutoff_ms(self) -> int:
        """The interaction-log ratings its training data holds: those before this (0: none).

        Set when the version was trained with ``--interactions``
        (:mod:`trainer.interactions`); ``recsys publish`` replays only the
        logged ratings from this time on.
        """
        merged = self.manifest.get("dataset", {}).get("interactions") or {}
        cutoff = merged.get("cutoff_ms", 0)
        return cutoff if isinstance(cutoff, int) and cutoff > 0 else 0

    @property
    def created_epoch_s(self) -> int:
        """When the version was committed, in whole seconds since the epoch (0: not recorded)."""
        try:
            return int(_dt.datetime.fromisoformat(self.manifest["created_at"]).timestamp())
        except (KeyError, TypeError, ValueError):
            return 0

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> ModelVersion:
        """Opens and checks a version directory.

        Args:
            path: The ``<model_dir>/<version>`` directory.
            verify: Recompute every file's sha256 (on by default; only tests
                of the checks themselves turn it off).

        Raises:
            ArtifactError: Missing manifest or file, newer schema, checksum
                mismatch, or inconsistent shapes.
        """
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            # Absolute: a relative path was taken from a working directory the user may not know.
            raise ArtifactError(f"model version {path.absolute()} does not exist")
        if not mpath.is_file():
            raise ArtifactError(f"model version {path} is incomplete: no {MANIFEST}")
        try:
            raw = mpath.read_bytes()
            manifest = json.loads(raw)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{mpath} is not valid JSON: {exc}") from exc
        schema = manifest.get("schema_version")
        if not isinstance(schema, int):
            raise ArtifactError(f"{mpath} has no integer schema_version")
        if schema > SCHEMA_VERSION:
            raise ArtifactError(
                f"{mpath} uses manifest schema {schema}, newer than this code supports "
                f"({SCHEMA_VERSION}); upgrade recsys to serve it"
            )
        for key in ("version", "feature_spec", "target", "files"):
            if key not in manifest:
                raise ArtifactError(f"{mpath} lacks the '{key}' entry")
        if path.name.isdigit() and str(manifest["version"]) != path.name:
            # The services find a version's Redis top lists by the manifest's
            # number and its directory by the pointer's: a copy renamed without
            # its manifest was served as one version and read another's lists.
            raise ArtifactError(
                f"{path}: the directory is version {path.name} but its manifest says "
                f"version {manifest['version']!r}; a version's directory must carry its number"
            )
        files: dict[str, dict[str, Any]] = manifest["files"]
        for rel in REQUIRED_FILES:
            if rel not in files:
                raise ArtifactError(f"{mpath} does not list required file {rel}")
        for d in REQUIRED_DIRS:
            if not any(k.startswith(d + "/") for k in files):
                raise ArtifactError(f"{mpath} does not list the {d} SavedModel")
        for rel, info in files.items():
            fp = path / rel
            if not fp.is_file():
                raise ArtifactError(f"model version {path}: file {rel} is missing")
            if fp.stat().st_size != info.get("bytes", fp.stat().st_size):
                raise ArtifactError(
                    f"model version {path}: file {rel} has {fp.stat().st_size} bytes, "
                    f"manifest says {info['bytes']} (truncated or replaced)"
                )
            if verify and sha256_file(fp) != info["sha256"]:
                raise ArtifactError(f"model version {path}: checksum mismatch for {rel}")
        try:
            mv = cls(path, manifest, hashlib.sha256(raw).hexdigest())
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{mpath}: bad feature spec or target: {exc}") from exc
        mv._check_shapes()
        return mv

    def _check_shapes(self) -> None:
        n = len(self.item_ids)
        vec = self.item_vectors
        if vec.ndim != 2 or vec.shape[0] != n:
            raise ArtifactError(
                f"{self.path}: {ITEM_VECTORS} has shape {vec.shape}, expected ({n}, D)"
            )
        # A NaN or infinite row would not just score badly: the compiled
        # top-k cannot order past a NaN, so every answer holding that item
        # would come out scrambled. Checked in slices to keep memory flat.
        step = 1 << 16
        for start in range(0, n, step):
            chunk = np.asarray(vec[start : start + step])
            if not np.isfinite(chunk).all():
                row = start + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
                raise ArtifactError(
                    f"{self.path}: {ITEM_VECTORS} row {row} (item {self.item_ids[row]!r}) "
                    "is not finite"
                )
        if len(set(self.item_ids)) != n:
            raise ArtifactError(f"{self.path}: {ITEM_IDS} has duplicate ids")
        if self.item_genres.shape != (n, len(self.spec.genres)):
            raise ArtifactError(f"{self.path}: {ITEM_GENRES} shape does not match the catalogue")

    # --- items ------------------------------------------------------------------

    @cached_property
    def item_ids(self) -> list[str]:
        """Catalogue order: row i of every item array is ``item_ids[i]``."""
        return list(self._json(ITEM_IDS))

    @cached_property
    def catalogue_id(self) -> str:
        """Fingerprint of the catalogue: hex sha256 of the item ids in row order.

        Two versions with the same fingerprint number their items the same
        way, so a row from one names the same item in the other; the
        services use it to pass candidates by row (``RetrieveRequest.catalogue``).
        """
        # Canonical JSON: no two id lists serialise alike, and it runs in C.
        text = json.dumps(self.item_ids, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @cached_property
    def item_index(self) -> dict[str, int]:
        """Item id to row."""
        return {iid: i for i, iid in enumerate(self.item_ids)}

    @cached_property
    def item_vectors(self) -> np.ndarray:
        """float32 [n_items, D], memory-mapped read-only."""
        return self._npy(ITEM_VECTORS, mmap=True)

    @property
    def dim(self) -> int:
        """Embedding width D."""
        return int(self.item_vectors.shape[1])

    @cached_property
    def item_genres(self) -> np.ndarray:
        """uint8 [n_items, G] multi-hot."""
        return self._npy(ITEM_GENRES, mmap=True)

    @cached_property
    def item_features(self) -> np.ndarray:
        """float32 [n_items, F_item], the item-tower inputs, memory-mapped."""
        return self._npy(ITEM_FEATURES, mmap=True)

    @cached_property
    def items_meta(self) -> dict[str, list]:
        """``{"title": [...], "year": [...]}`` in catalogue order."""
        return self._json(ITEMS_META)

    def item_genre_names(self, row: int) -> list[str]:
        """Genre names of the item at ``row``."""
        return [g for g, on in zip(self.spec.genres, self.item_genres[row], strict=True) if on]

    def annoy_index(self):  # -> annoy.AnnoyIndex
        """Loads the Annoy index (memory-mapped by Annoy itself) and checks it."""
        from annoy import AnnoyIndex

        meta = self.manifest.get("annoy", {})
        index = AnnoyIndex(self.dim, meta.get("metric", "angular"))
        try:
            index.load(str(self.path / ANNOY_INDEX))
        except OSError as exc:
            raise ArtifactError(f"{self.path}: cannot load {ANNOY_INDEX}: {exc}") from exc
        if index.get_n_items() != len(self.item_ids):
            raise ArtifactError(
                f"{self.path}: {ANNOY_INDEX} holds {index.get_n_items()} items, "
                f"catalogue has {len(self.item_ids)} (index from another version?)"
            )
        return index

    @cached_property
    def top_lists(self) -> dict[str, Any]:
        """Popular, per-genre and per-country lists of ``[item_id, score]``."""
        return self._json(TOP_LISTS)

    # --- users ------------------------------------------------------------------

    @cached_property
    def users(self) -> dict[str, list]:
        """Known users: ids, age, gender, occupation, country and training history."""
        return self._json(USERS)

    @cached_property
    def user_aggregates(self) -> np.ndarray:
        """float64 [n_users, 3 + 3G], columns as :func:`aggregate_columns`."""
        return self._npy(USER_AGGREGATES, mmap=False)

    @cached_property
    def user_features(self) -> np.ndarray:
        """float32 [n_users, F_user], as the trainer computed them."""
        return self._npy(USER_FEATURES, mmap=False)

    def logged_ratings(self) -> dict[str, np.ndarray] | None:
        """The interaction-log ratings it trained on, by column (``LOGGED_RATINGS``; None: none)."""
        if not all(rel in self.manifest["files"] for rel in LOGGED_RATINGS.values()):
            return None
        return {name: self._npy(rel, mmap=False) for name, rel in LOGGED_RATINGS.items()}

    def logged_user_ids(self) -> list[str]:
        """Users only the interaction logs knew, which it trained on (``LOGGED_USERS``)."""
        if LOGGED_USERS not in self.manifest["files"]:
            return []
        ids = self._json(LOGGED_USERS)
        if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
            raise ArtifactError(f"{self.path / LOGGED_USERS}: expected a JSON list of user ids")
        return ids

    # --- models -------------------------------------------------------------------

    def load_tower(self, name: str = USER_TOWER):
        """Loads a tower SavedModel (imports TensorFlow on first use)."""
        import tensorflow as tf

        try:
            return tf.saved_model.load(str(self.path / name))
        except Exception as exc:  # TF raises many types for a broken SavedModel
            raise ArtifactError(f"{self.path}: cannot load SavedModel {name}: {exc}") from exc

    # --- helpers ------------------------------------------------------------------

    def _json(self, rel: str) -> Any:
        try:
            return json.loads((self.path / rel).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{self.path}: cannot read {rel}: {exc}") from exc

    def _npy(self, rel: str, *, mmap: bool) -> np.ndarray:
        try:
            return np.load(self.path / rel, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{self.path}: cannot read {rel}: {exc}") from exc


def open_version(model_dir: str | Path, version: str | None = None) -> ModelVersion:
    """Opens ``version`` (default: the latest complete one) under ``model_dir``."""
    version = version or latest_version(model_dir)
    if version is None:
        raise ArtifactError(f"no complete model version under {model_dir}")
    return ModelVersion.open(Path(model_dir) / version)


# A writer's temporary directory untouched this long belongs to a trainer (or
# an interaction export) that was killed (either takes minutes at most): the
# next writer removes it.
STALE_TEMP_S = 6 * 3600.0


def remove_stale_temps(root: Path) -> None:
    """Deletes ``.tmp-*`` directories under ``root`` that killed writers left (never a live one)."""
    cutoff = time.time() - STALE_TEMP_S
    for p in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):  # another writer's, or removed meanwhile
            if p.is_dir() and p.stat().st_mtime < cutoff:
                shutil.rmtree(p)


class VersionWriter:
    """Builds a version in a temporary directory and renames it into place.

    Usage::

        with VersionWriter(model_dir) as w:
            w.write_json(ITEM_IDS, ids)
            ...
            final_path = w.commit(manifest)
    """

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.model_dir)
        self.path = self.model_dir / f".tmp-{uuid.uuid4().hex}"
        self.path.mkdir()
        self.final_path: Path | None = None

    def __enter__(self) -> VersionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.final_path is None:
            shutil.rmtree(self.path, ignore_errors=True)

    def write_json(self, rel: str, obj: Any) -> Path:
        """Writes a JSON file (compact; UTF-8)."""
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))
        return p

    def write_npy(self, rel: str, arr: np.ndarray) -> Path:
        """Writes a ``.npy`` file (never an object array)."""
        arr = np.asarray(arr)
        if arr.dtype == object:
            raise ValueError(f"{rel}: object arrays would need pickle")
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, arr, allow_pickle=False)
        return p

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Checksums every file, writes the manifest and renames into place.

        ``manifest`` must not contain ``version``, ``files`` or
        ``schema_version``; they are filled in here.

        Returns:
            The final ``<model_dir>/<version>`` path.
        """
        files = {
            str(p.relative_to(self.path)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in _walk_files(self.path)
        }
        for _attempt in range(100):
            existing = [int(p.name) for p in self.model_dir.iterdir() if p.name.isdigit()]
            version = str(max(existing, default=0) + 1)
            body = {
                "schema_version": SCHEMA_VERSION,
                "version": version,
                "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                **manifest,
                "files": files,
            }
            (self.path / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True))
            _fsync_tree(self.path)
            target = self.model_dir / version
            try:
                # rename() onto a non-existent directory is atomic on POSIX; if
                # another writer took this number first we pick the next one.
                os.rename(self.path, target)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or target.exists():
                    continue
                # Not a lost race (no space, read-only, not permitted): another
                # number would fail the same way, a hundred times over.
                raise ArtifactError(
                    f"could not move the new version into {self.model_dir}: {exc.strerror or exc}"
                ) from exc
            self.final_path = target
            return target
        raise ArtifactError(f"could not allocate a version number under {self.model_dir}")


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with contextlib.suppress(OSError), open(p, "rb") as f:
                os.fsync(f.fileno())
