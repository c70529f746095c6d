"""LoRA for Keras: low-rank adapters on frozen Dense and EinsumDense layers.

A LoRA layer computes `x @ W + b + (alpha / rank) * dropout(x) @ A @ B`
with `W` (and `b`) frozen, so the full weight gradient is never formed
(Keras' `Dense.enable_lora` rebuilds the merged kernel every step). It
has dropout, `merge()` / `unmerge()`, and saves its adapters as weights
of their own. `apply_lora` adapts the matching layers of a built model in
place (keras-hub backbones included); `save_adapter` / `load_adapter`
write and read the adapters alone.

Several adapters can live on one base under names (`load_adapter(...,
name=)`, `set_adapter`), and `disable_adapters` runs the plain base.

QLoRA: the base may be quantized by Keras (`model.quantize("int8")` or
`"int4"`), before `apply_lora` (the usual order) or after it. The frozen
base then runs through Keras' own int8 / int4 path and the float32
adapters are added to its output; `merge` requantizes (see `merge_lora`
for the error this adds). `.keras` files keep such a model as it is (int8
or packed int4 kernel, scales, adapters); adapter files load onto a base
quantized the same way.
"""

import hashlib
import json
import math
import re

import keras
import numpy as np
from keras import ops

from kft._keras_internals import all_layers
from kft._keras_internals import freeze_variable
from kft._keras_internals import kernel_variable
from kft._keras_internals import requantized_kernel
from kft._keras_internals import trainable_variable_lists
from kft._keras_internals import unlocked_tracker
from kft.anatomy import is_keras_hub_backbone
from kft.freezing import train_only

__all__ = ["LORA_TARGET_PRESETS", "LoRADense", "LoRAEinsumDense",
           "active_adapter", "apply_lora", "disable_adapters", "enable_adapters",
           "load_adapter", "lora_layers", "merge_lora", "save_adapter",
           "set_adapter"]

_FROZEN = ("kernel", "bias")
_ADAPTER_FORMAT = "kft-lora-adapter/1"
# The Keras quantization modes a LoRA base may have (besides float).
_QUANTIZED_MODES = ("int8", "int4")


