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
"""

import hashlib
import json
import math
import re

import keras
import numpy as np
from keras import ops

from kft._keras_internals import all_layers
from kft._keras_internals import kernel_variable
from kft._keras_internals import trainable_variable_lists
from kft._keras_internals import unlocked_tracker
from kft.anatomy import is_keras_hub_backbone
from kft.freezing import train_only

__all__ = ["LoRADense", "LoRAEinsumDense", "active_adapter", "apply_lora",
           "disable_adapters", "enable_adapters", "load_adapter", "lora_layers",
           "merge_lora", "save_adapter", "set_adapter"]

_FROZEN = ("kernel", "bias")
_ADAPTER_FORMAT = "kft-lora-adapter/1"


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

    def _delta_kernel(self):
        return ops.reshape(ops.matmul(self.lora_a, self.lora_b) * self.scale,
                           kernel_variable(self).shape)

    def merge(self):
        """Folds `scale * A @ B` into the kernel; outputs unchanged."""
        if not self.merged:
            kernel_variable(self).assign(kernel_variable(self) + ops.cast(self._delta_kernel(),
                                                        kernel_variable(self).dtype))
            self.lora_active.assign(0.0)
            self.merged = True

    def unmerge(self):
        """Takes the update back out of the kernel."""
        if self.merged:
            kernel_variable(self).assign(kernel_variable(self) - ops.cast(self._delta_kernel(),
                                                        kernel_variable(self).dtype))
            self.lora_active.assign(1.0)
            self.merged = False

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
    nothing; both are float32. Kernel and bias stay frozen.

    Example:

    >>> layer = LoRADense(4, rank=2, alpha=4)
    >>> layer(keras.ops.ones((1, 3))).shape
    (1, 4)
    """

    def __init__(self, units, rank=8, alpha=16, dropout=0.0, use_rslora=False,
                 merged=False, **kwargs):
        super().__init__(units, **kwargs)
        self._init_lora(rank, alpha, dropout, use_rslora, merged)

    def _adapter_dims(self):
        self._contracted = 1
        self._output_dims = (self.units,)
        return kernel_variable(self).shape[0], self.units

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
    """For `...x,xk->...k` style equations: (contracted axes, output dims).

    The contracted axes must be the input's last axes and the kernel's
    first, and the output must be the input's other axes followed by the
    kernel's other axes, so that `x @ A @ B` reshaped is the update.
    """
    match = re.fullmatch(r"(\w+),(\w+)->(\w+)", equation.replace(" ", ""))
    if not match:
        raise ValueError(f"LoRA does not support the equation {equation!r}.")
    inputs, kernel, output = match.groups()
    contracted = [c for c in kernel if c not in output]
    n = len(contracted)
    if (list(kernel[:n]) != contracted or list(inputs[-n:]) != contracted
            or output != inputs[:-n] + kernel[n:]):
        raise ValueError(
            f"LoRA supports EinsumDense equations that contract the input's "
            f"last axes with the kernel's first (e.g. 'abc,cde->abde'). "
            f"Received: {equation!r}")
    return n, tuple(int(d) for d in kernel_shape[n:])


@keras.saving.register_keras_serializable(package="kft")
class LoRAEinsumDense(_LoRAMixin, keras.layers.EinsumDense):
    """An EinsumDense with a frozen kernel and a low-rank update.

    keras-hub attention uses EinsumDense for query, key, value
    (`abc,cde->abde`) and output (`abcd,cde->abe`). The input's contracted
    axes are flattened, so the update is `x @ A @ B` reshaped, never the
    full kernel. Arguments as `LoRADense`, plus EinsumDense's.
    """

    def __init__(self, equation, output_shape, rank=8, alpha=16, dropout=0.0,
                 use_rslora=False, merged=False, **kwargs):
        super().__init__(equation, output_shape, **kwargs)
        self._init_lora(rank, alpha, dropout, use_rslora, merged)

    def _adapter_dims(self):
        self._contracted, self._output_dims = _einsum_structure(
            self.equation, kernel_variable(self).shape)
        fan_in = math.prod(kernel_variable(self).shape[: self._contracted])
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


def _convert(layer, rank, alpha, dropout, use_rslora):
    """Turns a built Dense / EinsumDense into its LoRA class, in place."""
    target = LoRAEinsumDense if isinstance(layer, keras.layers.EinsumDense) \
        else LoRADense
    if isinstance(layer, keras.layers.EinsumDense):
        _einsum_structure(layer.equation, kernel_variable(layer).shape)  # supported?
    trainable, non_trainable = trainable_variable_lists(layer)
    with unlocked_tracker(layer):
        layer.__class__ = target
        layer._init_lora(rank, alpha, dropout, use_rslora, merged=False)
        for variable in (kernel_variable(layer), layer.bias):
            if variable is not None and _drop(trainable, variable):
                non_trainable.append(variable)
                variable.trainable = False
        layer._build_adapters()


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


