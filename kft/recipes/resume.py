"""Exact resume: what a run checkpoint holds, and how it comes back.

A run checkpoint is a directory, written whole under a temporary name and
renamed, holding:

- `model.weights.h5`: every weight (`model.save_weights`), whatever the
  model is: a kft image classifier, a keras-hub text classifier, a causal
  LM with LoRA, QLoRA or a prompt;
- `state.npz` + `state.json`: the optimizer's variables (moments,
  iteration count, so the schedule's position; learning-rate variables,
  so `ReduceLROnPlateau`'s cuts), the model's random-number generator
  states (dropout masks continue as they would have), the trainable flag
  of every layer (gradual unfreezing's progress) and the state of the
  stage's `EarlyStopping` (waits, best value, best weights).

Resuming rebuilds the model from the recipe rather than deserializing it
(keras-hub does not restore every task's compile from `.keras`, and a
causal LM cannot always be reloaded from it), loads the weights and flags,
compiles the stage as the original run did, and restores the optimizer
and callbacks when `fit` starts. The training data comes back to the same
position too (`kft._keras_internals.TrackedDataset`): the same shuffle
order for the epoch that resumes. A `steps_per_epoch` stream cut mid-pass
starts that pass again (see `RecipeRun._fast_forward_data`).
"""

import json
import os
import shutil
import warnings

import keras
import numpy as np

from kft._keras_internals import all_layers
from kft._keras_internals import set_trainable_flag

__all__ = ["restore_callbacks", "restore_model", "restore_optimizer",
           "save_checkpoint"]

WEIGHTS = "model.weights.h5"
ARRAYS = "state.npz"
META = "state.json"


def _to_numpy(variable):
    """A variable's value as a NumPy array numpy can store without pickle
    (bfloat16 and other ml_dtypes are stored as their raw unsigned bits)."""
    value = np.asarray(keras.ops.convert_to_numpy(variable))
    dtype = value.dtype.name
    if value.dtype.kind == "V" or dtype in ("bfloat16", "float8_e4m3fn",
                                            "float8_e5m2"):
        value = value.view(f"uint{8 * value.dtype.itemsize}")
    return value, dtype


def _from_numpy(value, dtype):
    if value.dtype.name != dtype:
        import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with NumPy)

        value = value.view(np.dtype(dtype))
    return value


def _store(arrays, meta, key, variables):
    entries = []
    for index, variable in enumerate(variables):
        value, dtype = _to_numpy(variable)
        arrays[f"{key}/{index}"] = value
        entries.append({"path": getattr(variable, "path", ""), "dtype": dtype,
                        "shape": list(value.shape)})
    meta[key] = entries


def _seed_states(model):
    """The model's random-number generator states (dropout and other
    random layers), which `save_weights` leaves out."""
    return [v for v in model.variables
            if getattr(v, "path", "").endswith("seed_generator_state")]


def _weighted_layers(model):
    """The layers that hold weights, outer first. Weightless layers are
    left out: some are made on first use (a keras-hub preprocessor's
    packer), and their flag trains nothing."""
    return [layer for layer in all_layers(model, include_self=True)
            if layer.weights]


def _callback_states(callbacks, arrays):
    states = []
    for index, callback in enumerate(callbacks):
        if isinstance(callback, keras.callbacks.EarlyStopping):
            best_weights = callback.best_weights
            for j, value in enumerate(best_weights or []):
                arrays[f"callback{index}/{j}"] = np.asarray(value)
            states.append({
                "index": index, "kind": "early_stopping", "wait": callback.wait,
                "best": None if callback.best is None else float(callback.best),
                "best_epoch": callback.best_epoch,
                "best_weights": len(best_weights or [])})
    return states


