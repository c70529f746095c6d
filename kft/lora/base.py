"""What every kft LoRA layer shares, whatever Keras layer it extends.

A LoRA layer sees its frozen kernel flattened to `(fan_in, fan_out)` (a
Dense kernel as it is, an EinsumDense kernel with its contracted axes
first, a Conv2D kernel `(kh * kw * in, filters)`, an Embedding table
`(vocab, dim)`), and adds `scale * x @ A @ B` to the layer's output, with
`A` `(fan_in, r)` and `B` `(r, fan_out)` float32 and trainable. Each
class says how to run its base (`_base_output`) and its adapter
(`_adapter_output`) on an input; this mixin does the rest: building the
adapters (`kft.lora.initializers` for PiSSA / OLoRA), DoRA, merge and unmerge,
weight saving and the config.

The adapters run in the compute dtype. `A` and `B` are float32 masters
(so are their gradients and optimizer state), cast for the step to the
dtype of the base's output, with the scale folded into the cast of `B`,
an `(r, fan_out)` multiply: no activation is upcast to float32 or kept
for the backward pass in float32.

No flag is part of a step's state. `merge()` and
`kft.lora.disable_adapters` *park* the adapter: its `B` (and DoRA's
magnitude) move to the host and the variables hold what makes the update
vanish (`B = 0`; a magnitude equal to the kernel's column norms), so
functions traced before keep running, exactly, without a retrace; the
parked values come back on `unmerge()` / `enable_adapters`, and are what
saving writes and adapter files hold (`trained_value`). Steps traced
while merged leave the update out. Inside a traced step (a DPO or GRPO
reference pass) `kft.lora.adapters.adapters_disabled` leaves it out of
the calls in its block, a Python flag read when the step is traced.

Under a float32 policy nothing is cast and the update is `x @ A @ (scale
* B)`, the same numbers as `scale * (x @ A @ B)` to float32 rounding.

DoRA (Liu et al. 2024, `use_dora=True`) gives each output unit a
trainable float32 magnitude `m`, initialised to the column norms of `W +
scale * A @ B`, and computes `m * (W + scale * A @ B) / ||W + scale * A @
B||_c`, the norm taken over the fan-in of each output unit. As PEFT
(`weight_norm.detach()`, the paper's section 4.3), no gradient flows
through the norm: it is recomputed from the current `A`, `B` at every
step but treated as a constant, which saves the backward pass through
the full `(fan_in, fan_out)` matrix. The norm is not formed from that
matrix either: `||W + s A B||^2 = ||W||^2 + 2 s <W, A B> + s^2 ||A B||^2`
per column, where `<W, A B>` and `||A B||^2` are rank-sized contractions
of `A^T W` (computed in the compute dtype) and of `A^T A`. The layer
runs it as PEFT does, `base(x) + (m / norm - 1) * base(x) + m / norm *
scale * lora(x)`, so a magnitude near 1 keeps its precision under mixed
precision.
"""

import math

import keras
import numpy as np
from keras import ops

from kft._keras_internals import all_layers
from kft._keras_internals import grouped_int4_kernel
from kft._keras_internals import kernel_variable
from kft._keras_internals import requantized_kernel
from kft.lora.fused import fused_lora_matmul
from kft.lora.initializers import KERNEL_INITS
from kft.lora.initializers import check_init
from kft.lora.initializers import olora_factors
from kft.lora.initializers import pissa_factors

__all__ = ["ADAPTER_VARIABLES", "QUANTIZED_MODES", "lora_layers"]

# Every variable a LoRA layer adds to its base (none of them is the base).
ADAPTER_VARIABLES = ("lora_a", "lora_b", "lora_magnitude", "lora_a_init",
                     "lora_b_init")
