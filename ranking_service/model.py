"""A loaded, warmed model version: user tower, resident item vectors, id index.

Scoring of a micro-batch is :func:`score_batch`: one user-tower call for all
requests of a version, one gather of every candidate's vector, one dot
product per candidate, then a per-request top-k.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numba import njit

from ranking_service.catalogue import IdIndex
from recsys.artifacts import ArtifactError, ModelVersion
from recsys.errors import UserFacingError
from recsys.features import default_user_vector
from recsys.rows import RowMarks

log = logging.getLogger("ranking_service.model")

Device = Literal["cpu", "gpu"]
TowerRuntime = Literal["session", "eager"]
# Largest difference allowed between the frozen graph and the SavedModel's own
# signature at warm-up; the same kernels run, so anything above float noise
# means the freeze went wrong.
FROZEN_TOLERANCE = 1e-5


class SessionTower:
    """The user tower's serving signature frozen to constants, run by a Session callable.

    Calling a SavedModel signature eagerly costs ~350 µs per call on a
    2-core machine whatever the batch size: Python-side argument
    structuring and eager dispatch dominate a three-layer MLP. Freezing the
    variables into the graph (``convert_variables_to_constants_v2``) and
    running it through ``Session.make_callable`` (how TensorFlow Serving runs
    a model: one C++ ``Session::Run`` per batch) executes the same kernels
    for ~60 µs (a batch of 32), and releases the GIL while it runs. The ops run in the
    calling thread with one intra-op thread: a batch is small, and worker
    threads (waking, handing off, spinning) would steal the cores the RPC
    layer needs.
    """

    def __init__(self, signature: Any, output_key: str):
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2,
        )

        frozen = convert_variables_to_constants_v2(signature)
        if len(frozen.inputs) != 1 or len(frozen.outputs) != 1:
            raise ValueError("the user tower must have one input and one output to freeze")
        outputs = signature.structured_outputs
        if not isinstance(outputs, dict) or list(outputs) != [output_key]:
            raise ValueError(f"the user tower signature must return only {output_key!r}")
        graph = tf.Graph()
        with graph.as_default():
            tf.import_graph_def(frozen.graph.as_graph_def(), name="")
        # A negative inter-op count makes the session run every op in the
        # calling thread. With one inter-op thread, each call handed the graph
        # to that thread and blocked until it ran: measured for a batch of 32
        # on 2 cores, 97 -> 59 µs of CPU and 105 -> 59 µs of wall time per
        # call (the caller's CPU now equals the process's).
        config = tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=1, inter_op_parallelism_threads=-1
        )
        self._session = tf.compat.v1.Session(graph=graph, config=config)
        feed, fetch = frozen.inputs[0].name, frozen.outputs[0].name
        try:
            # A callable made from CallableOptions runs through
            # TF_SessionRunCallable directly: half the CPU of make_callable
            # with a feed list, which goes back through Session.run's fetch
            # handling on every call.
            from tensorflow.core.protobuf import config_pb2

            opts = config_pb2.CallableOptions(feed=[feed], fetch=[fetch])
            fast = self._session._make_callable_from_options(opts)
            self._call = lambda x: fast(x)[0]
        except AttributeError:  # a TensorFlow without the private fast path
            self._call = self._session.make_callable(fetch, feed_list=[feed])

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """float32 ``[B, F]`` → float32 ``[B, D]``."""
        return np.asarray(self._call(np.asarray(features, np.float32)), np.float32)

    def close(self) -> None:
        """Releases the session's resources."""
        self._session.close()