class _LoRAMixin:
    """What LoRADense and LoRAEinsumDense share."""

    def _init_lora(self, rank, alpha, dropout, use_rslora, merged):
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

    @property
    def scale(self):
        root = math.sqrt(self.rank) if self.use_rslora else self.rank
        return self.alpha / root

    def add_weight(self, *args, **kwargs):
        # The pretrained kernel and bias are created non-trainable, so no
        # `trainable = True` (Keras' or kft.unfreeze) can unfreeze them.
        if kwargs.get("name") in _FROZEN:
            kwargs["trainable"] = False
        return super().add_weight(*args, **kwargs)

    def _kernel_shape(self):
        # `kernel` (public) is the unpacked kernel: int4 stores it packed.
        return tuple(int(d) for d in self.kernel.shape)

    def _build_adapters(self):
        fan_in, fan_out = self._adapter_dims()
        self._dropout_seed = keras.random.SeedGenerator()
        # float32 whatever the dtype policy, and not cast to the compute
        # dtype when read (autocast=False): LoRA updates underflow in fp16.
        self.lora_a = self.add_weight(
            name="lora_a", shape=(fan_in, self.rank),
            initializer=keras.initializers.HeUniform(), dtype="float32",
            autocast=False)
        self.lora_b = self.add_weight(
            name="lora_b", shape=(self.rank, fan_out), initializer="zeros",
            dtype="float32", autocast=False)
        # A variable, not a Python flag: a train or predict function traced
        # before merge() must see the change.
        self.lora_active = self.add_weight(
            name="lora_active", shape=(), trainable=False, dtype="float32",
            autocast=False,
            initializer=keras.initializers.Constant(0.0 if self.merged else 1.0))

    def _update(self, inputs, training):
        """scale * dropout(x) @ A @ B, in the output's layout."""
        x = inputs
        if training and self.dropout:
            x = keras.random.dropout(x, self.dropout, seed=self._dropout_seed)
        free = len(x.shape) - self._contracted
        batch_shape = ops.shape(x)[:free]
        flat = ops.reshape(ops.cast(x, "float32"), (*batch_shape, -1))
        update = ops.matmul(ops.matmul(flat, self.lora_a), self.lora_b)
        update = update * (self.scale * self.lora_active)
        return ops.reshape(update, (*batch_shape, *self._output_dims))

    def quantized_call(self, inputs, training=None):
        """The int8 / int4 base through Keras' own quantized path, plus the
        float32 update (added before the activation, as in `call`)."""
        if self.quantization_mode not in _QUANTIZED_MODES:
            raise NotImplementedError(
                f"LoRA layer {self.name!r} supports float, 'int8' and 'int4' "
                f"bases. Received: quantization_mode={self.quantization_mode!r}")
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
        outputs = outputs + ops.cast(self._update(inputs, training), outputs.dtype)
        return activation(outputs) if nonlinear else outputs

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the frozen base (`"int8"` or `"int4"`, as Keras'
        Dense / EinsumDense do); the adapters stay float32."""
        _check_quantize_mode(self, mode, config)
        _plain_class(self).quantize(self, mode, type_check=False, config=config)

    def _delta_kernel(self):
        """`scale * A @ B` in the kernel's (unpacked) layout."""
        delta = ops.reshape(ops.matmul(self.lora_a, self.lora_b) * self.scale,
                            self._delta_shape)
        if self._delta_axes is not None:
            delta = ops.transpose(delta, self._delta_axes)
        return delta

    def merge(self):
        """Folds `scale * A @ B` into the kernel. Exact for a float base; an
        int8 / int4 base is dequantized, updated and requantized, which
        changes outputs by the error `merge_lora` documents."""
        if self.merged:
            return
        if self.quantization_mode:
            # Kept on the host so that unmerge() can restore them exactly.
            self._kft_unmerged = [np.array(v) for v in self._quantized_state()]
            values = requantized_kernel(self, self._delta_kernel())
            for variable, value in zip(self._quantized_state(), values):
                variable.assign(value)
        else:
            kernel = kernel_variable(self)
            kernel.assign(kernel + ops.cast(self._delta_kernel(), kernel.dtype))
        self.lora_active.assign(0.0)
        self.merged = True

    def unmerge(self):
        """Takes the update back out of the kernel (a quantized kernel gets
        its values from before `merge()` back, exactly)."""
        if not self.merged:
            return
        if self.quantization_mode:
            saved = getattr(self, "_kft_unmerged", None)
            if saved is None:
                raise ValueError(
                    f"Cannot unmerge layer {self.path!r}: its "
                    f"{self.quantization_mode} kernel was merged by requantizing, "
                    "which cannot be undone exactly, and the kernel from before "
                    "the merge is not kept (it is kept in memory from `merge()` "
                    "on, not saved). Reload the unmerged base and load_adapter.")
            for variable, value in zip(self._quantized_state(), saved):
                variable.assign(value)
            self._kft_unmerged = None
        else:
            kernel = kernel_variable(self)
            kernel.assign(kernel - ops.cast(self._delta_kernel(), kernel.dtype))
        self.lora_active.assign(1.0)
        self.merged = False

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

    # Dense and EinsumDense customise weight saving for their own LoRA and
    # quantization; store every variable by name instead.
    def save_own_variables(self, store):
        for variable in self.variables:
            store[variable.name] = variable

    def load_own_variables(self, store):
        for variable in self.variables:
            if variable.name in store:
                variable.assign(store[variable.name])

    def _lora_config(self):
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "use_rslora": self.use_rslora, "merged": self.merged}


def _plain_class(layer):
    """The Keras class a LoRA layer extends (EinsumDense or Dense)."""
    if isinstance(layer, keras.layers.EinsumDense):
        return keras.layers.EinsumDense
    return keras.layers.Dense


