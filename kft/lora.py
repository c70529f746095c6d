"""LoRA for Keras: low-rank adapters on frozen Dense, EinsumDense, Conv2D
and Embedding layers.

A LoRA layer computes `x @ W + b + (alpha / rank) * dropout(x) @ A @ B`
with `W` (and `b`) frozen, so the full weight gradient is never formed
(Keras' `Dense.enable_lora` rebuilds the merged kernel every step). It
has dropout, `merge()` / `unmerge()`, and saves its adapters as weights
of their own. `apply_lora` adapts the matching layers of a built model in
place (keras-hub backbones included); `save_adapter` / `load_adapter`
write and read the adapters alone.

Variants, as PEFT names them: DoRA (`use_dora=True`, see
`kft.lora_base`), the initialisations `init="default" | "gaussian" |
"pissa" | "olora"` (`kft.lora_init`), LoRA for Conv2D (`kft.lora_conv`)
and Embedding (`kft.lora_embedding`), and LoRA+ learning rates
(`kft.optimizers.loraplus`).

Several adapters can live on one base under names (`load_adapter(...,
name=)`, `set_adapter`, `combine_adapters`: `kft.lora_adapters`), and
`disable_adapters` runs the plain base.

QLoRA: the base may be quantized by Keras (`model.quantize("int8")` or
`"int4"`), before `apply_lora` (the usual order) or after it. The frozen
base then runs through Keras' own int8 / int4 path and the float32
adapters are added to its output; `merge` requantizes (see `merge_lora`
for the error this adds). `.keras` files keep such a model as it is (int8
or packed int4 kernel, scales, adapters); adapter files load onto a base
quantized the same way. DoRA and PiSSA / OLoRA need a float kernel when
they start (PiSSA then QLoRA: `apply_lora(init="pissa")` on the float
model, then `model.quantize(...)` quantizes the residual); a DoRA layer
stays float when the model is quantized later.
"""

import hashlib
import json
import math
import re
import warnings

import keras
import numpy as np
from keras import ops

from kft._keras_internals import all_layers
from kft._keras_internals import freeze_variable
from kft._keras_internals import kernel_variable
from kft._keras_internals import one_gc_collect
from kft._keras_internals import trainable_variable_lists
from kft._keras_internals import unlocked_tracker
from kft.anatomy import is_keras_hub_backbone
from kft.freezing import train_only
from kft.lora_adapters import active_adapter
from kft.lora_adapters import assign_adapter
from kft.lora_adapters import combine_adapters
from kft.lora_adapters import disable_adapters
from kft.lora_adapters import enable_adapters
from kft.lora_adapters import mark_active
from kft.lora_adapters import set_adapter
from kft.lora_adapters import stash_active
from kft.lora_base import ADAPTER_VARIABLES
from kft.lora_base import QUANTIZED_MODES
from kft.lora_base import _LoRAMixin
from kft.lora_base import drop_variable
from kft.lora_base import lora_layers
from kft.lora_base import retrace
from kft.lora_config import LoRAConfig
from kft.lora_conv import LoRAConv2D
from kft.lora_embedding import LoRAEmbedding
from kft.lora_embedding import LoRAReversibleEmbedding
from kft.lora_init import INITS
from kft.lora_init import KERNEL_INITS
from kft.lora_init import check_init
from kft.lora_init import plain_lora_weights
from kft.safe_npz import read_npz_with_meta

__all__ = ["INITS", "LORA_TARGET_PRESETS", "LoRAConfig", "LoRAConv2D", "LoRADense",
           "LoRAEinsumDense", "LoRAEmbedding", "LoRAReversibleEmbedding",
           "active_adapter", "apply_lora", "combine_adapters",
           "disable_adapters", "enable_adapters", "load_adapter", "lora_layers",
           "merge_lora", "plain_lora_weights", "save_adapter", "set_adapter"]

_ADAPTER_FORMAT = "kft-lora-adapter/1"
# Written when an adapter holds what version 1 readers would drop (DoRA).
_ADAPTER_FORMAT_DORA = "kft-lora-adapter/2"
_ADAPTER_FORMATS = (_ADAPTER_FORMAT, _ADAPTER_FORMAT_DORA)


