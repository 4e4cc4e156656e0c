"""The two-tower model: a user tower and an item tower scored by a dot product.

Each tower maps a raw feature vector (exactly what :mod:`recsys.features`
builds) to an L2-normalised embedding. Feature normalisation is a Keras
``Normalization`` layer with the training features' moments and lives inside
the tower, so the exported SavedModel takes raw vectors and serving never
re-implements the scaling. A column that never varied in training is
scaled to about zero (:func:`normalization_moments`).

Prediction is the dot of the two embeddings, which lies in ``[-1, 1]``:

* ``objective="rating"``: the dot itself, trained with MSE against ratings
  scaled to ``[-1, 1]`` (:class:`recsys.features.TargetScale`).
* ``objective="binary"``: ``sigmoid(a * dot + b)`` with a learned scale
  ``a`` and bias ``b``, trained with binary cross-entropy on "liked"
  (rating >= 4). ``a`` and ``b`` are exported in the manifest's target so
  serving maps dots to probabilities the same way.

Hybrid mode (``n_items > 0``, ``--id-embeddings``) gives every catalogue
item a learned id embedding, added to its content vector before a second L2
normalisation: ``v_i = normalize(tower(x_i) + e_i)``. The offsets start at
zero and carry an L2 penalty, so an item with few ratings stays close to its
content vector. They cost nothing at serving time, because the trainer bakes
them into ``item_vectors.npy``; the exported item-tower SavedModel stays the
content-only tower, i.e. what a new item (no id yet) would get. The user
tower is unchanged in both modes, so the serving contract is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import keras
import numpy as np

from recsys.features import FeatureSpec, TargetScale

Objective = Literal["rating", "binary"]


@dataclass
class TwoTower:
    """The towers and the model that trains them.

    Attributes:
        user_tower: Keras model, user features ``[n, F_user]`` -> ``[n, D]`` unit vectors.
        item_tower: Keras model, item features ``[n, F_item]`` -> ``[n, D]`` unit vectors.
        model: Keras model with inputs ``[user_features, item_features]`` (row-aligned
            pairs; hybrid adds ``item_index``) and output ``[n, 1]``: the dot (rating) or
            the like probability (binary).
        objective: ``"rating"`` or ``"binary"``.
        config: The hyper-parameters it was built with (JSON-ready, for the manifest).
        item_id_embedding: Hybrid mode's item id offsets ``[n_items, D]``, else None.
    """

    user_tower: keras.Model
    item_tower: keras.Model
    model: keras.Model
    objective: Objective
    config: dict[str, Any] = field(default_factory=dict)
    item_id_embedding: keras.layers.Embedding | None = None

    @property
    def hybrid(self) -> bool:
        """True when items have learned id embeddings (the model takes item rows as a 3rd input)."""
        return self.item_id_embedding is not None

    def item_vectors(self, features: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
        """Catalogue item vectors float32 ``[n, D]``: what ``item_vectors.npy`` holds.

        Args:
            features: Item features ``[n, F_item]`` in catalogue order (row = item index).
            known: Optional bool ``[n]``; in hybrid mode, items where it is False (no
                training ratings) keep their content vector, as a brand-new item would.

        Returns:
            The content tower's unit vectors, or in hybrid mode
            ``normalize(content + id offset)``.
        """
        vectors = embed(self.item_tower, features)
        if self.item_id_embedding is None:
            return vectors
        offsets = np.asarray(self.item_id_embedding.embeddings, np.float32)
        if offsets.shape != vectors.shape:
            raise ValueError(
                f"item id embeddings cover {offsets.shape[0]} items, catalogue has {len(vectors)}"
            )
        if known is not None:
            offsets = np.where(np.asarray(known, bool)[:, None], offsets, 0.0)
        out = vectors + offsets
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)

    @property
    def embedding_dim(self) -> int:
        """Embedding width D."""
        return int(self.user_tower.output.shape[-1])

    def logit_params(self) -> tuple[float, float]:
        """Learned ``(scale, bias)`` of the binary head; ``(1, 0)`` for the rating objective."""
        if self.objective != "binary":
            return 1.0, 0.0
        head = self.model.get_layer("logit")
        kernel, bias = head.get_weights()
        return float(kernel.reshape(-1)[0]), float(bias.reshape(-1)[0])

    def target_scale(self, spec: FeatureSpec, like_threshold: float = 4.0) -> TargetScale:
        """The :class:`TargetScale` that maps this model's dots to stars or probabilities."""
        scale, bias = self.logit_params()
        return TargetScale(
            objective=self.objective,
            rating_min=spec.rating_min,
            rating_max=spec.rating_max,
            like_threshold=like_threshold,
            logit_scale=scale,
            logit_bias=bias,
        )