def _check_quantize_mode(layer, mode, config):
    mode = mode or getattr(config, "mode", None)
    if mode not in _QUANTIZED_MODES:
        # NotImplementedError: `Model.quantize` then warns and skips the
        # layer, as it does for every layer that lacks a mode.
        raise NotImplementedError(
            f"LoRA layer {layer.name!r} can quantize its frozen base to "
            f"{list(_QUANTIZED_MODES)} only. Received: mode={mode!r}")


@keras.saving.register_keras_serializable(package="kft")
class LoRADense(_LoRAMixin, keras.layers.Dense):
    """A Dense layer with a frozen kernel and a trainable low-rank update.

    Args:
        units: output size.
        rank: rank `r` of the update `A @ B`.
        alpha: the update is multiplied by `alpha / rank` (or
            `alpha / sqrt(rank)` with `use_rslora`).
        dropout: dropout on the adapter's input, while training.
        use_rslora: rank-stabilised scaling (Kalajdzievski, 2023).
        merged: whether the update is folded into the kernel.
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
                 merged=False, **kwargs):
        super().__init__(units, **kwargs)
        self._init_lora(rank, alpha, dropout, use_rslora, merged)

    def _adapter_dims(self):
        self._contracted = 1
        self._output_dims = (self.units,)
        self._delta_shape = self._kernel_shape()
        self._delta_axes = None
        return self._delta_shape[0], self.units

    def build(self, input_shape):
        super().build(input_shape)
        self._build_adapters()

    def call(self, inputs, training=None):
        outputs = ops.matmul(inputs, ops.cast(kernel_variable(self), inputs.dtype))
        outputs = outputs + ops.cast(self._update(inputs, training), outputs.dtype)
        return self._finish(outputs)

    def get_config(self):
        return {**super().get_config(), **self._lora_config()}


def _einsum_structure(equation, kernel_shape):
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
class LoRAEinsumDense(_LoRAMixin, keras.layers.EinsumDense):
    """An EinsumDense with a frozen kernel and a low-rank update.

    keras-hub attention uses EinsumDense for query, key, value
    (`abc,cde->abde`, Gemma's `btd,ndh->btnh`) and output
    (`abcd,cde->abe`). The input's contracted axes are flattened, so the
    update is `x @ A @ B` reshaped, never the full kernel. Arguments as
    `LoRADense`, plus EinsumDense's.
    """

    def __init__(self, equation, output_shape, rank=8, alpha=16, dropout=0.0,
                 use_rslora=False, merged=False, **kwargs):
        super().__init__(equation, output_shape, **kwargs)
        self._init_lora(rank, alpha, dropout, use_rslora, merged)

    def _adapter_dims(self):
        (self._contracted, self._output_dims, self._delta_shape,
         self._delta_axes) = _einsum_structure(self.equation, self._kernel_shape())
        fan_in = math.prod(self._delta_shape[: self._contracted])
        return fan_in, math.prod(self._output_dims)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_adapters()

    def call(self, inputs, training=None):
        outputs = ops.einsum(self.equation, inputs,
                             ops.cast(kernel_variable(self), inputs.dtype))
        outputs = outputs + ops.cast(self._update(inputs, training), outputs.dtype)
        return self._finish(outputs)

    def get_config(self):
        return {**super().get_config(), **self._lora_config()}


def lora_layers(model):
    """The LoRA layers inside a model, in order."""
    return [layer for layer in all_layers(model)
            if isinstance(layer, _LoRAMixin)]


def _drop(variables, variable):
    """Removes `variable` from a list by identity (== is elementwise)."""
    for i, v in enumerate(variables):
        if v is variable:
            del variables[i]
            return True
    return False


def _retrace(model):
    """Drops the train / test / predict functions Keras traced before the
    layers changed class, as `Model.quantize` does: a cached function
    would keep running the layers as they were."""
    for layer in all_layers(model, include_self=True):
        if isinstance(layer, keras.Model):
            layer.train_function = None
            layer.test_function = None
            layer.predict_function = None


def _check_convertible(layer):
    """Refuses what kft's LoRA layers cannot sit on, naming the layer."""
    mode = layer.quantization_mode
    if mode not in (None, *_QUANTIZED_MODES):
        raise ValueError(
            f"apply_lora: layer {layer.path!r} is quantized as {mode!r}; LoRA "
            f"supports float, 'int8' and 'int4' bases (`model.quantize(...)`).")
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"apply_lora: layer {layer.path!r} has Keras' own LoRA enabled "
            "(`enable_lora`); use one or the other, not both.")
    if isinstance(layer, keras.layers.EinsumDense):
        _einsum_structure(layer.equation, layer.kernel.shape)


