"""LoRA for Keras: low-rank adapters on frozen Dense layers.

`LoRADense` computes `x @ W + b + (alpha / rank) * dropout(x) @ A @ B`
with `W` frozen, so the full weight gradient is never formed (Keras'
`Dense.enable_lora` rebuilds the merged kernel every step), supports
dropout, `merge()` / `unmerge()`, and saves its adapters as weights of
their own.

Not yet here (issue #6): the EinsumDense variant, `apply_lora`,
`merge_lora`, adapter-only files and prompt tuning.
"""

import math

import keras
from keras import ops

__all__ = ["LoRADense"]


@keras.saving.register_keras_serializable(package="kft")
class LoRADense(keras.layers.Dense):
    """A Dense layer with a frozen kernel and a trainable low-rank update.

    Args:
        units: output size.
        rank: rank `r` of the update `A @ B`.
        alpha: scale numerator: the update is multiplied by `alpha / rank`
            (or `alpha / sqrt(rank)` with `use_rslora`).
        dropout: dropout on the adapter's input, while training.
        use_rslora: rank-stabilised scaling (Kalajdzievski, 2023).
        merged: whether the update is folded into the kernel (see
            `merge`).
        **kwargs: `keras.layers.Dense` arguments.

    `A` starts He-uniform and `B` at zeros, so a fresh adapter changes
    nothing; both are float32 whatever the dtype policy (LoRA weights
    underflow in float16).

    Example:

    >>> layer = LoRADense(4, rank=2, alpha=4)
    >>> layer(keras.ops.ones((1, 3))).shape
    (1, 4)
    """

    def __init__(self, units, rank=8, alpha=16, dropout=0.0, use_rslora=False,
                 merged=False, **kwargs):
        super().__init__(units, **kwargs)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(
                f"rank must be an integer >= 1. Received: rank={rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"dropout must be in [0, 1). Received: dropout={dropout!r}")
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.merged = bool(merged)
        self._adapter_dropout = keras.layers.Dropout(self.dropout)

    @property
    def scale(self):
        root = math.sqrt(self.rank) if self.use_rslora else self.rank
        return self.alpha / root

    def add_weight(self, *args, **kwargs):
        # The pretrained kernel is created non-trainable, so that no
        # `trainable = True` (Keras' or kft.unfreeze) can unfreeze it.
        if kwargs.get("name") == "kernel":
            kwargs["trainable"] = False
        return super().add_weight(*args, **kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        input_dim = input_shape[-1]
        self.lora_a = self.add_weight(
            name="lora_a", shape=(input_dim, self.rank),
            initializer=keras.initializers.HeUniform(), dtype="float32")
        self.lora_b = self.add_weight(
            name="lora_b", shape=(self.rank, self.units),
            initializer="zeros", dtype="float32")

    def _delta(self):
        return ops.matmul(self.lora_a, self.lora_b) * self.scale

    def call(self, inputs, training=None):
        outputs = ops.matmul(inputs, ops.cast(self._kernel, inputs.dtype))
        if not self.merged:
            x = self._adapter_dropout(inputs, training=training)
            update = ops.matmul(ops.matmul(ops.cast(x, "float32"), self.lora_a),
                                self.lora_b) * self.scale
            outputs = outputs + ops.cast(update, outputs.dtype)
        if self.use_bias:
            outputs = outputs + ops.cast(self.bias, outputs.dtype)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def merge(self):
        """Folds `scale * A @ B` into the kernel; output unchanged."""
        if not self.merged:
            self._kernel.assign(self._kernel + ops.cast(self._delta(),
                                                        self._kernel.dtype))
            self.merged = True

    def unmerge(self):
        """Takes the update back out of the kernel."""
        if self.merged:
            self._kernel.assign(self._kernel - ops.cast(self._delta(),
                                                        self._kernel.dtype))
            self.merged = False

    # Dense customises weight saving for its own LoRA and quantization;
    # the plain Layer behaviour stores every variable, adapters included.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)

    def get_config(self):
        config = super().get_config()
        config.update({"rank": self.rank, "alpha": self.alpha,
                       "dropout": self.dropout, "use_rslora": self.use_rslora,
                       "merged": self.merged})
        return config
