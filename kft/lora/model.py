"""Adapting a model: which layers LoRA targets (names, regexes and the
`attention` / `mlp` / `all-linear` / `pointwise` presets), `apply_lora`
and `merge_lora`.
"""

import re

import keras

from kft._keras_internals import all_layers
from kft._keras_internals import freeze_variable
from kft._keras_internals import one_gc_collect
from kft._keras_internals import trainable_variable_lists
from kft._keras_internals import unlocked_tracker
from kft.backbones.anatomy import is_keras_hub_backbone
from kft.backbones.freezing import train_only
from kft.lora.base import ADAPTER_VARIABLES
from kft.lora.base import QUANTIZED_MODES
from kft.lora.base import _LoRAMixin
from kft.lora.base import drop_variable
from kft.lora.base import lora_layers
from kft.lora.base import retrace
from kft.lora.config import LoRAConfig
from kft.lora.conv import LoRAConv2D
from kft.lora.dense import LoRADense
from kft.lora.dense import LoRAEinsumDense
from kft.lora.dense import check_quantize_mode
from kft.lora.dense import einsum_structure
from kft.lora.embedding import LoRAEmbedding
from kft.lora.embedding import LoRAReversibleEmbedding
from kft.lora.initializers import KERNEL_INITS
from kft.lora.initializers import check_init
from kft.lora.shared import share_inputs

__all__ = ["LORA_TARGET_PRESETS", "apply_lora", "merge_lora"]

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
        einsum_structure(layer.equation, layer.kernel.shape)
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
            check_quantize_mode(layer, mode, config)
            type_check = False
        return keras_quantize(mode, config=config, type_check=type_check, **kwargs)

    quantize.kft_lora_route = True
    layer.quantize = quantize


def convert_layer(layer, rank, alpha, dropout, use_rslora, use_dora=False,
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
    Whisper encoder layers in `kft.models.audio.whisper_encoder`'s functional
    model): their configs hold hyperparameters, not sublayers."""
    return is_keras_hub_backbone(layer) or (
        base.__module__.startswith("keras_hub.")
        and not isinstance(layer, keras.Model))


def mark_containers(model):
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
            convert_layer(layer, lora["rank"], lora["alpha"], lora["dropout"],
                     lora["use_rslora"], lora.get("use_dora", False),
                     lora.get("init", "default"))
            if lora["merged"]:
                layer.merged = True
        for layer, flag in zip(layers, config["trainable"]):
            layer.trainable = flag
        mark_containers(model)
        share_inputs(model)
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
            only; see `kft.lora.base`).
        init: `"default"` (A random, B zero), `"gaussian"`, `"pissa"` or
            `"olora"` (these two rewrite the kernel to its residual; see
            `kft.lora.initializers`).

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
        convert_layer(layer, rank, alpha, dropout, use_rslora, use_dora, init)
    keep = [layer for layer in all_layers(model)
            if trainable and (_matches(layer.name, trainable))]
    train_only(model, chosen + keep)
    mark_containers(model)
    share_inputs(model)
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
    mark_containers(model)
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
