"""Writing kft LoRA adapters as a Hugging Face PEFT adapter directory
(naming and shapes: `kft.lora.peft_families`).
"""

import collections
import json
import math
import os
import warnings

import keras
import numpy as np

from kft._keras_internals import all_layers
from kft._keras_internals import kernel_variable
from kft.backbones.anatomy import describe
from kft.backbones.anatomy import is_keras_hub_backbone
from kft.lora.base import lora_layers
from kft.lora.peft_families import CONFIG_FILE
from kft.lora.peft_families import MAGNITUDE_SUFFIX
from kft.lora.peft_families import TASK_TYPES
from kft.lora.peft_families import TENSOR_PREFIX
from kft.lora.peft_families import WEIGHTS_FILE
from kft.lora.peft_families import find_family
from kft.lora.peft_families import layer_fans
from kft.lora.peft_families import module_map

__all__ = ["save_peft_adapter"]


def _number(value):
    """An integral float as an int (PEFT writes `lora_alpha: 16`)."""
    value = float(value)
    return int(value) if value.is_integer() else value


def _most_common(values):
    counts = collections.Counter(values)
    return max(counts, key=lambda value: (counts[value], -values.index(value)))


def _pattern_key(hf_name):
    """A `rank_pattern` key for a module: its path less the first component.

    Old PEFT releases match keys with `.*\\.{key}$` (a dot before the key),
    new ones with `(.*\\.)?({key})$`; a key that drops the first component
    of the full path matches that module, and only it, under both.
    """
    return hf_name.split(".", 1)[1] if "." in hf_name else hf_name


def _target_modules(adapted, known):
    """PEFT `target_modules`: short names (`["query", "value"]`) when they
    select exactly the adapted modules, else their full paths."""
    short = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    selected = {name for name in known
                if any(name == s or name.endswith("." + s) for s in short)}
    return short if selected == set(adapted) else sorted(adapted)


def _check_savable(layer):
    if layer.merged:
        raise ValueError(
            f"save_peft_adapter: LoRA layer {layer.path!r} is merged into its "
            "kernel; call `layer.unmerge()` first.")
    init = getattr(layer, "init", "default")
    if init in ("pissa", "olora"):
        # Its kernel is the residual W - s*A0@B0: the adapter alone is wrong
        # on the original checkpoint.
        raise ValueError(
            f"save_peft_adapter: layer {layer.path!r} was initialised with "
            f"init={init!r}, whose base kernel is a residual; allowed: plain "
            "LoRA (init='default' or 'gaussian').")
    if type(layer).__name__ not in ("LoRADense", "LoRAEinsumDense"):
        raise ValueError(
            f"save_peft_adapter: layer {layer.path!r} is a "
            f"{type(layer).__name__}; PEFT export covers Dense and EinsumDense "
            "projections only.")


def _magnitude(members, plain):
    """PEFT's `lora_magnitude_vector` of a DoRA module (`None` without
    DoRA): the members' magnitudes by output rows; a fused member without
    LoRA gets its kernel's column norms (a DoRA factor of exactly 1)."""
    if not any(getattr(layer, "use_dora", False) for layer in members):
        return None
    parts = []
    for layer, base in zip(members, plain):
        if layer is not None:
            parts.append(np.asarray(layer.trained_value("lora_magnitude"),
                                    "float32"))
        else:
            kernel = np.asarray(kernel_variable(base), "float32")
            parts.append(np.linalg.norm(kernel.reshape(layer_fans(base)), axis=0))
    return np.concatenate(parts)