# What files written before the flag became a Python one hold per layer.
_LEGACY_FLAG = "lora_active"
# The Keras quantization modes a LoRA base may have (besides float).
QUANTIZED_MODES = ("int8", "int4")
# The pretrained weights, created non-trainable in a LoRA layer.
_FROZEN = ("kernel", "bias", "embeddings", "reverse_embeddings")
# DoRA divides by column norms: a zero column (a zero-initialised
# projection) has magnitude 0 and keeps a factor of 0, not 0 / 0.
_NORM_FLOOR = 1e-12


class _LoRAMixin:
    """What LoRADense, LoRAEinsumDense, LoRAConv2D and LoRAEmbedding share."""

    # Keras' Conv layers use `self.rank` for their spatial rank; the LoRA
    # rank is always `adapter_rank`, and `rank` too where Keras leaves it.
    _keras_owns_rank = False

    def _init_lora(self, rank, alpha, dropout, use_rslora, merged,
                   use_dora=False, init="default"):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(
                f"rank must be an integer >= 1. Received: rank={rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"dropout must be in [0, 1). Received: dropout={dropout!r}")
        self.adapter_rank = rank
        if not self._keras_owns_rank:
            self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.merged = bool(merged)
        self.use_dora = bool(use_dora)
        self.init = check_init(init)
        self._kft_adapter_off = False  # in an `adapters_disabled` block
        self._kft_parked = None  # {name: host array} while merged or off

    @property
    def adapter_enabled(self):
        """Whether calls traced now add the update (not merged, not in an
        `adapters_disabled` block)."""
        return not self.merged and not self._kft_adapter_off

    def _park(self):
        """Moves `B` (and DoRA's magnitude) to the host and makes the
        variables' update vanish: `B = 0`, magnitude = the column norms of
        the kernel as it is now (a DoRA factor of 1)."""
        if self._kft_parked is not None:
            return
        self._kft_parked = {"lora_b": np.array(self.lora_b)}
        self.lora_b.assign(np.zeros(self.lora_b.shape, "float32"))
        if self.use_dora:
            self._kft_parked["lora_magnitude"] = np.array(self.lora_magnitude)
            self.lora_magnitude.assign(self._column_norms())

    def _unpark(self):
        for name, value in (self._kft_parked or {}).items():
            getattr(self, name).assign(value)
        self._kft_parked = None

    @property
    def _switched_off(self):
        """Parked by `kft.lora.disable_adapters` (parked, not merged)."""
        return self._kft_parked is not None and not self.merged

    def trained_value(self, name):
        """The adapter variable `name` (`"lora_a"`, `"lora_b"`,
        `"lora_magnitude"`) as trained: its parked host copy while the
        layer is merged or switched off, else the variable."""
        parked = self._kft_parked or {}
        return parked[name] if name in parked else getattr(self, name)

    def assign_trained(self, name, value):
        """Sets the adapter variable `name` as trained (into its parked copy
        while parked, so it comes back on unpark)."""
        if self._kft_parked and name in self._kft_parked:
            self._kft_parked[name] = np.asarray(value)
        else:
            getattr(self, name).assign(value)

    @property
    def scale(self):
        rank = self.adapter_rank
        return self.alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def add_weight(self, *args, **kwargs):
        # The pretrained weights are created non-trainable, so no
        # `trainable = True` (Keras' or kft.unfreeze) can unfreeze them.
        if kwargs.get("name") in _FROZEN:
            kwargs["trainable"] = False
        return super().add_weight(*args, **kwargs)

    def _kernel_shape(self):
        # `kernel` (public) is the unpacked kernel: int4 stores it packed.
        return tuple(int(d) for d in self.kernel.shape)

    def _base_kernel(self):
        """The frozen kernel variable (Embedding: its table)."""
        return kernel_variable(self)

    def _frozen_variables(self):
        return [v for v in (self._base_kernel(), self.bias) if v is not None]

    def _channel_shape(self):
        """How a `(fan_out,)` vector broadcasts against the output."""
        return self._output_dims

    def _initializers(self):
        """`(A, B)` initializers: PiSSA / OLoRA overwrite them."""
        if self.init == "gaussian":
            return (keras.initializers.RandomNormal(stddev=1.0 / self.adapter_rank),
                    "zeros")
        return keras.initializers.HeUniform(), "zeros"

    def _build_adapters(self):
        self._fans = self._adapter_dims()
        self._check_variant()
        fan_in, fan_out = self._fans
        # Random state only where there is dropout (it is state of every
        # train step, and saved).
        self._dropout_seed = (keras.random.SeedGenerator() if self.dropout
                              else None)
        a_init, b_init = self._initializers()
        # float32 whatever the dtype policy, and not cast to the compute
        # dtype when read (autocast=False): LoRA updates underflow in fp16.
        self.lora_a = self.add_weight(
            name="lora_a", shape=(fan_in, self.adapter_rank), initializer=a_init,
            dtype="float32", autocast=False)
        self.lora_b = self.add_weight(
            name="lora_b", shape=(self.adapter_rank, fan_out), initializer=b_init,
            dtype="float32", autocast=False)
        if self.init in KERNEL_INITS:
            self._initialize_from_kernel()
        if self.use_dora:
            self.lora_magnitude = self.add_weight(
                name="lora_magnitude", shape=(fan_out,), initializer="ones",
                dtype="float32", autocast=False)
            self.lora_magnitude.assign(self._column_norms())

    def _check_variant(self):
        if self.quantization_mode and (self.use_dora or self.init in KERNEL_INITS):
            raise ValueError(
                f"LoRA layer {self.name!r}: use_dora=True and init='pissa' / "
                "'olora' need the float kernel; this one is quantized "
                f"({self.quantization_mode!r}). For QLoRA with PiSSA, apply "
                "init='pissa' to the float model, then `model.quantize(...)` "
                f"quantizes the residual. Received: use_dora={self.use_dora}, "
                f"init={self.init!r}")

    def _initialize_from_kernel(self):
        """PiSSA / OLoRA: A, B from the kernel, which becomes the residual;
        the starting A0, B0 are kept for `plain_lora_weights`."""
        flat = np.asarray(self._flat_kernel(), "float32")
        if self.init == "pissa":
            a, b = pissa_factors(flat, self.adapter_rank, self.scale)
        else:
            a, b = olora_factors(flat, self.adapter_rank)
        for name, value in (("lora_a_init", a), ("lora_b_init", b)):
            variable = self.add_weight(
                name=name, shape=value.shape, initializer="zeros",
                trainable=False, dtype="float32", autocast=False)
            variable.assign(value)
            setattr(self, name, variable)
        self.lora_a.assign(a)
        self.lora_b.assign(b)
        kernel = self._base_kernel()
        residual = flat - self.scale * (a @ b)
        kernel.assign(ops.cast(self._to_kernel(residual), kernel.dtype))

    def _flat_kernel(self, kernel=None):
        """The kernel (or `kernel`, in its layout) as `(fan_in, fan_out)`
        (the adapters' layout)."""
        kernel = self._base_kernel() if kernel is None else kernel
        if self._delta_axes is not None:
            inverse = tuple(int(i) for i in np.argsort(self._delta_axes))
            kernel = ops.transpose(kernel, inverse)
        return ops.reshape(kernel, self._fans)

    def _to_kernel(self, flat):
        """A `(fan_in, fan_out)` matrix in the kernel's (unpacked) layout."""
        kernel = ops.reshape(flat, self._delta_shape)
        if self._delta_axes is not None:
            kernel = ops.transpose(kernel, self._delta_axes)
        return kernel

    def _delta_kernel(self):
        """`scale * A @ B` in the kernel's (unpacked) layout."""
        return self._to_kernel(ops.matmul(self.lora_a, self.lora_b) * self.scale)

    def _column_norms(self):
        """DoRA's `||W + scale * A @ B||` per output unit (float32), of the
        kernel as `call` reads it: rounded to the compute dtype (under
        mixed precision Keras autocasts it there, and not elsewhere), so
        that a fresh magnitude gives a factor of 1.

        Without the `(fan_in, fan_out)` matrix `W + scale * A @ B`: per
        column, `||W||^2 + 2 s <W, A B> + s^2 ||A B||^2`, with `<W, A B> =
        sum_r B * (A^T W)` (`A^T W` in the compute dtype) and `||A B||^2 =
        sum_r B * (A^T A B)`.
        """
        kernel = ops.cast(self._flat_kernel(), self.compute_dtype)
        a, b, s = self.lora_a, self.lora_b, self.scale
        squares = ops.sum(ops.square(ops.cast(kernel, "float32")), axis=0)
        projected = ops.matmul(ops.transpose(ops.cast(a, kernel.dtype)), kernel)
        cross = ops.sum(b * ops.cast(projected, "float32"), axis=0)
        update = ops.sum(b * ops.matmul(ops.matmul(ops.transpose(a), a), b),
                         axis=0)
        total = squares + (2.0 * s) * cross + (s * s) * update
        return ops.sqrt(ops.maximum(total, 0.0))

    def _dora_factor_minus_one(self):
        """`m / ||W + s A B|| - 1`, no gradient through the norm (PEFT's
        `weight_norm.detach()`)."""
        norm = ops.stop_gradient(ops.maximum(self._column_norms(), _NORM_FLOOR))
        factor = self.lora_magnitude / norm - 1.0
        return ops.reshape(factor, self._channel_shape())

    def _dropped(self, inputs, training):
        if training and self.dropout:
            return keras.random.dropout(inputs, self.dropout, seed=self._dropout_seed)
        return inputs

    def _factors(self, dtype):
        """`A` and `scale * B`, cast to `dtype` for the step (their
        gradients flow back to the float32 masters)."""
        b = self.lora_b * self.scale
        return ops.cast(self.lora_a, dtype), ops.cast(b, dtype)

    def _adapter_output(self, x, a, b):
        """`x @ a @ b` in the output's layout, the contracted axes of `x`
        flattened (Dense, EinsumDense; others override)."""
        free = len(x.shape) - self._contracted
        batch_shape = ops.shape(x)[:free]
        flat = ops.reshape(ops.cast(x, a.dtype), (*batch_shape, -1))
        update = ops.matmul(ops.matmul(flat, a), b)
        return ops.reshape(update, (*batch_shape, *self._output_dims))

    def _update(self, inputs, dtype, training):
        """`(dropped inputs, scale * dropout(x) @ A @ B)`, the update in
        `dtype` (the base output's) and the output's layout. With a
        `kft.lora.shared.SharedInput` group, `x @ A` (and the dropout mask,
        one for the group) come from the group."""
        dtype = keras.backend.standardize_dtype(dtype)
        group = getattr(self, "_kft_shared_input", None)
        if group is None:
            x = self._dropped(inputs, training)
            return x, self._adapter_output(x, *self._factors(dtype))
        update = group.update(self, inputs, dtype, training)
        shape = (*ops.shape(inputs)[:-1], *self._output_dims)
        return inputs, ops.reshape(update, shape)

    def _adapted(self, inputs, training):
        """The base output plus the (DoRA-scaled) update, before the bias
        and the activation."""
        if training and self._fuses():
            group = getattr(self, "_kft_shared_input", None)
            if group is not None:
                return group.fused(self, inputs)
            return self._fused_output(inputs)
        base = self._base_output(inputs)
        if not self.adapter_enabled:
            return base
        # (A group holds no DoRA layer with dropout: `x` is the dropped
        # input for DoRA's base term below.)
        x, update = self._update(inputs, base.dtype, training)
        if not self.use_dora:
            return base + update
        excess = self._dora_factor_minus_one()
        if x is inputs and base.dtype == "float32":
            return (base + update) * (excess + 1.0)
        excess = ops.cast(excess, base.dtype)
        # PEFT, with dropout in training: the base term of the DoRA update
        # sees the dropped input too (`base_result = None`).
        dropped = base if x is inputs else self._base_output(x)
        return base + excess * dropped + (excess + 1.0) * update

    # Dense and EinsumDense set it: their kernel is `(fan_in, fan_out)`
    # once flattened (`_flat_kernel`), and the input's last axes contract.
    _fusable = False

    def _fuses(self):
        """Whether a training call runs `kft.lora.fused`: an adapter that
        runs, without DoRA or dropout, on a float or grouped-int4 base
        (Keras' int8 base keeps its own int8 matmul, which dequantizes the
        kernel once, in the backward pass)."""
        return (self._fusable and self.adapter_enabled and not self.use_dora
                and not self.dropout and (not self.quantization_mode or (
                    self.quantization_mode == "int4"
                    and getattr(self, "g_idx", None) is not None)))

    def _fused_kernel(self, dtype):
        """The `(fan_in, fan_out)` base kernel in `dtype` for the fused
        step: a grouped int4 kernel dequantized (once a step: the fused
        gradient reuses it)."""
        kernel = grouped_int4_kernel(self)
        return ops.cast(self._flat_kernel(kernel), dtype)

    def _fused_output(self, inputs):
        """`x @ (W + scale A B)` in one matmul with `kft.lora.fused`'s
        gradient, before the bias and the activation."""
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        a, b = self._factors(dtype)
        kernel = self._fused_kernel(dtype)
        batch_shape = ops.shape(inputs)[:len(inputs.shape) - self._contracted]
        flat = ops.reshape(inputs, (-1, self._fans[0]))
        outputs = fused_lora_matmul(flat, kernel, a, b)
        return ops.reshape(outputs, (*batch_shape, *self._output_dims))

    def quantized_call(self, inputs, training=None):
        """The int8 / int4 base through Keras' own quantized path, plus the
        float32 update (added before the activation, as in `call`)."""
        if self.quantization_mode not in QUANTIZED_MODES:
            raise NotImplementedError(
                f"LoRA layer {self.name!r} supports float, 'int8' and 'int4' "
                f"bases. Received: quantization_mode={self.quantization_mode!r}")
        if training and self._fuses():  # grouped int4: one dequantization
            return self._finish(self._adapted(inputs, training))
        activation = self.activation
        nonlinear = activation not in (None, keras.activations.linear)
        if nonlinear:
            # Keras applies the activation inside its quantized call; the
            # update must join the base before it (GPT-2 / BERT MLPs: gelu).
            self.activation = None
        try:
            outputs = super().quantized_call(inputs, training=training)
        finally:
            self.activation = activation
        if self.adapter_enabled:
            outputs = outputs + self._update(inputs, outputs.dtype, training)[1]
        return activation(outputs) if nonlinear else outputs

    def merge(self):
        """Folds the update into the kernel: `W + scale * A @ B`, or with
        DoRA `m * (W + scale * A @ B) / ||W + scale * A @ B||_c`. Exact for
        a float base; an int8 / int4 base is dequantized, updated and
        requantized, which changes outputs by the error `merge_lora`
        documents."""
        if self.merged:
            return
        self._unpark()  # a switched-off adapter merges as it was trained
        if self.quantization_mode:
            # Kept on the host so that unmerge() can restore them exactly.
            self._kft_unmerged = [np.array(v) for v in self._quantized_state()]
            values = requantized_kernel(self, self._delta_kernel())
            for variable, value in zip(self._quantized_state(), values):
                variable.assign(value)
        elif self.use_dora:
            self._merge_dora()
        else:
            kernel = self._base_kernel()
            kernel.assign(kernel + ops.cast(self._delta_kernel(), kernel.dtype))
        self._park()
        self.merged = True

    def _merge_dora(self):
        norm = ops.maximum(self._column_norms(), _NORM_FLOOR)
        # Kept on the host for unmerge(): the merged kernel does not hold it.
        self._kft_dora_norm = np.asarray(norm)
        update = ops.matmul(self.lora_a, self.lora_b) * self.scale
        weight = ops.cast(self._flat_kernel(), "float32") + update
        kernel = self._base_kernel()
        merged = weight * (self.lora_magnitude / norm)
        kernel.assign(ops.cast(self._to_kernel(merged), kernel.dtype))

    def unmerge(self):
        """Takes the update back out of the kernel (a quantized kernel gets
        its values from before `merge()` back, exactly)."""
        if not self.merged:
            return
        self._unpark()
        if self.quantization_mode or self.use_dora:
            self._restore_unmerged()
        else:
            kernel = self._base_kernel()
            kernel.assign(kernel - ops.cast(self._delta_kernel(), kernel.dtype))
        self.merged = False

    def _restore_unmerged(self):
        kept = "_kft_dora_norm" if self.use_dora else "_kft_unmerged"
        saved = getattr(self, kept, None)
        if saved is None:
            how = ("DoRA kernel was merged, and the column norms from before "
                   "the merge are" if self.use_dora else
                   f"{self.quantization_mode} kernel was merged by requantizing, "
                   "which cannot be undone exactly, and the kernel from before "
                   "the merge is")
            raise ValueError(
                f"Cannot unmerge layer {self.path!r}: its {how} not kept (it is "
                "kept in memory from `merge()` on, not saved). Reload the "
                "unmerged base and load_adapter.")
        if self.use_dora:
            update = ops.matmul(self.lora_a, self.lora_b) * self.scale
            weight = ops.cast(self._flat_kernel(), "float32")
            flat = weight * (saved / self.lora_magnitude) - update
            kernel = self._base_kernel()
            kernel.assign(ops.cast(self._to_kernel(flat), kernel.dtype))
        else:
            for variable, value in zip(self._quantized_state(), saved):
                variable.assign(value)
        setattr(self, kept, None)

    def _quantized_state(self):
        """The variables `merge()` rewrites on a quantized base."""
        names = ("kernel_scale", "kernel_zero")
        return [kernel_variable(self)] + [getattr(self, n) for n in names
                                          if getattr(self, n, None) is not None]

    def _finish(self, outputs):
        if self.bias is not None:
            outputs = outputs + ops.cast(self.bias, outputs.dtype)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    # Keras' layers customise weight saving for their own LoRA and
    # quantization; store every variable by name instead.
    # A parked adapter is saved with its own values, and switched-off
    # layers with `lora_active = 0` (the flag files had before parking).
    def save_own_variables(self, store):
        parked = self._kft_parked or {}
        for variable in self.variables:
            store[variable.name] = parked.get(variable.name, variable)
        if self._switched_off:
            store[_LEGACY_FLAG] = np.zeros((), "float32")

    def load_own_variables(self, store):
        self._kft_parked = None
        for variable in self.variables:
            if variable.name in store:
                variable.assign(store[variable.name])
        if self.merged or (_LEGACY_FLAG in store
                           and float(np.asarray(store[_LEGACY_FLAG])) == 0.0):
            self._park()

    def _lora_config(self):
        return {"rank": self.adapter_rank, "alpha": self.alpha,
                "dropout": self.dropout, "use_rslora": self.use_rslora,
                "merged": self.merged, "use_dora": self.use_dora,
                "init": self.init}


def drop_variable(variables, variable):
    """Removes `variable` from a list by identity (== is elementwise)."""
    for i, v in enumerate(variables):
        if v is variable:
            del variables[i]
            return True
    return False


def retrace(model):
    """Drops the train / test / predict (and keras-hub generate) functions
    traced before the layers changed (class, variables or flags), as
    `Model.quantize` does: a cached function would keep running the
    layers as they were."""
    for layer in all_layers(model, include_self=True):
        if isinstance(layer, keras.Model):
            layer.train_function = None
            layer.test_function = None
            layer.predict_function = None
            if hasattr(layer, "generate_function"):
                layer.generate_function = None


def lora_layers(model):
    """The LoRA layers inside a model, in order."""
    return [layer for layer in all_layers(model)
            if isinstance(layer, _LoRAMixin)]
