"""Several adapters on one base: names, switching, combining.

Every named adapter of a model lives in the same LoRA variables: the
active one in the variables themselves, the others as host copies.
`set_adapter` assigns the chosen values into those variables, so the
train / predict functions Keras traced keep running, without a retrace,
and an optimizer compiled for the model keeps working (its slots, such
as Adam's moments, are shared by the adapters: reset them, or recompile,
to train each adapter from a clean state).

`combine_adapters` builds a new named adapter from a weighted sum of
others, as PEFT's `add_weighted_adapter`: `"cat"` concatenates their
ranks (exact: `scale * [w1 A1 | w2 A2] [B1 ; B2] = w1 scale A1 B1 + w2
scale A2 B2`), `"linear"` sums `A`s and `B`s of equal rank (not exact:
the product gains cross terms `A1 B2`, `A2 B1`). A combined adapter of
higher rank than the layers grows them once (zero-padding every other
adapter, which is exact); that one change retraces the model, and a
compiled model must be compiled again before it trains.
"""

import contextlib
import math

import numpy as np

from kft._keras_internals import trainable_variable_lists
from kft._keras_internals import unlocked_tracker
from kft.lora.base import drop_variable
from kft.lora.base import lora_layers
from kft.lora.base import retrace
from kft.lora.initializers import KERNEL_INITS

__all__ = ["COMBINATIONS", "active_adapter", "combine_adapters",
           "adapters_disabled", "disable_adapters", "enable_adapters",
           "set_adapter"]

COMBINATIONS = ("cat", "linear")


def adapter_values(layer):
    """One layer's adapter as `{variable name: array}` (host copies)."""
    names = ("lora_a", "lora_b") + (("lora_magnitude",) if layer.use_dora else ())
    return {name: np.array(layer.trained_value(name)) for name in names}


def assign_adapter(layer, values):
    """Assigns an adapter into the layer's own variables (traced functions
    see it, no retrace). One of a lower rank is zero-padded, exactly."""
    a, b = np.asarray(values["lora_a"]), np.asarray(values["lora_b"])
    missing = layer.adapter_rank - a.shape[1]
    if missing < 0:
        raise ValueError(
            f"An adapter of rank {a.shape[1]} does not fit LoRA layer "
            f"{layer.path!r} of rank {layer.adapter_rank}.")
    if missing:
        a = np.pad(a, ((0, 0), (0, missing)))
        b = np.pad(b, ((0, missing), (0, 0)))
    layer.lora_a.assign(a)
    layer.assign_trained("lora_b", b)  # switched off: into the parked copy
    if layer.use_dora:
        layer.assign_trained("lora_magnitude", values["lora_magnitude"])


def _adapter_store(model):
    if not hasattr(model, "_kft_adapters"):
        model._kft_adapters = {}
        model._kft_active_adapter = "default"
    return model._kft_adapters


def stash_active(model):
    """Keeps the current adapter values under the active name."""
    store = _adapter_store(model)
    store[model._kft_active_adapter] = {
        layer.path: adapter_values(layer) for layer in lora_layers(model)}


def _known(model):
    return sorted(set(_adapter_store(model)) | {model._kft_active_adapter})


def active_adapter(model):
    """The name of the adapter the model runs with."""
    _adapter_store(model)
    return model._kft_active_adapter


def mark_active(model, name):
    """Records `name` as the adapter now in the layers' variables."""
    _adapter_store(model)
    model._kft_active_adapter = name


def set_adapter(model, name):
    """Switches the model to the adapter loaded (or combined) as `name`.

    The values are assigned into the same variables, so a compiled model
    keeps its traced functions: no retrace.
    """
    store = _adapter_store(model)
    if name not in _known(model):
        raise ValueError(f"No adapter named {name!r}. Loaded: {_known(model)}")
    if name == model._kft_active_adapter:
        return
    stash_active(model)
    for layer in lora_layers(model):
        assign_adapter(layer, store[name][layer.path])
    model._kft_active_adapter = name


def disable_adapters(model):
    """Runs the base model alone (adapters kept, not merged).

    Each adapter is parked (`kft.lora.base`): its `B` kept on the host and
    the variable zeroed, so the model's traced functions run the base
    without a retrace (and `save_adapter` still writes the adapters as
    trained). Not for training: use `adapters_disabled` for a reference
    pass inside a step.
    """
    for layer in lora_layers(model):
        if layer.merged:
            raise ValueError(
                f"Layer {layer.path!r} is merged: unmerge it before disabling.")
    for layer in lora_layers(model):
        layer._park()


def enable_adapters(model):
    """Undoes `disable_adapters` (no retrace either)."""
    for layer in lora_layers(model):
        if layer._switched_off:
            layer._unpark()


@contextlib.contextmanager
def adapters_disabled(model):
    """Within the block, calls of `model` run its base alone.

    For use inside a traced step (the reference pass of DPO or GRPO): the
    calls made in the block are traced without any adapter work, the
    calls after it with the adapters, and nothing retraces. Outside a
    traced step, eager calls in the block run the base; a function traced
    earlier does not see the block: `disable_adapters` switches those.

    Example:

    ```python
    with kft.lora.adapters_disabled(lm):
        reference_logits = lm(x, training=False)
    ```
    """
    before = {layer: layer._kft_adapter_off for layer in lora_layers(model)}
    for layer in before:
        layer._kft_adapter_off = True
    try:
        yield model
    finally:
        for layer, off in before.items():
            layer._kft_adapter_off = off


