"""LoRA for Embedding: a low-rank update of the table, looked up.

As PEFT's Embedding LoRA: `A` `(vocab, rank)` is looked up by the token
ids and multiplied by `B` `(rank, dim)`, so `scale * A @ B` is a
table-shaped update that `merge()` adds to the table. `A` starts at
zero and `B` standard normal (PEFT's choice for embeddings, under
`init="default"` and `"gaussian"` alike), so a fresh adapter changes
nothing; there is no dropout on token ids (PEFT applies none either).

keras-hub's token embeddings are `ReversibleEmbedding`s, which also
project hidden states back to the vocabulary (`reverse=True`: a tied LM
head). `LoRAReversibleEmbedding` applies the update there too, with the
same tied table (`logits = x @ (W + scale A B)^T`), so the merged model
computes exactly what the adapted one did. (PEFT leaves a tied `lm_head`
without the update until merging, which then changes it.) An untied
reverse projection stays frozen and unadapted.
"""

import keras
from keras import ops

from kft._keras_internals import embeddings_variable
from kft.lora.base import _LoRAMixin

__all__ = ["LoRAEmbedding", "LoRAReversibleEmbedding"]


class _LoRAEmbeddingMixin(_LoRAMixin):
    """The table lookup both LoRA embedding classes share."""

    def _kernel_shape(self):
        return (self.input_dim, self.output_dim)

    def _base_kernel(self):
        return embeddings_variable(self)

    def _frozen_variables(self):
        reverse = getattr(self, "reverse_embeddings", None)
        return [self._base_kernel()] + ([reverse] if reverse is not None else [])

    def _initializers(self):
        return "zeros", keras.initializers.RandomNormal(stddev=1.0)

    def _adapter_dims(self):
        self._delta_shape = self._kernel_shape()
        self._delta_axes = None
        self._output_dims = (self.output_dim,)
        return self._delta_shape

    def build(self, input_shape=None):
        super().build(input_shape)
        self._build_adapters()

    def _base_output(self, ids):
        return ops.take(self._base_kernel(), ids, axis=0)

    def _adapter_output(self, ids, a, b):
        return ops.matmul(ops.take(a, ids, axis=0), b)

    def _lookup(self, inputs):
        if keras.backend.standardize_dtype(inputs.dtype) not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        return ops.cast(self._adapted(inputs, training=False), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), **self._lora_config()}


@keras.saving.register_keras_serializable(package="kft")
class LoRAEmbedding(_LoRAEmbeddingMixin, keras.layers.Embedding):
    """An Embedding with a frozen table and a trainable low-rank update.

    Args:
        input_dim: as `keras.layers.Embedding`.
        output_dim: as `keras.layers.Embedding`.
        rank: as `kft.lora.LoRADense`.
        alpha: as `kft.lora.LoRADense`.
        use_rslora: as `kft.lora.LoRADense`.
        merged: as `kft.lora.LoRADense`.
        use_dora: as `kft.lora.LoRADense` (DoRA's norm is per embedding
            dimension, over the vocabulary, as PEFT's).
        init: as `kft.lora.LoRADense`; `init="pissa"` / `"olora"`
            factor the table.
        dropout: kept in the config; not applied (token ids).
        **kwargs: `keras.layers.Embedding` arguments.

    Example:

    >>> layer = LoRAEmbedding(10, 4, rank=2)
    >>> tuple(layer(keras.ops.array([[1, 2, 3]])).shape)
    (1, 3, 4)
    """

    def __init__(self, input_dim, output_dim, rank=8, alpha=16, dropout=0.0,
                 use_rslora=False, merged=False, use_dora=False, init="default",
                 **kwargs):
        super().__init__(input_dim, output_dim, **kwargs)
        self._init_lora(rank, alpha, dropout, use_rslora, merged, use_dora, init)

    def call(self, inputs):
        return self._lookup(inputs)


@keras.saving.register_keras_serializable(package="kft")
class LoRAReversibleEmbedding(_LoRAEmbeddingMixin, keras.layers.ReversibleEmbedding):
    """A ReversibleEmbedding (keras-hub's token embeddings) with a frozen
    table and a low-rank update, in both directions when the weights are
    tied. Arguments as `LoRAEmbedding`, plus ReversibleEmbedding's."""

    def __init__(self, input_dim, output_dim, rank=8, alpha=16, dropout=0.0,
                 use_rslora=False, merged=False, use_dora=False, init="default",
                 **kwargs):
        super().__init__(input_dim, output_dim, **kwargs)
        self._init_lora(rank, alpha, dropout, use_rslora, merged, use_dora, init)

    def call(self, inputs, reverse=False):
        if not reverse:
            return self._lookup(inputs)
        if not self.tie_weights:
            return super().call(inputs, reverse=True)
        return self._soft_cap(self._tied_logits(inputs))

    def _tied_logits(self, inputs):
        """`x @ (W + scale A B)^T` (DoRA: `W'` scaled per dimension, which
        scales `x` per dimension), without forming the full table."""
        x = inputs
        if self.use_dora:
            x = x * ops.cast(self._dora_factor_minus_one() + 1.0, x.dtype)
        dtype = self.reverse_dtype or x.dtype
        x = ops.cast(x, dtype)
        logits = ops.matmul(x, ops.cast(ops.transpose(self._base_kernel()), dtype))
        # In the logits' dtype: a float32 update would be vocabulary-sized.
        a, b = self._factors(keras.backend.standardize_dtype(logits.dtype))
        update = ops.matmul(ops.matmul(ops.cast(x, b.dtype), ops.transpose(b)),
                            ops.transpose(a))
        return logits + update

    def _soft_cap(self, logits):
        if self.logit_soft_cap is None:
            return logits
        cap = self.logit_soft_cap
        return ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)

    def compute_mask(self, inputs, mask=None):
        # ReversibleEmbedding sets its mask inside `call`; this one lets
        # Keras set it from here, for token ids only (a reverse call gets
        # float hidden states, whose output is logits: no mask).
        if "int" not in keras.backend.standardize_dtype(inputs.dtype):
            return None
        return keras.layers.Embedding.compute_mask(self, inputs, mask)