def _check_quantize_mode(layer, mode, config):
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
    """Dense and EinsumDense LoRA: adapters built with the layer, and a base
    that Keras' int8 / int4 modes can quantize."""

    def build(self, input_shape):
        super().build(input_shape)
        self._build_adapters()

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the frozen base (`"int8"` or `"int4"`, as the Keras
        layer it extends does); the adapters stay float32."""
        _check_quantize_mode(self, mode, config)
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
            unit rescales `W + scale * A @ B` (`kft.lora_base`).
        init: how `A` and `B` start: `"default"`, `"gaussian"`, `"pissa"`
            or `"olora"` (PEFT's names; `kft.lora_init`).
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
         self._delta_axes) = _einsum_structure(self.equation, self._kernel_shape())
        fan_in = math.prod(self._delta_shape[: self._contracted])
        return fan_in, math.prod(self._output_dims)


    def _base_output(self, inputs):
        return ops.einsum(self.equation, inputs,
                          ops.cast(kernel_variable(self), inputs.dtype))

    def call(self, inputs, training=None):
        return self._finish(self._adapted(inputs, training))

    def get_config(self):
        return {**super().get_config(), **self._lora_config()}


# The Keras layers LoRA adapts -> kft's LoRA class for each (subclasses
# first: keras-hub's token embeddings are ReversibleEmbeddings).
_LORA_CLASSES = (
    (keras.layers.EinsumDense, LoRAEinsumDense),
    (keras.layers.Dense, LoRADense),
    (keras.layers.Conv2D, LoRAConv2D),
    (keras.layers.ReversibleEmbedding, LoRAReversibleEmbedding),
    (keras.layers.Embedding, LoRAEmbedding),
)
_ADAPTABLE = tuple(plain for plain, _ in _LORA_CLASSES)


def _lora_class(layer):
    return next(lora for plain, lora in _LORA_CLASSES if isinstance(layer, plain))


def _plain_class(layer):
    """The class a LoRA layer goes back to when merged: the one it was
    converted from, else the Keras class it extends."""
    kept = getattr(layer, "_kft_plain_class", None)
    if kept is not None:
        return kept
    return next(plain for plain, lora in _LORA_CLASSES if isinstance(layer, lora))


def _check_convertible(layer, use_dora=False, init="default"):
    """Refuses what kft's LoRA layers cannot sit on, naming the layer."""
    mode = layer.quantization_mode
    if mode not in (None, *QUANTIZED_MODES):
        raise ValueError(
            f"apply_lora: layer {layer.path!r} is quantized as {mode!r}; LoRA "
            f"supports float, 'int8' and 'int4' bases (`model.quantize(...)`).")
    if mode and not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        raise ValueError(
            f"apply_lora: layer {layer.path!r} is a quantized "
            f"{type(layer).__name__}; LoRA supports quantized Dense and "
            "EinsumDense bases only. Quantize after apply_lora to keep it float.")
    if mode and (use_dora or init in KERNEL_INITS):
        raise ValueError(
            f"apply_lora: layer {layer.path!r} is quantized ({mode!r}); DoRA "
            "and init='pissa' / 'olora' need its float kernel. Apply them to "
            "the float model, then quantize (PiSSA: the residual is quantized). "
            f"Received: use_dora={use_dora}, init={init!r}")
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"apply_lora: layer {layer.path!r} has Keras' own LoRA enabled "
            "(`enable_lora`); use one or the other, not both.")
    if isinstance(layer, keras.layers.EinsumDense):
        _einsum_structure(layer.equation, layer.kernel.shape)
    if isinstance(layer, keras.layers.Conv2D) and layer.groups != 1:
        raise ValueError(
            f"apply_lora: layer {layer.path!r} is a Conv2D with groups="
            f"{layer.groups}; LoRA supports groups=1.")


def _route_quantize(layer):
    """Lets `model.quantize()` reach the frozen base of a converted layer.

    Keras gives each layer, when it is created, a `quantize` of its own
    that checks the arguments and lets the layer take new variables, then
    calls `Dense.quantize`, which refuses subclasses unless
    `type_check=False`. While the layer is a LoRA layer, its base is
    quantized (int8 / int4 only; not under DoRA); once merged back, Keras'
    checks apply. Conv2D and Embedding LoRA layers keep Keras' refusal
    (`Model.quantize` skips them with a warning).
    """
    if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        return
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


def _convert(layer, rank, alpha, dropout, use_rslora, use_dora=False,
             init="default"):
    """Turns a built Dense, EinsumDense, Conv2D or Embedding into its LoRA
    class, in place."""
    _check_convertible(layer, use_dora, init)
    target, plain = _lora_class(layer), type(layer)
    with unlocked_tracker(layer):
        layer.__class__ = target
        layer._kft_plain_class = plain
        layer._init_lora(rank, alpha, dropout, use_rslora, False, use_dora, init)
        for variable in layer._frozen_variables():
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
                # A keras-hub layer (not a backbone) makes its sublayers in
                # `build`: rebuilt from this before its layers convert.
                "build_config": self.get_build_config(),
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


