"""`HeadConfig`: what goes on top of the backbone, as plain data.

Kept free of Keras so that recipes validate their `model.head` without
starting TensorFlow; `kft.heads` builds the layers.
"""

import dataclasses

__all__ = ["HEAD_KINDS", "POOLINGS", "HeadConfig"]

HEAD_KINDS = ("multiclass", "binary", "multilabel", "regression")
POOLINGS = ("avg", "max", "flatten", "token")


@dataclasses.dataclass
class HeadConfig:
    """What goes on top of the backbone.

    Args:
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