def resolve_device(setting: str) -> Device:
    """Turns ``auto|cpu|gpu`` into the device to use.

    Raises:
        UserFacingError: ``gpu`` was asked for and TensorFlow sees none.
    """
    if setting == "cpu":
        return "cpu"
    import tensorflow as tf

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if setting == "gpu" and not has_gpu:
        raise UserFacingError("--device gpu: TensorFlow sees no GPU on this machine")
    if setting not in ("auto", "gpu"):
        raise UserFacingError(f"device must be auto, cpu or gpu, not {setting!r}")
    if not has_gpu:
        return "cpu"
    # TensorFlow runs float32 matmuls in TF32 on Ampere and later by default: a
    # 10-bit mantissa, ~1e-3 off in the user vector, so near ties among the
    # candidates would order differently on GPU and CPU replicas of one version.
    tf.config.experimental.enable_tensor_float_32_execution(False)
    return "gpu"


class HostVectors:
    """Item vectors in host memory, memory-mapped (one copy in the page cache)."""

    kind = "host"

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        # A plain view of the same mapping: indexing a memmap subclass pays
        # for wrapping every result.
        self._plain = np.asarray(vectors)
        self.dim = int(vectors.shape[1])

    def dots(self, users: np.ndarray, rows: np.ndarray, segment: np.ndarray) -> np.ndarray:
        """``users[segment[j]] · vectors[rows[j]]`` for every j, float32."""
        # take() is ~3x faster than fancy indexing for a row gather.
        gathered = np.take(self._plain, rows, axis=0)
        users = np.asarray(users, np.float32)
        n = rows.shape[0]
        if n == 0 or np.any(segment[1:] < segment[:-1]):
            return np.einsum("nd,nd->n", gathered, users[segment], dtype=np.float32)
        # A batch lists each request's rows together: one matrix-vector
        # product per request instead of copying its user vector to every row
        # (for 16 requests x 500 rows ~90 us against ~310 us).
        cuts = (np.flatnonzero(segment[1:] != segment[:-1]) + 1).tolist()
        out = np.empty(n, np.float32)
        for a, b in zip([0, *cuts], [*cuts, n], strict=True):
            np.matmul(gathered[a:b], users[segment[a]], out=out[a:b])
        return out


class TensorVectors:
    """Item vectors as a TensorFlow constant on a device (the GPU when serving).

    Gather and dot run on that device; only the [n] dot products come back.
    """

    def __init__(self, vectors: np.ndarray, device: str):
        import tensorflow as tf

        self.kind = device
        self.dim = int(vectors.shape[1])
        with tf.device(device):
            self.vectors = tf.constant(np.asarray(vectors, np.float32))
        spec = (
            tf.TensorSpec([None, self.dim], tf.float32),
            tf.TensorSpec([None], tf.int64),
            tf.TensorSpec([None], tf.int64),
        )
        table = self.vectors

        @tf.function(input_signature=spec, jit_compile=False)
        def _dots(users, rows, segment):
            with tf.device(device):
                g = tf.gather(table, rows)
                u = tf.gather(users, segment)
                return tf.reduce_sum(g * u, axis=1)

        self._fn = _dots

    def dots(self, users: np.ndarray, rows: np.ndarray, segment: np.ndarray) -> np.ndarray:
        """``users[segment[j]] · vectors[rows[j]]`` for every j, float32."""
        return self._fn(users, rows, segment).numpy()