def _rebuilds_its_layers(layer, base):
    """A keras-hub backbone, or a keras-hub layer outside one (e.g. the
    Whisper encoder layers in `kft.audio.whisper_encoder`'s functional
    model): their configs hold hyperparameters, not sublayers."""
    return is_keras_hub_backbone(layer) or (
        base.__module__.startswith("keras_hub.")
        and not isinstance(layer, keras.Model))


def _mark_containers(model):
    """Gives every keras-hub backbone, or outermost keras-hub layer outside
    one, holding LoRA layers the wrapping config (see above); one that
    holds none gets its own class back."""
    covered = set()  # inside a backbone or layer handled already
    for layer in all_layers(model, include_self=True):
        base = getattr(type(layer), "_kft_base_class", type(layer))
        if id(layer) in covered or not _rebuilds_its_layers(layer, base):
            continue
        covered.update(id(sub) for sub in all_layers(layer))
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
                     lora["use_rslora"], lora.get("use_dora", False),
                     lora.get("init", "default"))
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
_PRESETS = ("attention", "mlp", "all-linear", "pointwise")


def _pointwise(layer):
    """A 1x1 convolution (CNN expand / project / shortcut layers)."""
    return (isinstance(layer, keras.layers.Conv2D)
            and tuple(layer.kernel_size) == (1, 1))


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
    presets = [t for t in targets if t in _PRESETS and t != "pointwise"]
    patterns = [t for t in targets if t not in _PRESETS]
    named = {id(layer) for p in presets for layer in _preset_layers(model, p)}
    pointwise = "pointwise" in targets
    return [layer for layer in candidates
            if id(layer) in named or (pointwise and _pointwise(layer))
            or (patterns and (
                _matches(layer.name, patterns) or _matches(layer.path, patterns)))]


def apply_lora(model, targets=("query", "value"), rank=8, alpha=16,
               dropout=0.0, use_rslora=False, trainable=(), *, use_dora=False,
               init="default"):
    """Adds LoRA adapters to the matching layers of a built model, in place.

    The set-up is given as keyword arguments, or as one `kft.lora.LoRAConfig`
    (or a dict of its fields) in place of `targets`:
    `apply_lora(model, LoRAConfig(targets="all-linear", rank=16))`.

    Args:
        model: a built Keras model (keras-hub backbones included). Its
            Dense / EinsumDense layers may be float or quantized by Keras
            (`model.quantize("int8")` / `"int4"`: QLoRA).
        targets: a `LoRAConfig` or a dict of its fields (then the other
            arguments are left out), or a preset, or layer-name substrings
            or regexes (a list may
            mix both); every Dense, EinsumDense, Conv2D (groups=1) and
            Embedding whose name (or path) matches is adapted. Presets, for
            the keras-hub backbones in `LORA_TARGET_PRESETS`:
            `"attention"` (q, k, v and output projections), `"mlp"` (gate /
            up / down) and `"all-linear"` (both; never the embeddings or
            the LM head). For any model, `"pointwise"`: every 1x1
            `Conv2D` (a CNN's expand / project / shortcut convolutions,
            e.g. MobileNetV2's, EfficientNet's, ResNet's bottlenecks).
        rank: see `LoRADense`.
        alpha: see `LoRADense`.
        dropout: see `LoRADense`.
        use_rslora: see `LoRADense`.
        trainable: names (substrings or regexes) of other layers that keep
            training, such as the classification head (PEFT's
            `modules_to_save`).
        use_dora: DoRA: a trainable magnitude per output unit (float bases
            only; see `kft.lora_base`).
        init: `"default"` (A random, B zero), `"gaussian"`, `"pissa"` or
            `"olora"` (these two rewrite the kernel to its residual; see
            `kft.lora_init`).

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
    if isinstance(targets, (LoRAConfig, dict)):
        return apply_lora(model, **LoRAConfig.from_value(targets).apply_kwargs())
    if isinstance(targets, str):
        targets = (targets,)
    check_init(init)
    candidates = [layer for layer in all_layers(model)
                  if isinstance(layer, _ADAPTABLE)
                  and not isinstance(layer, _LoRAMixin)]
    chosen = _select(model, targets, candidates)
    if not chosen:
        names = sorted({layer.name for layer in candidates})
        raise ValueError(
            f"apply_lora: targets {list(targets)} match no Dense, EinsumDense, "
            f"Conv2D or Embedding layer. Candidates: "
            f"{names[:30]}{' ...' if len(names) > 30 else ''}")
    for layer in chosen:
        if not layer.built:
            raise ValueError(f"apply_lora: layer {layer.name!r} is not built yet.")
        _check_convertible(layer, use_dora, init)
    for layer in chosen:
        _convert(layer, rank, alpha, dropout, use_rslora, use_dora, init)
    keep = [layer for layer in all_layers(model)
            if trainable and (_matches(layer.name, trainable))]
    train_only(model, chosen + keep)
    _mark_containers(model)
    retrace(model)
    return len(chosen)


def merge_lora(model):
    """Folds every adapter into its kernel and turns the LoRA layers back
    into plain Keras layers, in place. Returns the count.

    On a float base the outputs are unchanged (to float rounding; DoRA
    layers get `m * (W + scale A B) / ||W + scale A B||_c`) and the model
    saves and reloads with plain Keras. On an int8 / int4 base each
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
    with one_gc_collect():
        _merge_into_plain_layers(layers)
    _mark_containers(model)
    retrace(model)
    return len(layers)


