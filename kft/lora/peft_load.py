"""Reading a Hugging Face PEFT adapter directory (from PEFT or from kft)
into kft LoRA layers (naming and shapes: `kft.lora.peft_families`).
"""

import collections
import json
import math
import os
import re
import warnings

import keras
import numpy as np

from kft._keras_internals import all_layers
from kft._keras_internals import kernel_variable
from kft.backbones.freezing import train_only
from kft.lora.adapters import active_adapter
from kft.lora.base import lora_layers
from kft.lora.model import apply_lora
from kft.lora.peft_families import CONFIG_FILE
from kft.lora.peft_families import LORA_SUFFIXES
from kft.lora.peft_families import MAGNITUDE_SUFFIX
from kft.lora.peft_families import PICKLE_FILE
from kft.lora.peft_families import TENSOR_PREFIX
from kft.lora.peft_families import WEIGHTS_FILE
from kft.lora.peft_families import find_family
from kft.lora.peft_families import layer_fans
from kft.lora.peft_families import layer_index
from kft.lora.peft_families import module_map

__all__ = ["load_peft_adapter"]


def _read(path):
    """(config, {tensor name: float32 array}) of a PEFT adapter directory."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config_path = os.path.join(path, CONFIG_FILE)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"load_peft_adapter: {path!r} has no {CONFIG_FILE}; a PEFT adapter "
            f"directory holds {CONFIG_FILE} and {WEIGHTS_FILE}.")
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(path, PICKLE_FILE)):
            raise ValueError(
                f"load_peft_adapter: {path!r} holds {PICKLE_FILE} (a pickle, "
                f"which kft never loads) and no {WEIGHTS_FILE}. Convert it with "
                "torch: `safetensors.torch.save_file(torch.load(bin_path, "
                f"weights_only=True), '{WEIGHTS_FILE}')`, or re-save it with "
                "`model.save_pretrained(path, safe_serialization=True)`.")
        raise FileNotFoundError(
            f"load_peft_adapter: {path!r} has no {WEIGHTS_FILE}.")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"load_peft_adapter: {config_path!r} is not valid "
                         f"JSON ({error}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"load_peft_adapter: {config_path!r} holds a "
                         f"{type(config).__name__}, not a JSON object.")
    # safetensors checks the header (offsets in bounds, not overlapping,
    # sizes matching the shapes) before it reads any tensor.
    try:
        loaded = load_file(weights_path)
    except SafetensorError as error:
        raise ValueError(f"load_peft_adapter: {weights_path!r} is not a valid "
                         f"safetensors file ({error}).") from None
    tensors = {name: np.asarray(value, dtype="float32")
               for name, value in loaded.items()}
    return config, tensors


def _check_config(config, path):
    """Refuses what kft's LoRA layers cannot hold (trained biases, ...)."""
    checks = (("peft_type", ("LORA",)), ("use_dora", (False, None, True)),
              ("bias", ("none",)), ("lora_bias", (False, None)),
              ("layer_replication", (None,)))
    for key, allowed in checks:
        value = config.get(key, allowed[0])
        if value not in allowed:
            raise ValueError(
                f"load_peft_adapter: {path!r} has {key}={value!r}; kft reads "
                f"LoRA and DoRA adapters without trained biases ({key} one of "
                f"{list(allowed)}).")