def apply_lora(model, targets=("query", "value"), rank=8, alpha=16,
               dropout=0.0, use_rslora=False, trainable=()):
    """Adds LoRA adapters to the matching layers of a built model, in place.

    Args:
        model: a built Keras model (keras-hub backbones included).
        targets: layer-name substrings or regexes; every Dense and
            EinsumDense whose name (or path) matches is adapted.
        rank, alpha, dropout, use_rslora: see `LoRADense`.
        trainable: names (substrings or regexes) of other layers that keep
            training, such as the classification head (PEFT's
            `modules_to_save`).

    Returns:
        The number of layers adapted. Everything else, except what
        `trainable` names, becomes untrainable.
    """
    if isinstance(targets, str):
        targets = (targets,)
    candidates = [
        layer for layer in all_layers(model)
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
        and not isinstance(layer, _LoRAMixin)
    ]
    chosen = [layer for layer in candidates
              if _matches(layer.name, targets) or _matches(layer.path, targets)]
    if not chosen:
        names = sorted({layer.name for layer in candidates})
        raise ValueError(
            f"apply_lora: targets {list(targets)} match no Dense or EinsumDense "
            f"layer. Candidates: {names[:30]}{' ...' if len(names) > 30 else ''}")
    for layer in chosen:
        if not layer.built:
            raise ValueError(f"apply_lora: layer {layer.name!r} is not built yet.")
        _convert(layer, rank, alpha, dropout, use_rslora)
    keep = [layer for layer in all_layers(model)
            if trainable and (_matches(layer.name, trainable))]
    train_only(model, chosen + keep)
    _mark_containers(model)
    return len(chosen)


def merge_lora(model):
    """Folds every adapter into its kernel and turns the LoRA layers back
    into plain Dense / EinsumDense, in place: outputs are unchanged and
    the model saves and reloads with plain Keras. Returns the count."""
    layers = lora_layers(model)
    for layer in layers:
        layer.merge()
        plain = keras.layers.EinsumDense if isinstance(layer, LoRAEinsumDense) \
            else keras.layers.Dense
        trainable, non_trainable = trainable_variable_lists(layer)
        with unlocked_tracker(layer):
            for variable in (layer.lora_a, layer.lora_b):
                _drop(trainable, variable)
            _drop(non_trainable, layer.lora_active)
            del layer.lora_a, layer.lora_b, layer.lora_active
            layer.__class__ = plain
    _mark_containers(model)
    return len(layers)


def _fingerprint(model):
    """A hash of the base model: its non-LoRA variables' paths and shapes."""
    items = sorted(
        (v.path, tuple(v.shape)) for v in model.weights
        if not v.path.endswith(("/lora_a", "/lora_b", "/lora_active")))
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def save_adapter(model, path):
    """Writes the adapters alone (`.npz`), keyed by variable path, with
    their rank, alpha, targets and a fingerprint of the base model."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers.")
    meta = {
        "format": _ADAPTER_FORMAT,
        "fingerprint": _fingerprint(model),
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


def load_adapter(model, path, name="default"):
    """Loads adapters saved by `save_adapter` onto a model, as `name`.

    A base model without LoRA layers gets them first (same targets and
    ranks as saved). A different base model (fingerprint) or rank is a
    clear error. Loading under a new name keeps the adapter that was
    active under its own name (`set_adapter` switches back); the loaded
    one becomes active.
    """
    with np.load(path) as data:
        meta = json.loads(str(data["__meta__"]))
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
    if meta.get("format") != _ADAPTER_FORMAT:
        raise ValueError(f"{path!r} is not a kft LoRA adapter file.")
    if _fingerprint(model) != meta["fingerprint"]:
        raise ValueError(
            f"The adapter in {path!r} was trained on a different base model "
            f"(fingerprint {meta['fingerprint']}, this model "
            f"{_fingerprint(model)}).")
    existing = {layer.path: layer for layer in lora_layers(model)}
    if not existing:
        by_path = {layer.path: layer for layer in all_layers(model, include_self=True)}
        for layer_path, config in meta["layers"].items():
            _convert(by_path[layer_path], config["rank"], config["alpha"],
                     config["dropout"], config["use_rslora"])
        train_only(model, [by_path[p] for p in meta["layers"]])
        _mark_containers(model)
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
