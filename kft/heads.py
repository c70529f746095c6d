"""Heads: pooling, hidden layers and the output for each kind of task.

The head kind decides the output activation, the loss and the metrics, so
a user picks a task, not three matching settings.
"""

import dataclasses

import keras

__all__ = [
    "HEAD_KINDS",
    "HeadConfig",
    "build_head",
    "head_kind",
    "loss_and_metrics",
    "outputs_logits",
]

HEAD_KINDS = ("multiclass", "binary", "multilabel", "regression")
POOLINGS = ("avg", "max", "flatten")
OUTPUT_LAYER = "head_output"


@dataclasses.dataclass
class HeadConfig:
    """What goes on top of the backbone.

    Args:
        kind: `"multiclass"` (softmax), `"binary"` (one sigmoid unit),
            `"multilabel"` (one sigmoid per class) or `"regression"`
            (linear outputs).
        pooling: `"avg"`, `"max"` or `"flatten"`.
        hidden: sizes of hidden Dense layers, e.g. `[128]`.
        activation: activation of the hidden layers.
        dropout: dropout rate before each Dense layer (0 for none).
        batch_norm: add BatchNormalization after each hidden layer.
    """

    kind: str = "multiclass"
    pooling: str = "avg"
    hidden: tuple = ()
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(
                f"Unknown head kind. Expected one of {HEAD_KINDS}. "
                f"Received: kind={self.kind!r}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"Unknown pooling. Expected one of {POOLINGS}. "
                f"Received: pooling={self.pooling!r}"
            )
        if isinstance(self.hidden, int):
            self.hidden = (self.hidden,)
        self.hidden = tuple(self.hidden or ())
        if any(not isinstance(u, int) or u < 1 for u in self.hidden):
            raise ValueError(
                "head hidden sizes must be positive integers. Received: "
                f"hidden={list(self.hidden)}"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(
                f"head dropout must be in [0, 1). Received: "
                f"dropout={self.dropout!r}"
            )

    @classmethod
    def from_value(cls, value):
        """Accepts `None`, a `HeadConfig` or a dict of its fields."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            allowed = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - allowed)
            if unknown:
                raise ValueError(
                    f"Unknown head option(s) {unknown}. Allowed: "
                    f"{sorted(allowed)}."
                )
            return cls(**value)
        raise ValueError(
            "head must be None, a dict or a kft.heads.HeadConfig. Received: "
            f"head={value!r}"
        )


def _output_units(kind, num_classes):
    if kind == "binary":
        if num_classes not in (1, 2):
            raise ValueError(
                "A binary head has one sigmoid output: use num_classes=1 "
                f"(or 2). Received: num_classes={num_classes}"
            )
        return 1
    return num_classes


def build_head(features, num_classes, head=None):
    """Applies the head layers to a backbone's feature map.

    All layers are named `head_*`, the output layer `head_output`, in
    float32 so that mixed precision never rounds the probabilities.

    Args:
        features: the backbone output tensor (a 4D feature map).
        num_classes: number of classes (or regression targets).
        head: a `HeadConfig` or a dict of its fields.

    Returns:
        The output tensor.
    """
    head = HeadConfig.from_value(head)
    pooling = {
        "avg": keras.layers.GlobalAveragePooling2D,
        "max": keras.layers.GlobalMaxPooling2D,
        "flatten": keras.layers.Flatten,
    }[head.pooling]
    x = pooling(name="head_pool")(features)
    for i, units in enumerate(head.hidden):
        if head.dropout:
            x = keras.layers.Dropout(head.dropout, name=f"head_dropout_{i}")(x)
        x = keras.layers.Dense(
            units, activation=head.activation, name=f"head_dense_{i}"
        )(x)
        if head.batch_norm:
            x = keras.layers.BatchNormalization(name=f"head_bn_{i}")(x)
    if head.dropout:
        x = keras.layers.Dropout(head.dropout, name="head_dropout")(x)
    activation = {
        "multiclass": "softmax",
        "binary": "sigmoid",
        "multilabel": "sigmoid",
        "regression": "linear",
    }[head.kind]
    return keras.layers.Dense(
        _output_units(head.kind, num_classes),
        activation=activation,
        dtype="float32",
        name=OUTPUT_LAYER,
    )(x)


def _task_logits_layer(model):
    """The output Dense of a keras-hub classifier task, if `model` is one."""
    layer = getattr(model, "output_dense", None)
    if isinstance(layer, keras.layers.Dense) and getattr(
            model, "num_classes", None):
        return layer
    return None


def head_kind(model):
    """Infers the head kind of a kft model from its output layer.

    keras-hub classifier tasks (`kft.build_text_classifier`) count as
    `"multiclass"` (their logits are read with `outputs_logits`).
    """
    try:
        output = model.get_layer(OUTPUT_LAYER)
    except ValueError:
        if _task_logits_layer(model) is not None:
            return "multiclass"
        raise ValueError(
            f"Model {model.name!r} has no layer {OUTPUT_LAYER!r}; it was not "
            "built by kft.build_classifier. Pass loss and metrics yourself."
        ) from None
    activation = keras.activations.serialize(output.activation)
    if isinstance(activation, dict):
        activation = activation.get("config", {}).get("name", activation)
    if activation == "softmax":
        return "multiclass"
    if activation == "sigmoid":
        return "binary" if output.units == 1 else "multilabel"
    return "regression"


def outputs_logits(model):
    """Whether a classifier outputs logits (keras-hub tasks without an
    activation) rather than probabilities."""
    layer = _task_logits_layer(model)
    if layer is None:
        return False
    return keras.activations.serialize(layer.activation) in (None, "linear")


def loss_and_metrics(kind, one_hot=False, from_logits=False):
    """Returns `(loss, metrics)` for a head kind.

    Args:
        kind: one of `HEAD_KINDS`.
        one_hot: for `"multiclass"`, whether labels are one-hot vectors
            rather than integer class indices.
        from_logits: for `"multiclass"`, whether the model outputs logits
            (keras-hub classifier tasks) instead of softmax probabilities.
    """
    if kind == "multiclass":
        if from_logits:
            loss = (keras.losses.CategoricalCrossentropy if one_hot
                    else keras.losses.SparseCategoricalCrossentropy)
            return loss(from_logits=True), ["accuracy"]
        if one_hot:
            return "categorical_crossentropy", ["accuracy"]
        return "sparse_categorical_crossentropy", ["accuracy"]
    if kind == "binary":
        return "binary_crossentropy", [
            keras.metrics.BinaryAccuracy(name="accuracy")
        ]
    if kind == "multilabel":
        return "binary_crossentropy", [
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(multi_label=True, name="auc"),
        ]
    if kind == "regression":
        return "mse", [keras.metrics.MeanAbsoluteError(name="mae")]
    raise ValueError(
        f"Unknown head kind. Expected one of {HEAD_KINDS}. Received: {kind!r}"
    )
