"""Heads: pooling, hidden layers and the output for each kind of task.

The head kind decides the output activation, the loss and the metrics, so
a user picks a task, not three matching settings.
"""

import keras

from kft.backbones.anatomy import HEAD_OUTPUT
from kft.backbones.anatomy import describe
from kft.models.head_config import HEAD_KINDS
from kft.models.head_config import HeadConfig

__all__ = [
    "FirstToken",
    "HEAD_KINDS",
    "HeadConfig",
    "build_head",
    "head_kind",
    "loss_and_metrics",
    "outputs_logits",
]

OUTPUT_LAYER = HEAD_OUTPUT


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
        features: the backbone output: a 4D feature map (CNN) or a 3D
            token sequence (ViT, DINOv2).
        num_classes: number of classes (or regression targets).
        head: a `HeadConfig` or a dict of its fields.

    Returns:
        The output tensor.
    """
    head = HeadConfig.from_value(head)
    x = _pool(features, head.pooling)
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


@keras.saving.register_keras_serializable(package="kft")
class FirstToken(keras.layers.Layer):
    """`(batch, tokens, features) -> (batch, features)`: the first token (a
    ViT's class token), as a layer that saves and reloads in safe mode."""

    def call(self, inputs):
        return inputs[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


def _pool(features, pooling):
    """Feature map or token sequence -> one vector per example."""
    rank = len(features.shape)
    if rank not in (3, 4):
        raise ValueError(
            "The backbone output must be a feature map (batch, height, width, "
            "channels) or a token sequence (batch, tokens, features). "
            f"Received shape: {features.shape}")
    if pooling == "token":
        if rank != 3:
            raise ValueError(
                "pooling='token' needs a token sequence (a transformer "
                f"backbone); this backbone outputs {features.shape}.")
        return FirstToken(name="head_pool")(features)
    layer = {
        ("avg", 4): keras.layers.GlobalAveragePooling2D,
        ("max", 4): keras.layers.GlobalMaxPooling2D,
        ("avg", 3): keras.layers.GlobalAveragePooling1D,
        ("max", 3): keras.layers.GlobalMaxPooling1D,
    }.get((pooling, rank), keras.layers.Flatten)
    return layer(name="head_pool")(features)


def head_kind(model):
    """The head kind of a model (`kft.describe(model).head_kind`).

    keras-hub classifier tasks (`kft.build_text_classifier`) count as
    `"multiclass"` (`outputs_logits` says they output logits).

    Raises:
        ValueError: when the model has no head kft recognises.
    """
    kind = describe(model).head_kind
    if kind is None:
        raise ValueError(
            f"Model {model.name!r} has no head kft recognises (no layer "
            f"{OUTPUT_LAYER!r}, not a keras-hub classifier). Pass loss and "
            "metrics yourself.")
    return kind


def outputs_logits(model):
    """Whether a classifier outputs logits (keras-hub tasks without an
    activation) rather than probabilities."""
    return describe(model).logits


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