def _merge_into_plain_layers(layers):
    for layer in layers:
        layer.merge()
        trainable, non_trainable = trainable_variable_lists(layer)
        names = [n for n in ADAPTER_VARIABLES if getattr(layer, n, None) is not None]
        with unlocked_tracker(layer):
            for name in names:
                variable = getattr(layer, name)
                drop_variable(trainable, variable) or drop_variable(
                    non_trainable, variable)
                delattr(layer, name)
            layer._kft_unmerged = layer._kft_dora_norm = None
            layer.__class__ = _plain_class(layer)


def _quantization(model):
    """The Keras quantization modes of a model's layers, sorted."""
    return sorted({layer.quantization_mode for layer in all_layers(model)
                   if layer.quantization_mode})


def _fingerprint(model):
    """A hash of the base model: its non-LoRA variables' paths and shapes,
    and which layers are quantized how (an int8 base is not its float or
    int4 twin). Float bases hash as before quantization was supported."""
    suffixes = tuple(f"/{name}" for name in ADAPTER_VARIABLES)
    items = sorted((v.path, tuple(v.shape)) for v in model.weights
                   if not v.path.endswith(suffixes))
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
            rank, alpha, targets and a fingerprint of the base model (DoRA
            magnitudes included). `format="peft"`: a directory in Hugging
            Face PEFT's format (`adapter_config.json` +
            `adapter_model.safetensors`, tensors named after the Hugging
            Face modules) that PEFT loads onto the same checkpoint
            (`kft.peft_format.save_peft_adapter`).
        format: `"kft"` or `"peft"`.
        **peft_options: for `"peft"`: `base_model_name_or_path`,
            `task_type`.

    A PiSSA / OLoRA adapter was trained on the residual kernel; the file
    holds it converted (`kft.lora_init.plain_lora_weights`: rank `2 r`,
    exact) for the original base, which is what it loads onto (as PEFT's
    `path_initial_model_for_weight_conversion`). Its base quantized after
    PiSSA (`Quant(W_res) + A B`) is not `W + delta`: kft warns, as PEFT.

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
    layer_meta, arrays = {}, {}
    for layer in layers:
        if layer.merged:
            raise ValueError(
                f"save_adapter: layer {layer.path!r} is merged; unmerge first.")
        layer_meta[layer.path], values = _saved_adapter(layer)
        arrays.update({f"{layer.path}/{k}": v for k, v in values.items()})
    dora = any(layer.use_dora for layer in layers)
    meta = {
        "format": _ADAPTER_FORMAT_DORA if dora else _ADAPTER_FORMAT,
        "fingerprint": _fingerprint(model),
        "quantization": _quantization(model),
        "layers": layer_meta,
    }
    with open(path, "wb") as f:
        np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays)
    return path


