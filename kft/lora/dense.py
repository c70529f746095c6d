"""LoRA for Dense and EinsumDense layers, on float or Keras-quantized
(int8, int4) kernels: QLoRA when the base is quantized.
"""

import math
import re

import keras
from keras import ops

from kft._keras_internals import kernel_variable
from kft.lora.base import QUANTIZED_MODES
from kft.lora.base import _LoRAMixin

__all__ = ["LoRADense", "LoRAEinsumDense"]


def check_quantize_mode(layer, mode, config):
    mode = mode or getattr(config, "mode", None)
    # NotImplementedError: `Model.quantize` then warns and skips the layer,
    # as it does for every layer that lacks a mode.
    if mode not in QUANTIZED_MODES:
        raise NotImplementedError(
            f"LoRA layer {layer.name!r} can quantize its frozen base to "
            f"{list(QUANTIZED_MODES)} only. Received: mode={mode!r}")
    if layer.use_dora:
        raise NotImplementedError(
            f"LoRA layer {layer.name!r} uses DoRA, whose column norms need the "
            f"float kernel at every step: it stays float. Received: mode={mode!r}")


class _QuantizableLoRA(_LoRAMixin):
    """Dense and EinsumDense LoRA: adapters built with the layer, a base
    that Keras' int8 / int4 modes can quantize, and training calls through
    `kft.lora.fused` (one matmul, no weight gradient)."""

    _fusable = True

    def build(self, input_shape):
        super().build(input_shape)
        self._build_adapters()

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the frozen base (`"int8"` or `"int4"`, as the Keras
        layer it extends does); the adapters stay float32."""
        check_quantize_mode(self, mode, config)
        keras_class = next(c for c in type(self).__mro__
                           if c.__module__.startswith("keras."))
        keras_class.quantize(self, mode, type_check=False, config=config)


@keras.saving.register_keras_serializable(package="kft")
class LoRADense(_QuantizableLoRA, keras.layers.Dense):
    """A Dense layer with a frozen kernel and a trainable low-rank update.

    Args:
        units: output size.
        rank: rank `r` of the update `A @ B`.
        alpha: the update is multiplied by `alpha / rank` (or
            `alpha / sqrt(rank)` with `use_rslora`).
        dropout: dropout on the adapter's input, while training.
        use_rslora: rank-stabilised scaling (Kalajdzievski, 2023).
        merged: whether the update is folded into the kernel.
        use_dora: DoRA (Liu et al. 2024): a trainable magnitude per output
            unit rescales `W + scale * A @ B` (`kft.lora.base`).
        init: how `A` and `B` start: `"default"`, `"gaussian"`, `"pissa"`
            or `"olora"` (PEFT's names; `kft.lora.initializers`).
        **kwargs: `keras.layers.Dense` arguments.

    `A` starts He-uniform and `B` at zeros, so a fresh adapter changes
    nothing; both are float32. Kernel and bias stay frozen. With an int8 /
    int4 dtype policy (`quantize()`), the base runs quantized (QLoRA).

    Example:

    >>> layer = LoRADense(4, rank=2, alpha=4)
    >>> tuple(layer(keras.ops.ones((1, 3))).shape)
    (1, 4)
    """

    def __init__(self, units, rank=8, alpha=16, dropout=0.0, use_rslora=False,
                 merged=False, use_dora=False, init="default", **kwargs):
        super().__init__(units, **kwargs)
        self._init_lora(rank, alpha, dropout, use_rslora, merged, use_dora, init)

    def _adapter_dims(self):
        self._contracted = 1
        self._output_dims = (self.units,)
        self._delta_shape = self._kernel_shape()
        self._delta_axes = None
        return self._delta_shape[0], self.units


    def _base_output(self, inputs):
        return ops.matmul(inputs, ops.cast(kernel_variable(self), inputs.dtype))

    def call(self, inputs, training=None):
        return self._finish(self._adapted(inputs, training))

    def get_config(self):
        return {**super().get_config(), **self._lora_config()}


def einsum_structure(equation, kernel_shape):
    """For `...x,xk->...k` style equations: the adapter's layout.

    The contracted axes must be the input's last axes (in any place in
    the kernel), and the output must be the input's other axes followed by
    the kernel's other axes in kernel order, so that `x @ A @ B` reshaped
    is the update. Returns `(contracted, output_dims, delta_shape,
    delta_axes)`: the number of contracted axes, the kernel's output dims,
    and how `A @ B` becomes a kernel-shaped update (reshape to
    `delta_shape`, then transpose by `delta_axes`, None when in order).
    """
    match = re.fullmatch(r"(\w+),(\w+)->(\w+)", equation.replace(" ", ""))
    if not match:
        raise ValueError(f"LoRA does not support the equation {equation!r}.")
    inputs, kernel, output = match.groups()
    contracted = [c for c in kernel if c not in output]
    free = [c for c in kernel if c in output]
    n = len(contracted)
    if (not n or sorted(inputs[-n:]) != sorted(contracted)
            or output != inputs[:-n] + "".join(free)):
        raise ValueError(
            f"LoRA supports EinsumDense equations that contract the input's "
            f"last axes with kernel axes and put the kernel's other axes last "
            f"(e.g. 'abc,cde->abde', 'btd,ndh->btnh'). Received: {equation!r}")
    dims = dict(zip(kernel, (int(d) for d in kernel_shape)))
    layout = inputs[-n:] + "".join(free)
    axes = tuple(layout.index(c) for c in kernel)
    return (n, tuple(dims[c] for c in free), tuple(dims[c] for c in layout),
            None if axes == tuple(range(len(axes))) else axes)


@keras.saving.register_keras_serializable(package="kft")
class LoRAEinsumDense(_QuantizableLoRA, keras.layers.EinsumDense):
    """An EinsumDense with a frozen kernel and a low-rank update.

    keras-hub attention uses EinsumDense for query, key, value
    (`abc,cde->abde`, Gemma's `btd,ndh->btnh`) and output
    (`abcd,cde->abe`). The input's contracted axes are flattened, so the
    update is `x @ A @ B` reshaped, never the full kernel (DoRA's norm is
    per output unit of that flattened `(fan_in, fan_out)` kernel).
    Arguments as `LoRADense`, plus EinsumDense's.
    """

    def __init__(self, equation, output_shape, rank=8, alpha=16, dropout=0.0,
                 use_rslora=False, merged=False, use_dora=False, init="default",
                 **kwargs):
        super().__init__(equation, output_shape, **kwargs)
        self._init_lora(rank, alpha, dropout, use_rslora, merged, use_dora, init)

    def _adapter_dims(self):
        (self._contracted, self._output_dims, self._delta_shape,
         self._delta_axes) = einsum_structure(self.equation, self._kernel_shape())
        fan_in = math.prod(self._delta_shape[: self._contracted])
        return fan_in, math.prod(self._output_dims)


    def _base_output(self, inputs):
        return ops.einsum(self.equation, inputs,
                          ops.cast(kernel_variable(self), inputs.dtype))

    def call(self, inputs, training=None):
        return self._finish(self._adapted(inputs, training))

    def get_config(self):
        return {**super().get_config(), **self._lora_config()}
