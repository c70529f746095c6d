"""`HeadConfig`: what goes on top of the backbone, as plain data.

Kept free of Keras so that recipes validate their `model.head` without
starting TensorFlow; `kft.heads` builds the layers. A pydantic model, as
`kft.stages.Stage` and `kft.lora.LoRAConfig` are: the Python API takes the
object or a dict of its fields, and a recipe's `model.head` is validated
by it.
"""

import pydantic

from kft.utils.validation import Strict

__all__ = ["HEAD_KINDS", "POOLINGS", "HeadConfig"]

HEAD_KINDS = ("multiclass", "binary", "multilabel", "regression")
POOLINGS = ("avg", "max", "flatten", "token")


class HeadConfig(Strict):
    """What goes on top of the backbone.

    Attributes:
        kind: `"multiclass"` (softmax), `"binary"` (one sigmoid unit),
            `"multilabel"` (one sigmoid per class) or `"regression"`
            (linear outputs).
        pooling: `"avg"`, `"max"`, `"flatten"`, or `"token"` (the first
            token of a transformer's sequence output: a ViT's class
            token). On a sequence output `"avg"` and `"max"` pool over
            the tokens.
        hidden: sizes of hidden Dense layers, e.g. `[128]`.
        activation: activation of the hidden layers.
        dropout: dropout rate before each Dense layer (0 for none).
        batch_norm: add BatchNormalization after each hidden layer.

    Example:

    >>> HeadConfig(hidden=128, dropout=0.5).hidden
    (128,)
    """

    kind: str = "multiclass"
    pooling: str = "avg"
    hidden: tuple = ()
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False

    @pydantic.field_validator("kind", "pooling")
    @classmethod
    def _known_name(cls, value, info):
        allowed = {"kind": HEAD_KINDS, "pooling": POOLINGS}[info.field_name]
        if value not in allowed:
            raise ValueError(f"Unknown head {info.field_name}. Expected one of "
                             f"{allowed}. Received: {info.field_name}={value!r}")
        return value

    @pydantic.field_validator("hidden", mode="before")
    @classmethod
    def _hidden_sizes(cls, value):
        hidden = (value,) if isinstance(value, int) else tuple(value or ())
        if any(isinstance(u, bool) or not isinstance(u, int) or u < 1
               for u in hidden):
            raise ValueError("head hidden sizes must be positive integers. "
                             f"Received: hidden={list(hidden)}")
        return hidden

    @pydantic.field_validator("dropout")
    @classmethod
    def _dropout_range(cls, value):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError("head dropout must be in [0, 1). Received: "
                             f"dropout={value!r}")
        return value

    @classmethod
    def from_value(cls, value):
        """Accepts `None`, a `HeadConfig` or a dict of its fields."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"Unknown head option(s) {unknown}. Allowed: "
                                 f"{sorted(cls.model_fields)}.")
            try:
                return cls(**value)
            except pydantic.ValidationError as error:
                # One plain sentence per problem (a recipe error quotes it).
                raise ValueError("; ".join(
                    e["msg"].removeprefix("Value error, ")
                    for e in error.errors())) from None
        raise ValueError(
            "head must be None, a dict or a kft.heads.HeadConfig. Received: "
            f"head={value!r}")
