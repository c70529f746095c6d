"""`LoRAConfig`: one LoRA set-up, as plain data.

The object a user passes to `kft.lora.apply_lora` (or a dict of its
fields), and what a recipe's `lora:` section is (`kft.recipes.schema`
extends it with the recipe's defaults). Kept free of Keras, so recipes
validate without starting TensorFlow.
"""

from typing import Literal

from pydantic import Field

from kft.utils.validation import Strict

__all__ = ["LoRAConfig"]


class LoRAConfig(Strict):
    """Which layers get LoRA adapters, and how (`kft.lora.apply_lora`).

    Attributes:
        targets: layer-name substrings or regexes, or a preset:
            `"attention"`, `"mlp"`, `"all-linear"` (keras-hub
            transformers), `"pointwise"` (every 1x1 `Conv2D`).
        rank: the adapters' rank `r`.
        alpha: the scale numerator: updates are `alpha / r * x @ A @ B`
            (`alpha / sqrt(r)` with `use_rslora`).
        dropout: dropout on the adapters' input (0: none, and no dropout
            state at all).
        use_rslora: rank-stabilised scaling, `alpha / sqrt(r)`.
        use_dora: DoRA: a trainable magnitude per output unit.
        init: `"default"` (A random, B zero), `"gaussian"`, `"pissa"` or
            `"olora"` (A and B from the kernel, which keeps the residual).
        trainable: other layers that keep training, such as a head (PEFT's
            `modules_to_save`).
        lr_ratio: LoRA+: the B matrices train at this multiple of the
            stage's learning rate (`kft.optimizers.loraplus`; `None`: the
            same rate). Read by the stages, not by `apply_lora`.

    Example:

    >>> config = LoRAConfig(targets="all-linear", rank=16, alpha=32)
    >>> config.rank
    16
    """

    targets: str | list[str] = ["query", "value"]
    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    use_rslora: bool = False
    use_dora: bool = False
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    trainable: list[str] = []
    lr_ratio: float | None = Field(default=None, gt=0)

    @classmethod
    def from_value(cls, value):
        """Accepts a `LoRAConfig` or a dict of its fields."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.model_validate(value)
        raise ValueError("A LoRA config is a kft.lora.LoRAConfig or a dict of "
                         f"its fields. Received: {value!r}")

    def apply_kwargs(self):
        """The keyword arguments of `apply_lora` this config stands for."""
        targets = self.targets if isinstance(self.targets, str) else tuple(
            self.targets)
        return {"targets": targets, "rank": self.rank, "alpha": self.alpha,
                "dropout": self.dropout, "use_rslora": self.use_rslora,
                "trainable": tuple(self.trainable), "use_dora": self.use_dora,
                "init": self.init}