def _route_quantize(layer):
    """Lets `model.quantize()` reach the frozen base of a converted layer.

    Keras gives each layer, when it is created, a `quantize` of its own
    that checks the arguments and lets the layer take new variables, then
    calls `Dense.quantize`, which refuses subclasses unless
    `type_check=False`. While the layer is a LoRA layer, its base is
    quantized (int8 / int4 only); once merged back, Keras' checks apply.
    """
    keras_quantize = layer.quantize
    if getattr(keras_quantize, "kft_lora_route", False):
        return

    def quantize(mode=None, config=None, type_check=True, **kwargs):
        if isinstance(layer, _LoRAMixin):
            _check_quantize_mode(layer, mode, config)
            type_check = False
        return keras_quantize(mode, config=config, type_check=type_check, **kwargs)

    quantize.kft_lora_route = True
    layer.quantize = quantize


def _convert(layer, rank, alpha, dropout, use_rslora):
    """Turns a built Dense / EinsumDense into its LoRA class, in place."""
    _check_convertible(layer)
    target = LoRAEinsumDense if isinstance(layer, keras.layers.EinsumDense) \
        else LoRADense
    with unlocked_tracker(layer):
        layer.__class__ = target
        layer._init_lora(rank, alpha, dropout, use_rslora, merged=False)
        for variable in (kernel_variable(layer), layer.bias):
            if variable is not None:
                freeze_variable(layer, variable)
        layer._build_adapters()
    _route_quantize(layer)


# keras-hub backbones save their hyperparameters, not their layers, so a
# LoRA layer inside one would come back from `.keras` as a plain layer.
# kft gives such a model a subclass whose config wraps the base config
# with the adapted layers' LoRA settings and the layers' trainable flags;
# `LoRAContainer.from_config` rebuilds the base and converts them back.
_CONTAINER_NAME = "LoRAContainer"
_CONTAINER_CLASSES = {}


class _LoRAContainerMixin:
    def get_config(self):
        base = self._kft_base_class
        layers = list(all_layers(self))
        return {
            "name": self.name,
            "base": {
                "module": base.__module__,
                "class_name": base.__name__,
                "config": base.get_config(self),
                "registered_name": keras.saving.get_registered_name(base),
            },
            "lora": [[i, layer.name, layer._lora_config()]
                     for i, layer in enumerate(layers)
                     if isinstance(layer, _LoRAMixin)],
            "trainable": [bool(layer.trainable) for layer in layers],
        }


def _container_class(base):
    if base not in _CONTAINER_CLASSES:
        subclass = type(base.__name__, (_LoRAContainerMixin, base),
                        {"_kft_base_class": base, "__module__": base.__module__})
        # Serialize under kft's name; the registry then points the name back
        # at the loader.
        keras.saving.register_keras_serializable("kft", _CONTAINER_NAME)(subclass)
        keras.saving.register_keras_serializable("kft", _CONTAINER_NAME)(
            LoRAContainer)
        _CONTAINER_CLASSES[base] = subclass
    return _CONTAINER_CLASSES[base]


def _mark_containers(model):
    """Gives every keras-hub backbone holding LoRA layers the wrapping
    config (see above); one that holds none gets its own class back."""
    for layer in all_layers(model, include_self=True):
        if not is_keras_hub_backbone(layer):
            continue
        base = getattr(type(layer), "_kft_base_class", type(layer))
        holds = any(isinstance(sub, _LoRAMixin)
                    for sub in all_layers(layer))
        layer.__class__ = _container_class(base) if holds else base