def _match(pattern_keys, name):
    """PEFT's `get_pattern_key`: the first key matching the module path."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _selected(config, name, index):
    """Whether PEFT would put LoRA on module `name` (path in the task model)."""
    def listed(patterns):
        if isinstance(patterns, str):
            return patterns == "all-linear" or bool(re.fullmatch(patterns, name))
        return name in patterns or any(name.endswith("." + p) for p in patterns)

    targets = config.get("target_modules")
    if config.get("exclude_modules") and listed(config["exclude_modules"]):
        return False
    if targets is not None and not listed(targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is not None and not isinstance(targets, str):
        layers = [layers] if isinstance(layers, int) else layers
        return index in layers
    return True


def _split_tensors(tensors, family):
    """Groups tensors: {HF module (task prefix kept): {"A":, "B":}} for
    LoRA pairs, {head module: {"weight":, "bias":}} for modules_to_save."""
    pairs, heads = collections.defaultdict(dict), collections.defaultdict(dict)
    head_names = {hf for heads_ in family.heads.values() for hf in heads_.values()}
    for key, value in tensors.items():
        if not key.startswith(TENSOR_PREFIX):
            raise ValueError(
                f"load_peft_adapter: tensor {key!r} does not start with "
                f"{TENSOR_PREFIX!r}, as PEFT names LoRA tensors.")
        name = key[len(TENSOR_PREFIX):]
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix:
            pairs[name[: -len(suffix)]][LORA_SUFFIXES[suffix]] = (key, value)
            continue
        module, _, leaf = name.rpartition(".")
        head = _strip(module, family, head_names)
        if head is None or leaf not in ("weight", "bias"):
            raise ValueError(
                f"load_peft_adapter: unsupported tensor {key!r}. kft reads "
                "`<module>.lora_A.weight` / `.lora_B.weight` (and DoRA's "
                f"`{MAGNITUDE_SUFFIX[1:]}`) of the "
                f"{family.hf_model} modules and `modules_to_save` heads "
                f"{sorted(head_names)}.")
        heads[head][leaf] = (key, value)
    return pairs, heads


def _strip(module, family, names):
    """`module` without a task prefix of the family, if then in `names`."""
    for prefix in sorted(set(family.prefixes.values()), key=len, reverse=True):
        if module.startswith(prefix) and module[len(prefix):] in names:
            return module[len(prefix):]
    return None


def _expected_rank_alpha(config, name):
    r = config.get("r", 8)
    alpha = config.get("lora_alpha", 8)
    rank_key = _match(config.get("rank_pattern") or {}, name)
    alpha_key = _match(config.get("alpha_pattern") or {}, name)
    if rank_key is not None:
        r = config["rank_pattern"][rank_key]
    if alpha_key is not None:
        alpha = config["alpha_pattern"][alpha_key]
    return int(r), float(alpha)


def _check_parts(config, module, pair):
    """A and B present; the DoRA magnitude present exactly when the config
    says `use_dora`."""
    for part in ("A", "B"):
        if part not in pair:
            raise ValueError(
                f"load_peft_adapter: tensor "
                f"'{TENSOR_PREFIX}{module}.lora_{part}.weight' is missing.")
    dora = bool(config.get("use_dora"))
    if dora != ("M" in pair):
        raise ValueError(
            f"load_peft_adapter: tensor '{TENSOR_PREFIX}{module}"
            f"{MAGNITUDE_SUFFIX}' is "
            + ("missing; the config has use_dora=True." if dora else
               "there, but the config has use_dora=False."))


def _plan(config, pairs, family, groups, layers_by_path):
    """Checks every LoRA pair against its layers: {layer path: (lora_a,
    lora_b, rank, alpha, DoRA magnitude or None)}. A fused module's `B`
    (and magnitude) is split by output rows; its Keras layers share `A`
    (each gets the module's rank)."""
    plan = {}
    for module, pair in sorted(pairs.items()):
        stripped = _strip(module, family, groups)
        first_key = next(iter(pair.values()))[0]
        if stripped is None:
            raise ValueError(
                f"load_peft_adapter: tensor {first_key!r} names module "
                f"{module!r}, which is not a LoRA-able {family.hf_model} module "
                f"of this model (e.g. {sorted(groups)[:4]}).")
        if not _selected(config, module, layer_index(stripped, family)):
            raise ValueError(
                f"load_peft_adapter: tensor {first_key!r} is for module "
                f"{module!r}, which the config's target_modules="
                f"{config.get('target_modules')!r} does not select; PEFT would "
                "ignore it.")
        _check_parts(config, module, pair)
        layers = [layers_by_path[path] for path in groups[stripped]]
        rank, alpha = _expected_rank_alpha(config, module)
        fans = [layer_fans(layer) for layer in layers]
        fan_out = sum(out for _, out in fans)
        shapes = {"A": (rank, fans[0][0]), "B": (fan_out, rank), "M": (fan_out,)}
        for part, (key, value) in sorted(pair.items()):
            if tuple(value.shape) != shapes[part]:
                raise ValueError(
                    f"load_peft_adapter: tensor {key!r} has shape "
                    f"{tuple(value.shape)}; expected {shapes[part]} (r={rank}, "
                    f"{family.hf_model} module {stripped!r}).")
        rows = np.cumsum([0] + [out for _, out in fans])
        b, magnitude = pair["B"][1], pair.get("M", (None, None))[1]
        for layer, start, stop in zip(layers, rows[:-1], rows[1:]):
            plan[layer.path] = (pair["A"][1].T, b[start:stop].T, rank, alpha,
                                None if magnitude is None else magnitude[start:stop])
    if not plan:
        raise ValueError("load_peft_adapter: the adapter holds no LoRA tensors.")
    return plan


def _create_layers(model, plan, config):
    """Adds LoRA layers to a model that has none, one apply_lora per
    (rank, alpha) group; then trains only them."""
    groups = collections.defaultdict(list)
    for path, (_, _, rank, alpha, _) in plan.items():
        groups[rank, alpha].append(f"^{re.escape(path)}$")
    for (rank, alpha), targets in groups.items():
        apply_lora(model, targets=targets, rank=rank, alpha=alpha,
                   dropout=float(config.get("lora_dropout", 0.0)),
                   use_rslora=bool(config.get("use_rslora", False)),
                   use_dora=bool(config.get("use_dora", False)))
    layers = lora_layers(model)
    train_only(model, layers)
    return {layer.path: layer for layer in layers}


def _check_existing(existing, plan, config):
    missing = sorted(set(plan) - set(existing))
    extra = sorted(set(existing) - set(plan))
    if missing or extra:
        raise ValueError(
            "load_peft_adapter: the model's LoRA layers differ from the "
            f"adapter's modules. Adapter only: {missing}; model only: {extra}. "
            "Load into the model before apply_lora to create matching layers.")
    rslora = bool(config.get("use_rslora", False))
    for path, (_, _, rank, alpha, magnitude) in plan.items():
        layer = existing[path]
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        if layer.rank != rank or not math.isclose(layer.scale, scale):
            raise ValueError(
                f"load_peft_adapter: LoRA layer {path!r} has rank {layer.rank} "
                f"and scale {layer.scale:g}; the adapter has r={rank}, scale "
                f"{scale:g} (lora_alpha={alpha:g}, use_rslora={rslora}).")
        if layer.use_dora != (magnitude is not None):
            raise ValueError(
                f"load_peft_adapter: LoRA layer {path!r} has use_dora="
                f"{layer.use_dora}; the adapter has use_dora="
                f"{magnitude is not None}.")


def _load_heads(model, family, heads, path):
    """Assigns `modules_to_save` heads; returns the Keras layers."""
    keras_names = {hf: keras_name for heads_ in family.heads.values()
                   for keras_name, hf in heads_.items()}
    by_name = {layer.name: layer for layer in all_layers(model)}
    loaded = []
    for hf_name, parts in heads.items():
        layer = by_name.get(keras_names[hf_name])
        if not isinstance(layer, keras.layers.Dense):
            warnings.warn(
                f"load_peft_adapter: {path!r} holds the head {hf_name!r} "
                f"(modules_to_save), but the model has no Dense layer "
                f"{keras_names[hf_name]!r}; the head is not loaded.", stacklevel=3)
            continue
        targets = {"weight": (kernel_variable(layer), True),
                   "bias": (layer.bias, False)}
        for leaf, (key, value) in parts.items():
            variable, transpose = targets[leaf]
            value = value.T if transpose else value
            expected = None if variable is None else tuple(variable.shape)
            if expected != value.shape:
                raise ValueError(
                    f"load_peft_adapter: tensor {key!r} has shape "
                    f"{tuple(value.shape)} (as Keras); the model's "
                    f"{layer.name!r} has {expected}.")
            variable.assign(value)
        loaded.append(layer)
    return loaded


def load_peft_adapter(model, path, name="default"):
    """Loads a Hugging Face PEFT LoRA adapter directory into kft LoRA layers.

    Args:
        model: the keras-hub backbone or task of the adapter's base model
            (same architecture and sizes), with or without kft LoRA layers.
            Without, they are created (`kft.lora.apply_lora`) with the
            adapter's `r`, `lora_alpha` (or `rank_pattern` /
            `alpha_pattern`), `lora_dropout`, `use_rslora` and `use_dora`
            (DoRA: the magnitudes from `<module>.lora_magnitude_vector`);
            with, they must be exactly the adapter's modules, same rank,
            scale and DoRA flag.
        path: a directory with `adapter_config.json` and
            `adapter_model.safetensors` (`adapter_model.bin`, a pickle, is
            refused). Module paths with or without the task model's prefix
            (`model.`, `bert.`, `transformer.`) are accepted.
        name: the kft adapter slot; only the active one (`"default"` unless
            `kft.lora.set_adapter` changed it) for now.

    Returns:
        The number of LoRA layers loaded. A `modules_to_save` head
        (`classifier`) is loaded into the matching Keras head, which stays
        trainable with the adapters.

    Example:

    >>> load_peft_adapter(llama_causal_lm, "adapter/")
    14
    """
    if name != active_adapter(model):
        raise ValueError(
            "load_peft_adapter: PEFT adapters load into the active adapter "
            f"slot only for now ({active_adapter(model)!r}). Received: "
            f"name={name!r}.")
    config, tensors = _read(path)
    _check_config(config, path)
    _, family, backbone = find_family(model, "load_peft_adapter")
    groups = module_map(backbone, family)
    layers_by_path = {layer.path: layer for layer in all_layers(backbone)}
    pairs, heads = _split_tensors(tensors, family)
    plan = _plan(config, pairs, family, groups, layers_by_path)
    existing = {layer.path: layer for layer in lora_layers(model)}
    if existing:
        _check_existing(existing, plan, config)
    else:
        existing = _create_layers(model, plan, config)
    for layer_path, (lora_a, lora_b, _, _, magnitude) in plan.items():
        existing[layer_path].lora_a.assign(lora_a)
        existing[layer_path].lora_b.assign(lora_b)
        if magnitude is not None:
            existing[layer_path].lora_magnitude.assign(magnitude)
    head_layers = _load_heads(model, family, heads, path)
    if head_layers:
        train_only(model, list(existing.values()) + head_layers)
    return len(plan)