@dataclass(eq=False)
class LoadedModel:
    """Everything needed to score candidates with one model version."""

    version: ModelVersion
    device: Device
    index: IdIndex
    vectors: HostVectors | TensorVectors
    tower: Any  # the user tower's serving signature
    popular_rows: np.ndarray
    popular_scores: np.ndarray
    default_features: np.ndarray
    load_seconds: float = 0.0
    runtime: TowerRuntime = "eager"
    session_tower: SessionTower | None = None
    # Dedup and watched filtering on rows; used on the event loop only.
    marks: RowMarks = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.marks = RowMarks(len(self.index))

    @cached_property
    def popular_score_of(self) -> dict[int, float]:
        """Popular-list score by catalogue row (the fallback's provenance), built once."""
        return dict(zip(self.popular_rows.tolist(), self.popular_scores.tolist(), strict=True))

    @property
    def name(self) -> str:
        """The version string (directory name)."""
        return self.version.version

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: Device,
        *,
        warm_up: bool = True,
        runtime: TowerRuntime = "session",
    ) -> LoadedModel:
        """Opens (checksums verified), loads and warms a version.

        Args:
            path: The version directory.
            device: Where the item vectors live.
            warm_up: Run the scoring path once before returning.
            runtime: ``session`` runs the user tower as a frozen graph
                (:class:`SessionTower`; CPU only, checked against the
                signature at load, falling back to ``eager`` if it differs);
                ``eager`` calls the SavedModel signature directly.

        Raises:
            ArtifactError: Bad checksum, missing file, a tower that does not
                fit the feature spec, or a failed warm-up.
        """
        start = time.perf_counter()
        mv = ModelVersion.open(path)
        signature = _serving_signature(mv)
        index = IdIndex(mv.item_ids, mv.item_index)
        _ = mv.catalogue_id  # hashed at load, off the request path
        if device == "gpu":
            vectors: HostVectors | TensorVectors = TensorVectors(mv.item_vectors, "/GPU:0")
        else:
            vectors = HostVectors(mv.item_vectors)
        popular = mv.top_lists.get("popular", [])
        pop_ids = [str(p[0]) for p in popular]
        pop_rows = index.lookup(pop_ids) if pop_ids else np.zeros(0, np.int64)
        pop_scores = np.asarray([float(p[1]) for p in popular], np.float32)
        keep = pop_rows >= 0
        model = cls(
            version=mv,
            device=device,
            index=index,
            vectors=vectors,
            tower=signature,
            popular_rows=pop_rows[keep],
            popular_scores=pop_scores[keep],
            default_features=default_user_vector(mv.spec),
        )
        if runtime == "session" and device == "cpu":
            model._freeze()
        if warm_up:
            model.warm_up()
        model.load_seconds = time.perf_counter() - start
        return model

    def embed(self, features: np.ndarray) -> np.ndarray:
        """User tower on float32 ``[B, F_user]`` → float32 ``[B, D]``."""
        if self.session_tower is not None:
            return self.session_tower(features)
        return self._embed_eager(features)

    def _embed_eager(self, features: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        from recsys.artifacts import OUTPUT_KEY

        out = self.tower(features=tf.constant(features, tf.float32))
        return np.asarray(out[OUTPUT_KEY], np.float32)

    def _freeze(self) -> None:
        """Switches to the frozen-graph tower if it reproduces the signature's output."""
        from recsys.artifacts import OUTPUT_KEY

        try:
            frozen = SessionTower(self.tower, OUTPUT_KEY)
        except Exception as exc:  # an unusual graph: serve it eagerly instead
            log.warning("%s: user tower not frozen (%s); calling it eagerly", self.name, exc)
            return
        rng = np.random.default_rng(0)
        base = self.default_features[None, :].astype(np.float32)
        probe = np.concatenate([base, base + rng.normal(0, 1, (7, base.shape[1]))]).astype(
            np.float32
        )
        gap = float(np.max(np.abs(frozen(probe) - self._embed_eager(probe))))
        if not gap <= FROZEN_TOLERANCE:
            frozen.close()
            log.warning(
                "%s: frozen user tower differs from the signature by %.2e; calling it eagerly",
                self.name,
                gap,
            )
            return
        self.session_tower = frozen
        self.runtime = "session"

    def warm_up(self) -> None:
        """Runs the whole scoring path once; a version that fails is rejected.

        The first call of a SavedModel pays for graph set-up (hundreds of
        ms); doing it here keeps that off the first user request and proves
        the tower's output fits the item vectors.
        """
        feats = np.repeat(self.default_features[None, :], 2, axis=0)
        try:
            users = self.embed(feats)
        except Exception as exc:
            raise ArtifactError(f"{self.version.path}: user tower warm-up failed: {exc}") from exc
        if users.shape != (2, self.vectors.dim):
            raise ArtifactError(
                f"{self.version.path}: user tower returns shape {users.shape}, item vectors "
                f"have width {self.vectors.dim}"
            )
        if not np.all(np.isfinite(users)):
            raise ArtifactError(f"{self.version.path}: user tower returns non-finite values")
        n = min(len(self.index), 8)
        rows = np.arange(n, dtype=np.int64)
        dots = self.vectors.dots(users, np.concatenate([rows, rows]), np.repeat([0, 1], n))
        if not np.all(np.isfinite(dots)):
            raise ArtifactError(f"{self.version.path}: warm-up scores are not finite")
        # Item metadata is read on every answer, so a bad file must fail here,
        # not on the first request after the swap.
        titles = self.version.items_meta.get("title")
        if titles is not None and len(titles) != len(self.index):
            raise ArtifactError(
                f"{self.version.path}: items.json has {len(titles)} titles for "
                f"{len(self.index)} catalogue items"
            )

    def genres(self, row: int) -> tuple[str, ...]:
        """Genre names of the item at ``row``.

        Not memoised: it is read when an item's answer template is built,
        and the templates are the (bounded) memo.
        """
        return tuple(self.version.item_genre_names(row))

    def title(self, row: int) -> str:
        """Display title of the item at ``row`` (empty when absent)."""
        titles = self.version.items_meta.get("title") or []
        return str(titles[row]) if row < len(titles) else ""

    def title_of(self, item_id: str) -> str:
        """Display title of ``item_id`` (empty when it is not in the catalogue or has none)."""
        row = int(self.index.lookup([item_id])[0])
        return self.title(row) if row >= 0 else ""

    def item_id(self, row: int) -> str:
        """Item id of ``row``."""
        return self.version.item_ids[row]


def _serving_signature(mv: ModelVersion):
    from recsys.artifacts import SIGNATURE, USER_TOWER

    loaded = mv.load_tower(USER_TOWER)
    try:
        sig = loaded.signatures[SIGNATURE]
    except (KeyError, AttributeError) as exc:
        raise ArtifactError(f"{mv.path}: user tower has no '{SIGNATURE}' signature") from exc
    # Keep the loaded object alive: the signature's variables belong to it.
    sig._recsys_owner = loaded
    width = mv.spec.n_user_features
    spec = sig.structured_input_signature[1].get("features")
    if spec is None:
        raise ArtifactError(f"{mv.path}: user tower signature has no 'features' input")
    if spec.shape.rank != 2 or spec.shape[1] not in (None, width):
        raise ArtifactError(
            f"{mv.path}: user tower expects features of shape {spec.shape}, "
            f"the feature spec has {width} columns"
        )
    return sig


@dataclass
class ScoreRequest:
    """One request's share of a micro-batch."""

    model: LoadedModel
    features: np.ndarray  # float32 [F_user]
    rows: np.ndarray  # int64 [n] candidate rows (known, deduplicated, filtered)
    k: int
    # When tracing, score_batch fills in stage times (epoch ns) for the request's spans.
    trace: dict[str, Any] | None = None


@dataclass
class ScoreResult:
    """Top-k rows of one request, best first, with their raw dot products."""

    rows: np.ndarray
    dots: np.ndarray


def top_k(dots: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries, largest first (ties: earlier first)."""
    dots = np.ascontiguousarray(dots)  # any float dtype: no rounding that could make ties
    bounds = np.asarray([0, dots.shape[0]], np.int64)
    return top_k_segments(dots, bounds, np.asarray([k], np.int64))[0]


def top_k_segments(
    dots: np.ndarray, bounds: np.ndarray, ks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of every segment of a batch's dot products in one compiled pass.

    Args:
        dots: ``[n]`` floats (float32 when serving), the requests' dot products end to end.
        bounds: int64 ``[m + 1]``: request ``j`` owns ``dots[bounds[j]:bounds[j + 1]]``.
        ks: int64 ``[m]``: how many each request wants.

    Returns:
        (positions, out_bounds): ``positions[out_bounds[j]:out_bounds[j + 1]]``
        are request ``j``'s best positions in ``dots``, best first; equal
        scores keep their order in ``dots`` (the answer does not depend on
        how a batch was laid out).
    """
    sizes = np.minimum(np.maximum(ks, 0), np.diff(bounds))
    out_bounds = np.zeros(ks.shape[0] + 1, np.int64)
    np.cumsum(sizes, out=out_bounds[1:])
    positions = np.empty(int(out_bounds[-1]), np.int64)
    _top_segments(dots, bounds, out_bounds, positions)
    return positions, out_bounds


# Above this k a segment is sorted instead: insertion shifts up to k entries
# per candidate that gets in, O(n·k) (25 ms for a top 1,000 of 10,000 in
# rising order, on the event loop), where a stable sort is ~0.5 ms.
INSERTION_MAX_K = 64


@njit(cache=True)
def _top_segments(
    dots: np.ndarray, bounds: np.ndarray, out_bounds: np.ndarray, out: np.ndarray
) -> None:
    """Keeps each segment's best in a sorted run of ``out``, by insertion.

    ~1,000 candidates for a top 20: most fail the comparison with the
    current 20th and cost one compare, so a segment is a few microseconds,
    against ~8 numpy calls (argpartition, tie handling, lexsort) before.
    A large k sorts the segment (stable: ties keep their order).
    """
    for j in range(bounds.shape[0] - 1):
        o = out_bounds[j]
        k = out_bounds[j + 1] - o
        if k == 0:
            continue
        if k > INSERTION_MAX_K:
            order = np.argsort(-dots[bounds[j] : bounds[j + 1]], kind="mergesort")
            for t in range(k):
                out[o + t] = bounds[j] + order[t]
            continue
        filled = 0
        for i in range(bounds[j], bounds[j + 1]):
            v = dots[i]
            if filled == k:
                # Strictly better only: an equal score arrived later, so it ranks lower.
                if not v > dots[out[o + k - 1]]:
                    continue
                p = k - 1
            else:
                p = filled
                filled += 1
            while p > 0 and v > dots[out[o + p - 1]]:
                out[o + p] = out[o + p - 1]
                p -= 1
            out[o + p] = i


def score_batch(requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
    """Scores a micro-batch: per model version one tower call and one gather/dot."""
    results: list[ScoreResult | None] = [None] * len(requests)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(id(r.model), []).append(i)
    for idx in groups.values():
        model = requests[idx[0]].model
        # The clock is read only when a request of the group is traced.
        timed = any(requests[i].trace is not None for i in idx)
        t0 = time.time_ns() if timed else 0
        feats = np.stack([requests[i].features for i in idx]).astype(np.float32, copy=False)
        users = model.embed(feats)
        t1 = time.time_ns() if timed else 0
        counts = np.array([requests[i].rows.shape[0] for i in idx], np.int64)
        rows = (
            np.concatenate([requests[i].rows for i in idx])
            if counts.sum()
            else np.zeros(0, np.int64)
        )
        segment = np.repeat(np.arange(len(idx), dtype=np.int64), counts)
        dots = model.vectors.dots(users, rows, segment) if rows.size else np.zeros(0, np.float32)
        t2 = time.time_ns() if timed else 0
        bounds = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(counts, out=bounds[1:])
        ks = np.asarray([requests[i].k for i in idx], np.int64)
        picked, out_bounds = top_k_segments(np.ascontiguousarray(dots, np.float32), bounds, ks)
        best_rows, best_dots = rows[picked], dots[picked]
        t3 = time.time_ns() if timed else 0
        cuts = out_bounds.tolist()
        for j, i in enumerate(idx):
            a, b = cuts[j], cuts[j + 1]
            results[i] = ScoreResult(rows=best_rows[a:b], dots=best_dots[a:b])
            trace = requests[i].trace
            if trace is not None:
                trace.update(
                    user_tower=(t0, t1),
                    score=(t1, t2),
                    top_k=(t2, t3),
                    batch_size=len(idx),
                    batch_candidates=int(rows.size),
                    candidates=int(counts[j]),
                )
    return [r for r in results if r is not None]