def _saved_adapter(layer):
    """(meta, arrays) of one layer as an adapter file holds it: for the
    original base (PiSSA / OLoRA converted)."""
    a, b, rank, alpha = plain_lora_weights(layer)
    if layer.init in KERNEL_INITS and layer.quantization_mode:
        warnings.warn(
            f"save_adapter: layer {layer.path!r} was initialised with "
            f"init={layer.init!r}, then quantized: the adapter, converted for "
            "the original float base, does not reproduce Quant(residual) + "
            "A @ B exactly. Save the model (.keras) to keep it as trained.",
            stacklevel=3)
    meta = {"rank": rank, "alpha": alpha, "dropout": layer.dropout,
            "use_rslora": layer.use_rslora}
    values = {"lora_a": a, "lora_b": b}
    if layer.use_dora:
        meta["use_dora"] = True
        values["lora_magnitude"] = np.asarray(layer.lora_magnitude)
    return meta, values


def _read_adapter(path):
    meta, arrays = read_npz_with_meta(path, "a kft LoRA adapter file")
    if meta.get("format") not in _ADAPTER_FORMATS:
        raise ValueError(
            f"{path!r} is not a kft LoRA adapter file (format "
            f"{meta.get('format')!r}; this kft reads {list(_ADAPTER_FORMATS)}).")
    return meta, arrays


def _check_base(model, meta, path):
    if _fingerprint(model) != meta["fingerprint"]:
        saved, here = meta.get("quantization", []), _quantization(model)
        raise ValueError(
            f"The adapter in {path!r} was trained on a different base model "
            f"(fingerprint {meta['fingerprint']}, this model "
            f"{_fingerprint(model)}; quantization {saved or 'none'} when saved, "
            f"{here or 'none'} here: the base must be quantized as it was).")
    residual = [layer.path for layer in lora_layers(model)
                if layer.init in KERNEL_INITS]
    if residual:
        raise ValueError(
            f"load_adapter: this model's LoRA layers {residual[:3]} started "
            "with init='pissa' / 'olora', so their kernels hold residuals; an "
            f"adapter file is for the original base. Load {path!r} onto the "
            "original model.")


def _create_layers(model, meta):
    """A base without LoRA layers gets them, as the file describes."""
    by_path = {layer.path: layer for layer in all_layers(model, include_self=True)}
    for layer_path, config in meta["layers"].items():
        _convert(by_path[layer_path], config["rank"], config["alpha"],
                 config["dropout"], config["use_rslora"],
                 config.get("use_dora", False))
    train_only(model, [by_path[p] for p in meta["layers"]])
    _mark_containers(model)
    retrace(model)


def _check_layer(layer, layer_path, config, existing):
    if layer is None:
        raise ValueError(
            f"The adapter has layer {layer_path!r}, which this model's LoRA "
            f"layers lack: {sorted(existing)}")
    if layer.adapter_rank != config["rank"]:
        raise ValueError(
            f"Adapter rank {config['rank']} for {layer_path!r} does not "
            f"match the model's LoRA rank {layer.adapter_rank}.")
    if layer.use_dora != config.get("use_dora", False):
        raise ValueError(
            f"The adapter for {layer_path!r} has use_dora="
            f"{config.get('use_dora', False)}; the model's LoRA layer has "
            f"use_dora={layer.use_dora}.")


def load_adapter(model, path, format="kft", name="default"):
    """Loads adapters saved by `save_adapter` onto a model, as `name`.

    A base model without LoRA layers gets them first (same targets,
    ranks and DoRA as saved). A different base model (fingerprint), rank
    or DoRA setting is a clear error; a quantized base must be quantized
    as the one the adapter was saved from (same mode, same layers), and a
    PiSSA / OLoRA model (residual kernels) takes no adapter file. Loading
    under a new name keeps the adapter that was active under its own name
    (`set_adapter` switches back); the loaded one becomes active, assigned
    into the same variables (no retrace). `format="peft"` reads a PEFT
    adapter directory (trained with PEFT in PyTorch, or written by kft)
    with `kft.peft_format.load_peft_adapter`.
    """
    _check_format(format)
    if format == "peft":
        from kft.peft_format import load_peft_adapter

        return load_peft_adapter(model, path, name=name)
    meta, arrays = _read_adapter(path)
    _check_base(model, meta, path)
    if not lora_layers(model):
        _create_layers(model, meta)
    existing = {layer.path: layer for layer in lora_layers(model)}
    if name != active_adapter(model):
        stash_active(model)
    for layer_path, config in meta["layers"].items():
        layer = existing.get(layer_path)
        _check_layer(layer, layer_path, config, existing)
        assign_adapter(layer, {n: arrays[f"{layer_path}/{n}"]
                               for n in ("lora_a", "lora_b", "lora_magnitude")
                               if f"{layer_path}/{n}" in arrays})
    mark_active(model, name)
    return len(meta["layers"])