def _check_combinable(model, weights, name, combination):
    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}. "
                         f"Received: combination={combination!r}")
    if not isinstance(weights, dict) or not weights:
        raise ValueError("weights must be a non-empty dict of adapter name -> "
                         f"weight. Received: weights={weights!r}")
    unknown = sorted(set(weights) - set(_known(model)))
    if unknown:
        raise ValueError(f"No adapter named {unknown}. Loaded: {_known(model)}")
    if name in _known(model):
        raise ValueError(f"An adapter named {name!r} exists already: pick a "
                         f"new name. Loaded: {_known(model)}")
    for layer in lora_layers(model):
        if layer.use_dora or layer.init in KERNEL_INITS or layer.merged:
            raise ValueError(
                f"combine_adapters: layer {layer.path!r} has use_dora="
                f"{layer.use_dora}, init={layer.init!r}, merged={layer.merged}; "
                "only plain, unmerged LoRA adapters combine (DoRA's norm is not "
                "linear in the update, PiSSA / OLoRA adapters hold the base's "
                "principal part).")


def _combine(parts, combination):
    """`parts`: [(values, weight)] -> the combined values."""
    a = [values["lora_a"] for values, _ in parts]
    b = [values["lora_b"] for values, _ in parts]
    weights = [float(weight) for _, weight in parts]
    if combination == "cat":
        return {"lora_a": np.concatenate([w * x for w, x in zip(weights, a)], 1),
                "lora_b": np.concatenate(b, 0)}
    ranks = sorted({x.shape[1] for x in a})
    if len(ranks) > 1:
        raise ValueError(f"combination='linear' needs adapters of one rank. "
                         f"Received ranks {ranks}; use combination='cat'.")
    # PEFT's split of each weight: sqrt(|w|) on both sides, the sign on A.
    roots = [math.sqrt(abs(w)) for w in weights]
    signs = [1.0 if w >= 0 else -1.0 for w in weights]
    return {"lora_a": sum(s * r * x for s, r, x in zip(signs, roots, a)),
            "lora_b": sum(r * x for r, x in zip(roots, b))}


def combine_adapters(model, weights, name, combination="cat"):
    """Adds the adapter `name`, a weighted combination of named adapters.

    Args:
        model: a model with kft LoRA layers and named adapters
            (`load_adapter(..., name=)`, or the active one).
        weights: `{adapter name: weight}`; weights may be negative.
        name: the new adapter's name (`set_adapter(model, name)` runs it).
        combination: `"cat"` (exact: `sum_i w_i * scale * A_i B_i`, rank the
            sum of the ranks) or `"linear"` (PEFT's: `A = sum_i sign(w_i)
            sqrt|w_i| A_i`, `B = sum_i sqrt|w_i| B_i`, one rank; not exact).

    Returns:
        The new adapter's rank (the largest over the layers). Where it
        exceeds a layer's rank, the layer grows to it (see the module
        docstring: one retrace, recompile before training).

    Example:

    ```python
    load_adapter(model, "a.npz", name="a")
    load_adapter(model, "b.npz", name="b")
    combine_adapters(model, {"a": 0.5, "b": 0.5}, name="ab")
    set_adapter(model, "ab")
    ```
    """
    _check_combinable(model, weights, name, combination)
    stash_active(model)
    store = _adapter_store(model)
    layers = lora_layers(model)
    combined = {layer.path: _combine([(store[n][layer.path], w)
                                      for n, w in weights.items()], combination)
                for layer in layers}
    grown = [layer for layer in layers
             if combined[layer.path]["lora_a"].shape[1] > layer.adapter_rank]
    for layer in grown:
        _grow_rank(layer, combined[layer.path]["lora_a"].shape[1])
    if grown:
        retrace(model)
    store[name] = combined
    return max(values["lora_a"].shape[1] for values in combined.values())


def _grow_rank(layer, rank):
    """New, larger `lora_a` / `lora_b` variables holding the current
    adapter zero-padded; alpha follows, so the scale is unchanged."""
    values, scale = adapter_values(layer), layer.scale
    trainable, _ = trainable_variable_lists(layer)
    fan_in, fan_out = layer._fans
    with unlocked_tracker(layer):
        for variable in (layer.lora_a, layer.lora_b):
            drop_variable(trainable, variable)
        del layer.lora_a, layer.lora_b
        layer.adapter_rank = rank
        if not layer._keras_owns_rank:
            layer.rank = rank
        layer.alpha = scale * (math.sqrt(rank) if layer.use_rslora else rank)
        layer.lora_a = layer.add_weight(
            name="lora_a", shape=(fan_in, rank), initializer="zeros",
            dtype="float32", autocast=False)
        layer.lora_b = layer.add_weight(
            name="lora_b", shape=(rank, fan_out), initializer="zeros",
            dtype="float32", autocast=False)
    assign_adapter(layer, values)