@keras.saving.register_keras_serializable("kft", _CONTAINER_NAME)
class LoRAContainer:
    """Loads a keras-hub backbone saved with LoRA layers inside.

    Not used directly: `keras.saving.load_model` calls `from_config` on
    the config a LoRA-adapted backbone writes, which rebuilds the backbone,
    turns the adapted layers back into LoRA layers (their weights then load
    as saved) and restores every layer's trainable flag, so training
    resumes where it stopped.
    """

    def get_config(self):  # pragma: no cover - never instantiated
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        model = keras.saving.deserialize_keras_object(config["base"])
        layers = list(all_layers(model))
        for index, name, lora in config["lora"]:
            layer = layers[index] if index < len(layers) else None
            if layer is None or layer.name != name:
                raise ValueError(
                    f"Saved LoRA layer {name!r} (position {index}) is not in "
                    f"the rebuilt {type(model).__name__}; was the model saved "
                    "with another keras-hub version?")
            _convert(layer, lora["rank"], lora["alpha"], lora["dropout"],
                     lora["use_rslora"])
            if lora["merged"]:
                layer.merged = True
                layer.lora_active.assign(0.0)
        for layer, flag in zip(layers, config["trainable"]):
            layer.trainable = flag
        _mark_containers(model)
        return model


def _matches(name, targets):
    return any(t in name or re.search(t, name) for t in targets)


# LoRA target presets per keras-hub backbone class, read from the attention
# and decoder layers of keras-hub 0.32: the sublayer names of the attention
# projections (q, k, v, o) and of the MLP projections. "all-linear" is
# "attention" + "mlp". Presets match these names exactly and only inside
# the backbone, so a task's head (and any embedding) is never adapted.
_ATTENTION = ("query", "key", "value", "attention_output")
_GATED_MLP = ("feedforward_gate_dense",  # gate
              "feedforward_intermediate_dense",  # up
              "feedforward_output_dense")  # down
_GEMMA_MLP = ("ffw_gating", "ffw_gating_2", "ffw_linear")  # gate, up, down
_MLP = ("feedforward_intermediate_dense", "feedforward_output_dense")  # up, down
LORA_TARGET_PRESETS = {
    "LlamaBackbone": {"attention": _ATTENTION, "mlp": _GATED_MLP},
    "Llama3Backbone": {"attention": _ATTENTION, "mlp": _GATED_MLP},
    "MistralBackbone": {"attention": _ATTENTION, "mlp": _GATED_MLP},
    "QwenBackbone": {"attention": _ATTENTION, "mlp": _GATED_MLP},
    "Qwen3Backbone": {"attention": _ATTENTION, "mlp": _GATED_MLP},
    "Phi3Backbone": {"attention": _ATTENTION, "mlp": _GATED_MLP},
    "GemmaBackbone": {"attention": _ATTENTION, "mlp": _GEMMA_MLP},
    "Gemma3Backbone": {"attention": _ATTENTION, "mlp": _GEMMA_MLP},
    "GPT2Backbone": {"attention": _ATTENTION, "mlp": _MLP},
    "BertBackbone": {"attention": _ATTENTION, "mlp": _MLP},
}
_PRESETS = ("attention", "mlp", "all-linear")


def _preset_entry(backbone):
    # By class name along the MRO: kft's LoRA container subclasses a
    # backbone under the backbone's own name.
    for cls in type(backbone).__mro__:
        if cls.__name__ in LORA_TARGET_PRESETS:
            return LORA_TARGET_PRESETS[cls.__name__]
    return None