def _export_group(members, plain):
    """PEFT (A, B, r, lora_alpha, DoRA magnitude or None) of one Hugging
    Face module from the kft LoRA layers it holds (`None` for a member
    without LoRA).

    A plain module, or fused members sharing one `lora_a` and scale (as
    loaded from PEFT), give `A = lora_a.T` and `B = lora_b.T` stacked.
    Otherwise (GPT-2's query, key and value adapted separately) the fused
    module gets the exact block form: `A` stacks the members' `lora_a.T`,
    `B` is block diagonal, rank the sum of theirs, same scale. DoRA's
    column norms are per output row, so either form keeps them.
    """
    present = [layer for layer in members if layer is not None]
    first = present[0]
    magnitude = _magnitude(members, plain)
    shared = len(present) == len(members) and all(
        layer.rank == first.rank and math.isclose(layer.scale, first.scale)
        and np.array_equal(np.asarray(layer.lora_a), np.asarray(first.lora_a))
        for layer in present)
    if shared:
        b = np.concatenate([np.asarray(layer.trained_value("lora_b")).T
                            for layer in members])
        return np.asarray(first.lora_a).T, b, first.rank, first.alpha, magnitude
    rank = sum(layer.rank for layer in present)
    alpha = first.scale * (math.sqrt(rank) if first.use_rslora else rank)
    a = np.concatenate([np.asarray(layer.lora_a).T for layer in present])
    blocks, column = [], 0
    for layer, base in zip(members, plain):
        block = np.zeros((layer_fans(base)[1], rank), "float32")
        if layer is not None:
            block[:, column:column + layer.rank] = (
                np.asarray(layer.trained_value("lora_b")).T
                * (layer.scale / first.scale))
            column += layer.rank
        blocks.append(block)
    return a, np.concatenate(blocks), rank, alpha, magnitude


def _exports(model, family, backbone, prefix):
    """[(module path with task prefix, A, B, r, lora_alpha, magnitude)], the LoRA
    layers, and every mapped module path (for `target_modules`)."""
    groups = module_map(backbone, family)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_peft_adapter: the model has no LoRA layers; "
                         "call kft.lora.apply_lora first.")
    mapped = {path for paths in groups.values() for path in paths}
    for layer in layers:
        _check_savable(layer)
        if layer.path not in mapped:
            raise ValueError(
                f"save_peft_adapter: LoRA layer {layer.path!r} has no Hugging "
                f"Face counterpart in the {family.hf_model} name map. Layers "
                f"that map (inside each block): "
                f"{sorted(family.modules) + sorted(_fused_subs(family))}"
                + (f" and {sorted(family.top_modules)}" if family.top_modules
                   else "") + ".")
    by_path = {layer.path: layer for layer in layers}
    plain = {layer.path: layer for layer in all_layers(backbone)}
    exports = []
    for hf, paths in sorted(groups.items()):
        members = [by_path.get(path) for path in paths]
        if any(layer is not None for layer in members):
            exports.append((prefix + hf, *_export_group(
                members, [plain[path] for path in paths])))
    return exports, layers, sorted(groups)


def _fused_subs(family):
    return [sub for subs in family.fused.values() for sub in subs]


def _lora_settings(exports, layers):
    """r, lora_alpha, rank_pattern, alpha_pattern, lora_dropout, use_rslora,
    use_dora."""
    for attribute in ("dropout", "use_rslora", "use_dora"):
        values = sorted({getattr(layer, attribute) for layer in layers})
        if len(values) > 1:
            raise ValueError(
                f"save_peft_adapter: PEFT has one {attribute} for all modules; "
                f"the LoRA layers differ. Received: {attribute} in {values}.")
    ranks = [export[3] for export in exports]
    alphas = [float(export[4]) for export in exports]
    rank, alpha = _most_common(ranks), _most_common(alphas)
    return {
        "r": rank,
        "lora_alpha": _number(alpha),
        "rank_pattern": {_pattern_key(name): r for name, _, _, r, *_ in exports
                         if r != rank},
        "alpha_pattern": {_pattern_key(name): _number(a)
                          for name, _, _, _, a, _ in exports
                          if not math.isclose(a, alpha)},
        "lora_dropout": layers[0].dropout,
        "use_rslora": layers[0].use_rslora,
        "use_dora": bool(layers[0].use_dora),
    }


