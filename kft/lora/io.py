"""Adapter files: `save_adapter` / `load_adapter` write and read the
adapters alone, in kft's format (npz with metadata) or PEFT's.
"""

import hashlib
import json
import warnings

import numpy as np

from kft._keras_internals import all_layers
from kft.backbones.freezing import train_only
from kft.lora.adapters import active_adapter
from kft.lora.adapters import assign_adapter
from kft.lora.adapters import mark_active
from kft.lora.adapters import stash_active
from kft.lora.base import ADAPTER_VARIABLES
from kft.lora.base import lora_layers
from kft.lora.base import retrace
from kft.lora.initializers import KERNEL_INITS
from kft.lora.initializers import plain_lora_weights
from kft.lora.model import convert_layer
from kft.lora.model import mark_containers
from kft.lora.shared import share_inputs
from kft.utils.safe_npz import read_npz_with_meta

__all__ = ["load_adapter", "save_adapter"]

_ADAPTER_FORMAT = "kft-lora-adapter/1"
# Written when an adapter holds what version 1 readers would drop (DoRA).
_ADAPTER_FORMAT_DORA = "kft-lora-adapter/2"
_ADAPTER_FORMATS = (_ADAPTER_FORMAT, _ADAPTER_FORMAT_DORA)


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
            (`kft.lora.save_peft_adapter`).
        format: `"kft"` or `"peft"`.
        **peft_options: for `"peft"`: `base_model_name_or_path`,
            `task_type`.

    A PiSSA / OLoRA adapter was trained on the residual kernel; the file
    holds it converted (`kft.lora.initializers.plain_lora_weights`: rank `2 r`,
    exact) for the original base, which is what it loads onto (as PEFT's
    `path_initial_model_for_weight_conversion`). Its base quantized after
    PiSSA (`Quant(W_res) + A B`) is not `W + delta`: kft warns, as PEFT.

    Returns:
        `path`.
    """
    _check_format(format)
    if format == "peft":
        from kft.lora.peft_save import save_peft_adapter

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
        convert_layer(by_path[layer_path], config["rank"], config["alpha"],
                 config["dropout"], config["use_rslora"],
                 config.get("use_dora", False))
    train_only(model, [by_path[p] for p in meta["layers"]])
    mark_containers(model)
    share_inputs(model)
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
    with `kft.lora.load_peft_adapter`.
    """
    _check_format(format)
    if format == "peft":
        from kft.lora.peft_load import load_peft_adapter

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
