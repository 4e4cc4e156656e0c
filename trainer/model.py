"""The two-tower model: a user tower and an item tower scored by a dot product.

Each tower maps a raw feature vector (exactly what :mod:`recsys.features`
builds) to an L2-normalised embedding. Feature normalisation is a Keras
``Normalization`` layer adapted on the training features and lives inside
the tower, so the exported SavedModel takes raw vectors and serving never
re-implements the scaling.

Prediction is the dot of the two embeddings, which lies in ``[-1, 1]``:

* ``objective="rating"``: the dot itself, trained with MSE against ratings
  scaled to ``[-1, 1]`` (:class:`recsys.features.TargetScale`).
* ``objective="binary"``: ``sigmoid(a * dot + b)`` with a learned scale
  ``a`` and bias ``b``, trained with binary cross-entropy on "liked"
  (rating >= 4). ``a`` and ``b`` are exported in the manifest's target so
  serving maps dots to probabilities the same way.
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
            pairs) and output ``[n, 1]``: the dot (rating) or the like probability (binary).
        objective: ``"rating"`` or ``"binary"``.
        config: The hyper-parameters it was built with (JSON-ready, for the manifest).
    """

    user_tower: keras.Model
    item_tower: keras.Model
    model: keras.Model
    objective: Objective
    config: dict[str, Any] = field(default_factory=dict)

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
    norm = keras.layers.Normalization(name=f"{name}_normalize")
    if sample is not None:
        if sample.ndim != 2 or sample.shape[1] != width:
            raise ValueError(
                f"{name} tower: sample has shape {sample.shape}, expected (n, {width})"
            )
        norm.adapt(np.asarray(sample, np.float32))
    else:
        # Identity scaling until adapted; keeps the model buildable without data.
        norm.adapt(np.stack([np.full(width, -1.0), np.full(width, 1.0)]).astype(np.float32))
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
    dot = keras.layers.Dot(axes=1, name="dot")([user(u_in), item(i_in)])
    if objective == "binary":
        # A learned affine map on the dot: cosine similarity alone cannot
        # reach confident probabilities, sigmoid(1) is only 0.73.
        out = keras.layers.Dense(
            1,
            activation="sigmoid",
            kernel_initializer=keras.initializers.Constant(5.0),
            name="logit",
        )(dot)
        loss: Any = keras.losses.BinaryCrossentropy()
        metrics: list[Any] = [keras.metrics.AUC(name="auc")]
    else:
        out = dot
        loss = keras.losses.MeanSquaredError()
        metrics = [keras.metrics.RootMeanSquaredError(name="rmse")]
    model = keras.Model([u_in, i_in], out, name="two_tower")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=metrics)
    config = {
        "hidden_units": hidden,
        "embedding_dim": int(embedding_dim),
        "objective": objective,
        "learning_rate": float(learning_rate),
        "l2": float(l2),
        "dropout": float(dropout),
    }
    return TwoTower(user, item, model, objective, config)


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