def _head_tensors(model, family, task_type):
    """PEFT `modules_to_save` tensors of the task head, and their names."""
    heads = family.heads.get(task_type, {})
    by_name = {layer.name: layer for layer in all_layers(model)}
    tensors, names = {}, []
    for keras_name, hf_name in heads.items():
        layer = by_name.get(keras_name)
        if not isinstance(layer, keras.layers.Dense):
            warnings.warn(
                f"save_peft_adapter: task_type={task_type!r} has the head "
                f"{hf_name!r}, but the model has no Dense layer {keras_name!r}; "
                "no modules_to_save written (PEFT will start that head anew).",
                stacklevel=3)
            continue
        kernel = np.asarray(kernel_variable(layer), dtype="float32")
        tensors[f"{TENSOR_PREFIX}{hf_name}.weight"] = np.ascontiguousarray(kernel.T)
        if layer.bias is not None:
            tensors[f"{TENSOR_PREFIX}{hf_name}.bias"] = np.asarray(
                layer.bias, dtype="float32")
        names.append(hf_name)
    return tensors, names


def _resolve_task_type(model, family, task_type, caller):
    given = task_type
    if task_type == "auto":
        task_type = (None if is_keras_hub_backbone(model)
                     else TASK_TYPES.get(describe(model).task))
    if task_type not in family.prefixes:
        derived = " (derived from the model's task)" if given == "auto" else ""
        raise ValueError(
            f"{caller}: task_type must be 'auto' or one of "
            f"{list(family.prefixes)} for a {family.hf_model}. "
            f"Received: task_type={task_type!r}{derived}.")
    return task_type


def save_peft_adapter(model, path, *, base_model_name_or_path=None,
                      task_type="auto"):
    """Writes a model's LoRA adapters as a Hugging Face PEFT adapter directory.

    Args:
        model: a keras-hub backbone or task (`supported_architectures()`:
            BERT, Llama, Llama 3, Mistral, Qwen, Qwen 3, Gemma's MLP,
            GPT-2) with kft LoRA layers (`kft.lora.apply_lora`).
        path: the directory to write (created if needed).
        base_model_name_or_path: the Hugging Face model the adapter goes
            on (e.g. `"meta-llama/Llama-3.2-1B"`), written to the config.
        task_type: PEFT's task type, which picks the Hugging Face class and
            so the module paths: `"auto"` (a bare backbone: `None`, a
            `CausalLM`: `"CAUSAL_LM"`, a `TextClassifier`: `"SEQ_CLS"`),
            or one of them explicitly.

    Returns:
        `path`. Layers whose LoRA settings differ get PEFT's
        `rank_pattern` / `alpha_pattern`; DoRA layers write `use_dora:
        true` and PEFT's `<module>.lora_magnitude_vector`. Different
        dropouts, rsLoRA or DoRA flags and merged layers are refused.

    Example:

    >>> kft.lora.apply_lora(llama_causal_lm, targets=("query", "value"))
    >>> save_peft_adapter(llama_causal_lm, "adapter/",
    ...                   base_model_name_or_path="meta-llama/Llama-3.2-1B")
    """
    _, family, backbone = find_family(model, "save_peft_adapter")
    task_type = _resolve_task_type(model, family, task_type, "save_peft_adapter")
    prefix = family.prefixes[task_type]
    exports, layers, known = _exports(model, family, backbone, prefix)
    tensors = {}
    for name, a, b, _, _, magnitude in exports:
        for part, value in (("A", a), ("B", b)):
            tensors[f"{TENSOR_PREFIX}{name}.lora_{part}.weight"] = (
                np.ascontiguousarray(value, dtype="float32"))
        if magnitude is not None:
            tensors[f"{TENSOR_PREFIX}{name}{MAGNITUDE_SUFFIX}"] = (
                np.ascontiguousarray(magnitude, dtype="float32"))
    head_tensors, modules_to_save = _head_tensors(model, family, task_type)
    tensors.update(head_tensors)
    adapted = [export[0][len(prefix):] for export in exports]
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        **_lora_settings(exports, layers),
        "target_modules": _target_modules(adapted, known),
        "fan_in_fan_out": family.fan_in_fan_out,
        "bias": "none",
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    _write(path, config, tensors)
    return path


def _write(path, config, tensors):
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
