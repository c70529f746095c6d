"""LoRA for Conv2D: a low-rank update shaped as two convolutions.

As PEFT's Conv2d LoRA: `A` is a convolution with the base's kernel size,
strides, padding and dilation and `rank` filters, `B` a 1x1 convolution
from `rank` to the base's filters. Flattened, `A` is `(kh * kw * in,
rank)` and `B` `(rank, filters)`, so `scale * A @ B` reshaped is a
kernel-shaped update: `merge()` adds it to the kernel, exactly. MobileNet's
pointwise convolutions (`block_N_project`, `block_N_expand`) and a ResNet's
convolutions are Conv2D; depthwise convolutions are another class, not
adapted.
"""

import math

import keras
from keras import ops

from kft._keras_internals import kernel_variable
from kft.lora.base import _LoRAMixin

__all__ = ["LoRAConv2D"]


@keras.saving.register_keras_serializable(package="kft")
class LoRAConv2D(_LoRAMixin, keras.layers.Conv2D):
    """A Conv2D with a frozen kernel and a trainable low-rank update.

    Args:
        filters: as `keras.layers.Conv2D`.
        kernel_size: as `keras.layers.Conv2D`.
        rank: rank `r` of the update (the filters of `A`). Keras' Conv2D
            keeps its spatial rank (2) in `self.rank`; the LoRA rank is
            `self.adapter_rank`.
        alpha: as `kft.lora.LoRADense`.
        dropout: as `kft.lora.LoRADense`.
        use_rslora: as `kft.lora.LoRADense`.
        merged: as `kft.lora.LoRADense`.
        use_dora: as `kft.lora.LoRADense`.
        init: as `kft.lora.LoRADense`.
        **kwargs: `keras.layers.Conv2D` arguments (`groups` must be 1).

    Example:

    >>> layer = LoRAConv2D(4, 3, rank=2, padding="same")
    >>> tuple(layer(keras.ops.ones((1, 8, 8, 3))).shape)
    (1, 8, 8, 4)
    """

    _keras_owns_rank = True

    def __init__(self, filters, kernel_size, rank=8, alpha=16, dropout=0.0,
                 use_rslora=False, merged=False, use_dora=False, init="default",
                 **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._init_lora(rank, alpha, dropout, use_rslora, merged, use_dora, init)

    def _adapter_dims(self):
        if self.groups != 1:
            raise ValueError(
                f"LoRA supports Conv2D layers with groups=1. Received: layer "
                f"{self.name!r} with groups={self.groups}")
        self._delta_shape = self._kernel_shape()
        self._delta_axes = None
        self._output_dims = (self.filters,)
        return math.prod(self._delta_shape[:-1]), self.filters

    def _channel_shape(self):
        if self.data_format == "channels_last":
            return (self.filters,)
        return (self.filters, 1, 1)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_adapters()

    def _base_output(self, inputs):
        return self.convolution_op(
            inputs, ops.cast(kernel_variable(self), inputs.dtype))

    def _adapter_output(self, x, a, b):
        a = ops.reshape(a, (*self._delta_shape[:-1], self.adapter_rank))
        hidden = self.convolution_op(ops.cast(x, a.dtype), a)
        if self.data_format == "channels_last":
            return ops.matmul(hidden, b)
        hidden = ops.matmul(ops.moveaxis(hidden, 1, -1), b)
        return ops.moveaxis(hidden, -1, 1)

    def call(self, inputs, training=None):
        return self._finish(self._adapted(inputs, training))

    def _finish(self, outputs):
        if self.use_bias:
            bias = ops.reshape(self.bias, self._channel_shape())
            outputs = outputs + ops.cast(bias, outputs.dtype)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def get_config(self):
        return {**super().get_config(), **self._lora_config()}