# A column whose training variance is below this never varied: nothing was learned from it.
CONSTANT_VARIANCE = 1e-10
# Its variance at serving: any value it takes then is scaled to about zero.
IGNORED_VARIANCE = 1e12


def normalization_moments(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and variance of the tower's input scaling.

    A column constant in training (every training user had an age, so
    ``age_missing`` was always 0) gets a huge variance instead of its zero
    one: scaled by the layer's epsilon, a serving-time 1 became 1e7 and
    drowned every other feature, so all users without an age got one
    ranking. The model learned nothing from such a column; now it is ignored.
    """
    x = np.asarray(sample, np.float64)
    mean, variance = x.mean(axis=0), x.var(axis=0)
    return mean, np.where(variance < CONSTANT_VARIANCE, IGNORED_VARIANCE, variance)


def _tower(
    name: str,
    width: int,
    hidden_units: Sequence[int],
    embedding_dim: int,
    sample: np.ndarray | None,
    l2: float,
    dropout: float,
) -> keras.Model:
    inputs = keras.Input((width,), dtype="float32", name=f"{name}_features")
    if sample is not None:
        if sample.ndim != 2 or sample.shape[1] != width:
            raise ValueError(
                f"{name} tower: sample has shape {sample.shape}, expected (n, {width})"
            )
        mean, variance = normalization_moments(sample)
    else:
        # Identity scaling; keeps the model buildable without data.
        mean, variance = np.zeros(width), np.ones(width)
    norm = keras.layers.Normalization(
        mean=mean.astype(np.float32), variance=variance.astype(np.float32), name=f"{name}_normalize"
    )
    x = norm(inputs)
    reg = keras.regularizers.L2(l2) if l2 > 0 else None
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(
            units, activation="relu", kernel_regularizer=reg, name=f"{name}_dense_{i}"
        )(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"{name}_dropout_{i}")(x)
    x = keras.layers.Dense(embedding_dim, kernel_regularizer=reg, name=f"{name}_projection")(x)
    outputs = keras.layers.UnitNormalization(name=f"{name}_l2")(x)
    return keras.Model(inputs, outputs, name=f"{name}_tower")


def build_two_tower(
    spec: FeatureSpec,
    *,
    hidden_units: Sequence[int] = (256, 128),
    embedding_dim: int = 32,
    objective: Objective = "rating",
    learning_rate: float = 1e-3,
    l2: float = 0.0,
    dropout: float = 0.0,
    user_sample: np.ndarray | None = None,
    item_sample: np.ndarray | None = None,
    n_items: int = 0,
    id_l2: float = 1e-5,
) -> TwoTower:
    """Builds and compiles the two-tower model.

    Call it inside a ``tf.distribute`` strategy scope to train on several
    devices; the layers and optimizer are created here.

    Args:
        spec: Feature spec; fixes the input widths.
        hidden_units: Hidden ReLU layer sizes of each tower.
        embedding_dim: Output width D of each tower.
        objective: ``"rating"`` (MSE on scaled ratings) or ``"binary"`` (BCE on liked).
        learning_rate: Adam learning rate.
        l2: L2 weight penalty on the dense kernels (0 = none).
        dropout: Dropout after each hidden layer (0 = none).
        user_sample: Training user features ``[n, F_user]`` to adapt the normalisation on.
        item_sample: Training item features ``[n, F_item]`` to adapt the normalisation on.
        n_items: Catalogue size; above 0 turns on hybrid mode (item id embeddings) and
            the model takes item rows (int32 ``[n]``) as a third input.
        id_l2: L2 penalty on the item id embeddings (hybrid mode).

    Returns:
        The compiled :class:`TwoTower`.
    """
    if objective not in ("rating", "binary"):
        raise ValueError(f"objective must be 'rating' or 'binary', not {objective!r}")
    if embedding_dim < 2 or any(u < 1 for u in hidden_units):
        raise ValueError("embedding_dim must be >= 2 and every hidden layer >= 1 unit")
    hidden = [int(u) for u in hidden_units]
    user = _tower("user", spec.n_user_features, hidden, embedding_dim, user_sample, l2, dropout)
    item = _tower("item", spec.n_item_features, hidden, embedding_dim, item_sample, l2, dropout)
    u_in = keras.Input((spec.n_user_features,), dtype="float32", name="user_features")
    i_in = keras.Input((spec.n_item_features,), dtype="float32", name="item_features")
    inputs = [u_in, i_in]
    item_vec = item(i_in)
    id_embedding = None
    if n_items > 0:
        idx = keras.Input((), dtype="int32", name="item_index")
        inputs.append(idx)
        # Zero start: an item begins at its content vector and moves away only as
        # far as its own ratings justify against the L2 pull back.
        id_embedding = keras.layers.Embedding(
            n_items,
            embedding_dim,
            embeddings_initializer="zeros",
            embeddings_regularizer=keras.regularizers.L2(id_l2) if id_l2 > 0 else None,
            name="item_id_embedding",
        )
        item_vec = keras.layers.UnitNormalization(name="item_hybrid_l2")(
            keras.layers.Add(name="item_id_offset")([item_vec, id_embedding(idx)])
        )
    dot = keras.layers.Dot(axes=1, name="dot")([user(u_in), item_vec])
    if objective == "binary":
        # A learned affine map on the dot: cosine similarity alone cannot
        # reach confident probabilities, sigmoid(1) is only 0.73.
        out = keras.layers.Dense(
            1,
            activation="sigmoid",
            kernel_initializer=keras.initializers.Constant(5.0),
            # Non-negative: serving orders items by the dot and maps the
            # winners through the sigmoid, which is only right if the map
            # increases (TargetScale refuses a version whose scale is not).
            kernel_constraint=keras.constraints.NonNeg(),
            name="logit",
        )(dot)
        loss: Any = keras.losses.BinaryCrossentropy()
        metrics: list[Any] = [keras.metrics.AUC(name="auc")]
    else:
        out = dot
        loss = keras.losses.MeanSquaredError()
        metrics = [keras.metrics.RootMeanSquaredError(name="rmse")]
    model = keras.Model(inputs, out, name="two_tower")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics)
    config = {
        "hidden_units": hidden,
        "embedding_dim": int(embedding_dim),
        "objective": objective,
        "learning_rate": float(learning_rate),
        "l2": float(l2),
        "dropout": float(dropout),
        "id_embeddings": n_items > 0,
    }
    if n_items > 0:
        config.update(id_l2=float(id_l2), n_items=int(n_items))
    return TwoTower(user, item, model, objective, config, id_embedding)


def embed(tower: keras.Model, features: np.ndarray, batch_size: int = 65_536) -> np.ndarray:
    """Runs a tower over many rows in fixed-size batches: float32 ``[n, D]``.

    Batches keep peak memory flat for million-item catalogues; calling the
    model directly avoids ``predict``'s per-call dataset overhead.
    """
    n = features.shape[0]
    dim = int(tower.output.shape[-1])
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, batch_size):
        chunk = np.asarray(features[start : start + batch_size], np.float32)
        out[start : start + len(chunk)] = np.asarray(tower(chunk, training=False))
    return out