def _preset_layers(model, preset):
    """The layers a preset names, inside the model's known backbones."""
    backbones = [layer for layer in all_layers(model, include_self=True)
                 if is_keras_hub_backbone(layer)]
    known = [(b, _preset_entry(b)) for b in backbones if _preset_entry(b)]
    if not known:
        raise ValueError(
            f"apply_lora: targets={preset!r} is a preset for the keras-hub "
            f"backbones {sorted(LORA_TARGET_PRESETS)}; this model holds "
            f"{[type(b).__name__ for b in backbones] or 'none'}. Pass layer "
            "names or regexes instead.")
    chosen = []
    for backbone, entry in known:
        names = entry["attention"] + entry["mlp"] if preset == "all-linear" \
            else entry[preset]
        chosen += [layer for layer in all_layers(backbone)
                   if layer.name in names]
    return chosen


def _select(model, targets, candidates):
    """The candidates that `targets` (presets, names, regexes) choose."""
    presets = [t for t in targets if t in _PRESETS]
    patterns = [t for t in targets if t not in _PRESETS]
    named = {id(layer) for p in presets for layer in _preset_layers(model, p)}
    return [layer for layer in candidates
            if id(layer) in named or (patterns and (
                _matches(layer.name, patterns) or _matches(layer.path, patterns)))]


def apply_lora(model, targets=("query", "value"), rank=8, alpha=16,
               dropout=0.0, use_rslora=False, trainable=()):
    """Adds LoRA adapters to the matching layers of a built model, in place.

    Args:
        model: a built Keras model (keras-hub backbones included). Its
            Dense / EinsumDense layers may be float or quantized by Keras
            (`model.quantize("int8")` / `"int4"`: QLoRA).
        targets: a preset, or layer-name substrings or regexes (a list may
            mix both); every Dense and EinsumDense whose name (or path)
            matches is adapted. Presets, for the keras-hub backbones in
            `LORA_TARGET_PRESETS`: `"attention"` (q, k, v and output
            projections), `"mlp"` (gate / up / down) and `"all-linear"`
            (both; never the embeddings or the LM head).
        rank, alpha, dropout, use_rslora: see `LoRADense`.
        trainable: names (substrings or regexes) of other layers that keep
            training, such as the classification head (PEFT's
            `modules_to_save`).

    Returns:
        The number of layers adapted. Everything else, except what
        `trainable` names, becomes untrainable.

    Example:

    >>> inputs = keras.Input((8,))
    >>> model = keras.Model(inputs, keras.layers.Dense(4, name="query")(inputs))
    >>> model.quantize("int8")
    >>> apply_lora(model, targets=("query",), rank=2)
    1
    """
    if isinstance(targets, str):
        targets = (targets,)
    candidates = [
        layer for layer in all_layers(model)
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
        and not isinstance(layer, _LoRAMixin)
    ]
    chosen = _select(model, targets, candidates)
    if not chosen:
        names = sorted({layer.name for layer in candidates})
        raise ValueError(
            f"apply_lora: targets {list(targets)} match no Dense or EinsumDense "
            f"layer. Candidates: {names[:30]}{' ...' if len(names) > 30 else ''}")
    for layer in chosen:
        if not layer.built:
            raise ValueError(f"apply_lora: layer {layer.name!r} is not built yet.")
        _check_convertible(layer)
    for layer in chosen:
        _convert(layer, rank, alpha, dropout, use_rslora)
    keep = [layer for layer in all_layers(model)
            if trainable and (_matches(layer.name, trainable))]
    train_only(model, chosen + keep)
    _mark_containers(model)
    _retrace(model)
    return len(chosen)