def save_checkpoint(model, directory, callbacks=()):
    """Writes a run checkpoint directory atomically (see the module doc).

    Args:
        model: the model being trained (compiled or not).
        directory: where the checkpoint goes; written as
            `directory + ".tmp"` first, then renamed. A failure (a full
            disk, say) removes the partial copy and re-raises; an existing
            checkpoint elsewhere is never touched.
        callbacks: the stage's callbacks, whose state is kept
            (`keras.callbacks.EarlyStopping`).
    """
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        model.save_weights(os.path.join(tmp, WEIGHTS))
        arrays, meta = {}, {}
        optimizer = getattr(model, "optimizer", None)
        built = optimizer is not None and optimizer.built
        _store(arrays, meta, "optimizer", optimizer.variables if built else [])
        _store(arrays, meta, "rng", _seed_states(model))
        # By position and class: names get numbered differently when a run
        # is rebuilt in a process that built another model first.
        meta["trainable"] = [[type(layer).__name__, bool(layer.trainable)]
                             for layer in _weighted_layers(model)]
        # Variables frozen one by one (a LoRA base kernel, a tied
        # embedding) have their own flag, which a layer's setter overrides.
        meta["variable_trainable"] = [bool(v.trainable) for v in model.weights]
        meta["callbacks"] = _callback_states(callbacks, arrays)
        with open(os.path.join(tmp, ARRAYS), "wb") as f:
            np.savez(f, **arrays)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read(directory):
    with open(os.path.join(directory, META)) as f:
        meta = json.load(f)
    with np.load(os.path.join(directory, ARRAYS), allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    return meta, arrays


def _assign(variables, entries, arrays, key, what):
    if len(variables) != len(entries):
        raise ValueError(
            f"The checkpoint holds {len(entries)} {what} variables, the "
            f"rebuilt run has {len(variables)}: the run cannot resume exactly.")
    for index, (variable, entry) in enumerate(zip(variables, entries)):
        value = _from_numpy(arrays[f"{key}/{index}"], entry["dtype"])
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"Checkpoint {what} variable {entry['path']!r} has shape "
                f"{tuple(value.shape)}, the rebuilt run's {variable.path!r} "
                f"has {tuple(variable.shape)}.")
        variable.assign(value)


def restore_model(model, directory):
    """Loads a checkpoint's weights, random-number states and trainable
    flags into a model rebuilt the way the run built it."""
    meta, arrays = _read(directory)
    with warnings.catch_warnings():
        # `save_weights` also stored the optimizer, which the rebuilt model
        # has not built yet (`restore_optimizer` loads it in `fit`).
        warnings.filterwarnings("ignore", message="Skipping variable loading "
                                "for optimizer")
        model.load_weights(os.path.join(directory, WEIGHTS))
    _assign(_seed_states(model), meta["rng"], arrays, "rng", "random-state")
    layers = _weighted_layers(model)
    saved = meta["trainable"]
    if [kind for kind, _ in saved] != [type(layer).__name__ for layer in layers]:
        raise ValueError("The checkpoint's layers differ from the rebuilt "
                         "model's: the run cannot resume exactly.")
    # Outer layers first: the setter reaches the sublayers, whose own saved
    # flags then follow.
    for layer, (_, trainable) in zip(layers, saved):
        set_trainable_flag(layer, trainable)
    flags = meta["variable_trainable"]
    if len(flags) != len(model.weights):
        raise ValueError("The checkpoint's weights differ from the rebuilt "
                         "model's: the run cannot resume exactly.")
    for variable, trainable in zip(model.weights, flags):
        variable.trainable = trainable


def restore_optimizer(model, directory):
    """Builds the compiled model's optimizer for its trainable variables and
    loads the checkpoint's optimizer state into it (call inside `fit`,
    before the first step: `RunCheckpoint.on_train_begin`)."""
    meta, arrays = _read(directory)
    optimizer = model.optimizer
    if not meta["optimizer"]:
        return 0
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    _assign(optimizer.variables, meta["optimizer"], arrays, "optimizer",
            "optimizer")
    return len(meta["optimizer"])


def restore_callbacks(callbacks, directory):
    """Gives the stage's `EarlyStopping` back its wait, best value, best
    epoch and best weights (call after its own `on_train_begin` reset)."""
    meta, arrays = _read(directory)
    for state in meta["callbacks"]:
        index = state["index"]
        if index >= len(callbacks) or not isinstance(
                callbacks[index], keras.callbacks.EarlyStopping):
            raise ValueError("The checkpoint's stage callbacks differ from "
                             "the run's: the run cannot resume exactly.")
        callback = callbacks[index]
        callback.wait, callback.best_epoch = state["wait"], state["best_epoch"]
        callback.best = state["best"]
        if state["best_weights"]:
            callback.best_weights = [arrays[f"callback{index}/{j}"]
                                     for j in range(state["best_weights"])]