def merge_lora(model):
    """Folds every adapter into its kernel and turns the LoRA layers back
    into plain Dense / EinsumDense, in place. Returns the count.

    On a float base the outputs are unchanged (to float rounding) and the
    model saves and reloads with plain Keras. On an int8 / int4 base each
    kernel is dequantized, gets `scale * A @ B` and is requantized in the
    same mode (Keras' own requantization), so the merged model stays
    quantized and its outputs move by one more rounding of the kernel.
    Measured on Keras 3.15.1 (CPU): glorot-uniform kernels quantized by
    `model.quantize`, rank 8, an update with `||scale A B|| = 5% ||W||`,
    256 N(0, 1) inputs; merged outputs against the unmerged QLoRA model,
    as max |error| (max |error| / max |output|; Frobenius relative):

        in x out     int8                     int4 (Keras' block 128)
        16 x 12      0.014 (0.38%; 0.39%)     0.22 (5.9%; 4.9%)
        576 x 576    0.019 (0.44%; 0.41%)     0.31 (7.2%; 5.2%)
        576 x 1536   0.014 (0.39%; 0.41%)     0.22 (6.5%; 5.2%)

    About half (int8) or all (int4) of what quantizing the float base cost
    in the first place (0.85% / 6.6% Frobenius at 576 x 1536). Merge a
    quantized base only to ship it; to keep training, or for the outputs
    the adapters were trained for, keep them unmerged.
    """
    layers = lora_layers(model)
    for layer in layers:
        layer.merge()
        trainable, non_trainable = trainable_variable_lists(layer)
        with unlocked_tracker(layer):
            for variable in (layer.lora_a, layer.lora_b):
                _drop(trainable, variable)
            _drop(non_trainable, layer.lora_active)
            del layer.lora_a, layer.lora_b, layer.lora_active
            layer._kft_unmerged = None
            layer.__class__ = _plain_class(layer)
    _mark_containers(model)
    _retrace(model)
    return len(layers)


def _quantization(model):
    """The Keras quantization modes of a model's layers, sorted."""
    return sorted({layer.quantization_mode for layer in all_layers(model)
                   if layer.quantization_mode})


def _fingerprint(model):
    """A hash of the base model: its non-LoRA variables' paths and shapes,
    and which layers are quantized how (an int8 base is not its float or
    int4 twin). Float bases hash as before quantization was supported."""
    items = sorted(
        (v.path, tuple(v.shape)) for v in model.weights
        if not v.path.endswith(("/lora_a", "/lora_b", "/lora_active")))
    modes = sorted((layer.path, layer.quantization_mode)
                   for layer in all_layers(model) if layer.quantization_mode)
    if modes:
        items.append(("quantization", modes))
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


_FORMATS = ("kft", "peft")


def _check_format(format):
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}. Received: "
                         f"format={format!r}")


def save_adapter(model, path, format="kft", **peft_options):
    """Writes the adapters alone.

    Args:
        model: a model with kft LoRA layers.
        path: `format="kft"`: an `.npz` file keyed by variable path, with
            rank, alpha, targets and a fingerprint of the base model.
            `format="peft"`: a directory in Hugging Face PEFT's format
            (`adapter_config.json` + `adapter_model.safetensors`, tensors
            named after the Hugging Face modules) that PEFT loads onto the
            same checkpoint (`kft.peft_format.save_peft_adapter`).
        format: `"kft"` or `"peft"`.
        **peft_options: for `"peft"`: `base_model_name_or_path`,
            `task_type`.

    Returns:
        `path`.
    """
    _check_format(format)
    if format == "peft":
        from kft.peft_format import save_peft_adapter

        return save_peft_adapter(model, path, **peft_options)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers.")
    meta = {
        "format": _ADAPTER_FORMAT,
        "fingerprint": _fingerprint(model),
        "quantization": _quantization(model),
        "layers": {layer.path: {"rank": layer.rank, "alpha": layer.alpha,
                                "dropout": layer.dropout,
                                "use_rslora": layer.use_rslora}
                   for layer in layers},
    }
    arrays = {}
    for layer in layers:
        if layer.merged:
            raise ValueError(
                f"save_adapter: layer {layer.path!r} is merged; unmerge first.")
        arrays[f"{layer.path}/lora_a"] = np.asarray(layer.lora_a)
        arrays[f"{layer.path}/lora_b"] = np.asarray(layer.lora_b)
    with open(path, "wb") as f:
        np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays)
    return path


def _adapter_store(model):
    if not hasattr(model, "_kft_adapters"):
        model._kft_adapters = {}
        model._kft_active_adapter = "default"
    return model._kft_adapters


def _stash_active(model):
    """Keeps the current adapter values under the active name."""
    store = _adapter_store(model)
    store[model._kft_active_adapter] = {
        layer.path: (np.array(layer.lora_a), np.array(layer.lora_b))
        for layer in lora_layers(model)}


def active_adapter(model):
    """The name of the adapter the model runs with."""
    _adapter_store(model)
    return model._kft_active_adapter


def set_adapter(model, name):
    """Switches the model to the adapter loaded under `name`."""
    store = _adapter_store(model)
    if name not in store and name != model._kft_active_adapter:
        raise ValueError(
            f"No adapter named {name!r}. Loaded: "
            f"{sorted(set(store) | {model._kft_active_adapter})}")
    if name == model._kft_active_adapter:
        return
    _stash_active(model)
    for layer in lora_layers(model):
        a, b = store[name][layer.path]
        layer.lora_a.assign(a)
        layer.lora_b.assign(b)
    model._kft_active_adapter = name


def disable_adapters(model):
    """Runs the base model alone (adapters kept, not merged)."""
    for layer in lora_layers(model):
        if layer.merged:
            raise ValueError(
                f"Layer {layer.path!r} is merged: unmerge it before disabling.")
        layer.lora_active.assign(0.0)


def enable_adapters(model):
    """Undoes `disable_adapters`."""
    for layer in lora_layers(model):
        if not layer.merged:
            layer.lora_active.assign(1.0)


def load_adapter(model, path, format="kft", name="default"):
    """Loads adapters saved by `save_adapter` onto a model, as `name`.

    A base model without LoRA layers gets them first (same targets and
    ranks as saved). A different base model (fingerprint) or rank is a
    clear error; a quantized base must be quantized as the one the adapter
    was saved from (same mode, same layers). Loading under a new name
    keeps the adapter that was active under its own name (`set_adapter`
    switches back); the loaded one becomes active. `format="peft"` reads a
    PEFT adapter directory (trained with PEFT in PyTorch, or written by
    kft) with `kft.peft_format.load_peft_adapter`.
    """
    _check_format(format)
    if format == "peft":
        from kft.peft_format import load_peft_adapter

        return load_peft_adapter(model, path, name=name)
    with np.load(path) as data:
        meta = json.loads(str(data["__meta__"]))
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
    if meta.get("format") != _ADAPTER_FORMAT:
        raise ValueError(f"{path!r} is not a kft LoRA adapter file.")
    if _fingerprint(model) != meta["fingerprint"]:
        saved, here = meta.get("quantization", []), _quantization(model)
        raise ValueError(
            f"The adapter in {path!r} was trained on a different base model "
            f"(fingerprint {meta['fingerprint']}, this model "
            f"{_fingerprint(model)}; quantization {saved or 'none'} when saved, "
            f"{here or 'none'} here: the base must be quantized as it was).")
    existing = {layer.path: layer for layer in lora_layers(model)}
    if not existing:
        by_path = {layer.path: layer for layer in all_layers(model, include_self=True)}
        for layer_path, config in meta["layers"].items():
            _convert(by_path[layer_path], config["rank"], config["alpha"],
                     config["dropout"], config["use_rslora"])
        train_only(model, [by_path[p] for p in meta["layers"]])
        _mark_containers(model)
        _retrace(model)
        existing = {layer.path: layer for layer in lora_layers(model)}
    if name != active_adapter(model):
        _stash_active(model)
    for layer_path, config in meta["layers"].items():
        layer = existing.get(layer_path)
        if layer is None:
            raise ValueError(
                f"The adapter has layer {layer_path!r}, which this model's LoRA "
                f"layers lack: {sorted(existing)}")
        if layer.rank != config["rank"]:
            raise ValueError(
                f"Adapter rank {config['rank']} for {layer_path!r} does not "
                f"match the model's LoRA rank {layer.rank}.")
        layer.lora_a.assign(arrays[f"{layer_path}/lora_a"])
        layer.lora_b.assign(arrays[f"{layer_path}/lora_b"])
    model._kft_active_adapter = name
    return len(meta["layers"])
