"""LoRA adapters in Hugging Face PEFT's format, both ways.

`save_peft_adapter` writes a kft-adapted keras-hub model's LoRA weights as
a PEFT adapter directory (`adapter_config.json` and
`adapter_model.safetensors`) that `peft.PeftModel.from_pretrained` loads
onto the matching `transformers` model; `load_peft_adapter` reads such a
directory, from kft or from PEFT, into kft LoRA layers.

Naming. PEFT names a tensor `base_model.model.<module>.lora_A.weight`
(the adapter name "default" is stripped when saving), where `<module>` is
the module path inside the Hugging Face model the adapter was trained on.
kft writes the path of the Hugging Face class that matches the Keras
model:

- a bare keras-hub backbone -> the bare model (`BertModel`, `LlamaModel`):
  `encoder.layer.0.attention.self.query`, `layers.0.self_attn.q_proj`;
- a keras-hub `CausalLM` -> `*ForCausalLM` (`task_type="CAUSAL_LM"`):
  `model.layers.0.self_attn.q_proj` (GPT-2: `transformer.h.0.attn.c_proj`);
- a keras-hub `TextClassifier` -> `*ForSequenceClassification`
  (`task_type="SEQ_CLS"`): `bert.encoder.layer.0...`, and the head is
  saved as `modules_to_save` (`classifier`).

`task_type=` overrides the choice. Loading accepts every prefix of the
family, with or without the task model's.

Shapes. A torch `Linear(in, out)` stores `weight` as `(out, in)`; PEFT's
`lora_A.weight` is `(r, in)` and `lora_B.weight` `(out, r)`. The keras-hub
converters load a Hugging Face weight as `reshape(transpose(W),
kernel_shape)` (`keras_hub/src/utils/transformers/convert_*.py`), so the
Keras kernel flattened to `(fan_in, fan_out)` in C order is `W.T`: query
`(hidden, heads, head_dim)` is `Linear(hidden, heads * head_dim)` with
output index `head * head_dim + d`, attention output `(heads, head_dim,
hidden)` is `Linear(heads * head_dim, hidden)`. kft's `lora_a` and
`lora_b` flatten the kernel the same way, hence `lora_A.weight =
lora_a.T` and `lora_B.weight = lora_b.T` for every supported module.

Fused modules. GPT-2 keeps query, key and value in one `c_attn` (output
rows: query, key, value). Loading splits its `B` by rows; the three kft
layers share its `A` and rank. Saving writes them back as one `A` when
they still share it, else in the exact block form: `A` stacks the
layers' `lora_a.T`, `B` is block diagonal, the rank is the sum (and
`rank_pattern` says so when it differs from the other modules').

DoRA. `use_dora: true` and one `<module>.lora_magnitude_vector` per
module, `(out,)`: PEFT's magnitude per row of `W + s*B@A` is kft's per
column of the flattened kernel, the same numbers in the same order (a
fused module's rows: its members' magnitudes, or the kernel's column
norms for a member without LoRA).

Gemma's attention kernels are `(heads, hidden, head_dim)`, which kft's
LoRA layers do not adapt: only its MLP is mapped.
"""

import collections
import dataclasses
import json
import math
import os
import re
import warnings

import keras
import numpy as np

from kft._keras_internals import all_layers
from kft._keras_internals import kernel_variable
from kft.anatomy import describe
from kft.anatomy import is_keras_hub_backbone
from kft.freezing import train_only
from kft.lora import active_adapter
from kft.lora import apply_lora
from kft.lora import lora_layers

__all__ = ["load_peft_adapter", "save_peft_adapter", "supported_architectures"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
_TENSOR_PREFIX = "base_model.model."
# PEFT keeps DoRA's magnitude in a `DoraLinearLayer.weight` but saves it
# as `<module>.lora_magnitude_vector`, without `.weight` (peft's
# `LoraModel._get_adapter_state_dict`), for checkpoints older than that.
_MAGNITUDE_SUFFIX = ".lora_magnitude_vector"
_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B",
                  _MAGNITUDE_SUFFIX: "M"}


@dataclasses.dataclass(frozen=True)
class _Family:
    """How the Hugging Face twin of one keras-hub backbone names modules.

    Args:
        hf_model: the Hugging Face base model class, for messages.
        block: the Keras name of transformer block `i` (`{i}`).
        hf_block: the Hugging Face path of block `i`.
        modules: Keras path inside a block -> Hugging Face path inside it.
        prefixes: PEFT `task_type` -> path of the base model inside the
            Hugging Face task model (`None`: the bare base model).
        top_modules: Keras layer name in the backbone, outside the
            blocks -> Hugging Face path.
        heads: `task_type` -> {Keras head layer name: Hugging Face module},
            saved as PEFT `modules_to_save`.
        fused: Hugging Face module inside a block that fuses several Keras
            layers -> their Keras paths, in the order of its output rows
            (GPT-2's `c_attn`: query, key, value).
        fan_in_fan_out: Hugging Face stores these weights `(in, out)`
            (GPT-2's `Conv1D`); PEFT's config says so.
    """

    hf_model: str
    block: str
    hf_block: str
    modules: dict
    prefixes: dict
    top_modules: dict = dataclasses.field(default_factory=dict)
    heads: dict = dataclasses.field(default_factory=dict)
    fused: dict = dataclasses.field(default_factory=dict)
    fan_in_fan_out: bool = False


# From keras_hub/src/utils/transformers/convert_{bert,llama3,mistral,qwen,
# qwen3,gemma,gpt2}.py and the layer names of the keras-hub backbones.
_BERT_MODULES = {
    "self_attention_layer/query": "attention.self.query",
    "self_attention_layer/key": "attention.self.key",
    "self_attention_layer/value": "attention.self.value",
    "self_attention_layer/attention_output": "attention.output.dense",
    "feedforward_intermediate_dense": "intermediate.dense",
    "feedforward_output_dense": "output.dense",
}
_LLAMA_MODULES = {
    "self_attention/query": "self_attn.q_proj",
    "self_attention/key": "self_attn.k_proj",
    "self_attention/value": "self_attn.v_proj",
    "self_attention/attention_output": "self_attn.o_proj",
    "feedforward_gate_dense": "mlp.gate_proj",
    "feedforward_intermediate_dense": "mlp.up_proj",
    "feedforward_output_dense": "mlp.down_proj",
}
_GEMMA_MODULES = {
    "ffw_gating": "mlp.gate_proj",
    "ffw_gating_2": "mlp.up_proj",
    "ffw_linear": "mlp.down_proj",
}
_GPT2_MODULES = {
    "self_attention/attention_output": "attn.c_proj",
    "feedforward_intermediate_dense": "mlp.c_fc",
    "feedforward_output_dense": "mlp.c_proj",
}
_DECODER_PREFIXES = {None: "", "FEATURE_EXTRACTION": "", "CAUSAL_LM": "model."}


def _llama_like(hf_model):
    return _Family(hf_model, "transformer_layer_{i}", "layers.{i}",
                   _LLAMA_MODULES, _DECODER_PREFIXES)


_FAMILIES = {
    "BertBackbone": _Family(
        "BertModel", "transformer_layer_{i}", "encoder.layer.{i}", _BERT_MODULES,
        {None: "", "FEATURE_EXTRACTION": "", "SEQ_CLS": "bert."},
        top_modules={"pooled_dense": "pooler.dense"},
        heads={"SEQ_CLS": {"logits": "classifier"}}),
    "LlamaBackbone": _llama_like("LlamaModel"),
    "Llama3Backbone": _llama_like("LlamaModel"),
    "MistralBackbone": _llama_like("MistralModel"),
    "QwenBackbone": _llama_like("Qwen2Model"),
    "Qwen3Backbone": _llama_like("Qwen3Model"),
    "GemmaBackbone": _Family("GemmaModel", "decoder_block_{i}", "layers.{i}",
                             _GEMMA_MODULES, _DECODER_PREFIXES),
    "GPT2Backbone": _Family(
        "GPT2Model", "transformer_layer_{i}", "h.{i}", _GPT2_MODULES,
        {None: "", "FEATURE_EXTRACTION": "", "CAUSAL_LM": "transformer."},
        fused={"attn.c_attn": tuple(f"self_attention/{name}"
                                    for name in ("query", "key", "value"))},
        fan_in_fan_out=True),
}
# kft's anatomy task -> PEFT task_type (anything else: the bare model).
_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "text_classifier": "SEQ_CLS"}


def supported_architectures():
    """The keras-hub backbone classes with a PEFT name map, and the
    Hugging Face model each one stands for."""
    return {name: family.hf_model for name, family in _FAMILIES.items()}


def _find_family(model, caller):
    """(family name, `_Family`, backbone) of the model's keras-hub backbone."""
    backbones = [layer for layer in all_layers(model, include_self=True)
                 if is_keras_hub_backbone(layer)]
    supported = ", ".join(_FAMILIES)
    if len(backbones) != 1:
        raise ValueError(
            f"{caller}: the PEFT format needs a model holding exactly one "
            f"keras-hub backbone, one of: {supported}. Received: "
            f"{type(model).__name__} {model.name!r} with {len(backbones)}.")
    backbone = backbones[0]
    base = getattr(type(backbone), "_kft_base_class", type(backbone))
    for cls in base.__mro__:
        if cls.__name__ in _FAMILIES:
            return cls.__name__, _FAMILIES[cls.__name__], backbone
    raise ValueError(
        f"{caller}: no Hugging Face name map for {base.__name__}. "
        f"Supported backbones: {supported}.")


def _module_map(backbone, family):
    """{Hugging Face module path (without task prefix): [Keras layer paths]}.

    One Keras layer per module, except fused modules (GPT-2's `c_attn`),
    whose Keras layers are listed in the order of the module's output rows.
    """
    block = re.compile(
        "(?:^|/)" + re.escape(family.block).replace(r"\{i\}", r"(\d+)")
        + "/(.+)$")
    top = re.compile("(?:^|/)(" + "|".join(map(re.escape, family.top_modules))
                     + ")$") if family.top_modules else None
    in_fused = {sub: (hf, position) for hf, subs in family.fused.items()
                for position, sub in enumerate(subs)}
    groups = {}
    for layer in all_layers(backbone):
        if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
            continue
        match = block.search(layer.path)
        sub = match.group(2) if match else None
        if sub in family.modules or sub in in_fused:
            hf_block = family.hf_block.format(i=match.group(1))
            hf, position = in_fused.get(sub, (family.modules.get(sub), 0))
            size = len(family.fused.get(hf, (sub,)))
            slots = groups.setdefault(f"{hf_block}.{hf}", [None] * size)
            slots[position] = layer.path
        elif top is not None and (found := top.search(layer.path)):
            groups[family.top_modules[found.group(1)]] = [layer.path]
    return {hf: paths for hf, paths in groups.items() if None not in paths}


def _layer_index(hf_path, family):
    """The block index of a Hugging Face module path, or None."""
    pattern = re.escape(family.hf_block).replace(r"\{i\}", r"(\d+)")
    match = re.search(rf"(?:^|\.){pattern}\.", hf_path)
    return int(match.group(1)) if match else None


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
            parts.append(np.asarray(layer.lora_magnitude, "float32"))
        else:
            kernel = np.asarray(kernel_variable(base), "float32")
            parts.append(np.linalg.norm(kernel.reshape(_fans(base)), axis=0))
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
        b = np.concatenate([np.asarray(layer.lora_b).T for layer in members])
        return np.asarray(first.lora_a).T, b, first.rank, first.alpha, magnitude
    rank = sum(layer.rank for layer in present)
    alpha = first.scale * (math.sqrt(rank) if first.use_rslora else rank)
    a = np.concatenate([np.asarray(layer.lora_a).T for layer in present])
    blocks, column = [], 0
    for layer, base in zip(members, plain):
        block = np.zeros((_fans(base)[1], rank), "float32")
        if layer is not None:
            block[:, column:column + layer.rank] = (
                np.asarray(layer.lora_b).T * (layer.scale / first.scale))
            column += layer.rank
        blocks.append(block)
    return a, np.concatenate(blocks), rank, alpha, magnitude


def _exports(model, family, backbone, prefix):
    """[(module path with task prefix, A, B, r, lora_alpha, magnitude)], the LoRA
    layers, and every mapped module path (for `target_modules`)."""
    groups = _module_map(backbone, family)
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
        tensors[f"{_TENSOR_PREFIX}{hf_name}.weight"] = np.ascontiguousarray(kernel.T)
        if layer.bias is not None:
            tensors[f"{_TENSOR_PREFIX}{hf_name}.bias"] = np.asarray(
                layer.bias, dtype="float32")
        names.append(hf_name)
    return tensors, names


def _resolve_task_type(model, family, task_type, caller):
    given = task_type
    if task_type == "auto":
        task_type = (None if is_keras_hub_backbone(model)
                     else _TASK_TYPES.get(describe(model).task))
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
    _, family, backbone = _find_family(model, "save_peft_adapter")
    task_type = _resolve_task_type(model, family, task_type, "save_peft_adapter")
    prefix = family.prefixes[task_type]
    exports, layers, known = _exports(model, family, backbone, prefix)
    tensors = {}
    for name, a, b, _, _, magnitude in exports:
        for part, value in (("A", a), ("B", b)):
            tensors[f"{_TENSOR_PREFIX}{name}.lora_{part}.weight"] = (
                np.ascontiguousarray(value, dtype="float32"))
        if magnitude is not None:
            tensors[f"{_TENSOR_PREFIX}{name}{_MAGNITUDE_SUFFIX}"] = (
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
        if not key.startswith(_TENSOR_PREFIX):
            raise ValueError(
                f"load_peft_adapter: tensor {key!r} does not start with "
                f"{_TENSOR_PREFIX!r}, as PEFT names LoRA tensors.")
        name = key[len(_TENSOR_PREFIX):]
        suffix = next((s for s in _LORA_SUFFIXES if name.endswith(s)), None)
        if suffix:
            pairs[name[: -len(suffix)]][_LORA_SUFFIXES[suffix]] = (key, value)
            continue
        module, _, leaf = name.rpartition(".")
        head = _strip(module, family, head_names)
        if head is None or leaf not in ("weight", "bias"):
            raise ValueError(
                f"load_peft_adapter: unsupported tensor {key!r}. kft reads "
                "`<module>.lora_A.weight` / `.lora_B.weight` (and DoRA's "
                f"`{_MAGNITUDE_SUFFIX[1:]}`) of the "
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


def _fans(layer):
    """(fan_in, fan_out) of a Dense / EinsumDense kernel as a matrix."""
    if hasattr(layer, "lora_a"):
        return tuple(layer.lora_a.shape)[0], tuple(layer.lora_b.shape)[1]
    shape = tuple(kernel_variable(layer).shape)
    contracted = 1
    if isinstance(layer, keras.layers.EinsumDense):
        _, kernel, output = re.split(r",|->", layer.equation.replace(" ", ""))
        contracted = sum(axis not in output for axis in kernel)
    return math.prod(shape[:contracted]), math.prod(shape[contracted:])


def _check_parts(config, module, pair):
    """A and B present; the DoRA magnitude present exactly when the config
    says `use_dora`."""
    for part in ("A", "B"):
        if part not in pair:
            raise ValueError(
                f"load_peft_adapter: tensor "
                f"'{_TENSOR_PREFIX}{module}.lora_{part}.weight' is missing.")
    dora = bool(config.get("use_dora"))
    if dora != ("M" in pair):
        raise ValueError(
            f"load_peft_adapter: tensor '{_TENSOR_PREFIX}{module}"
            f"{_MAGNITUDE_SUFFIX}' is "
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
        if not _selected(config, module, _layer_index(stripped, family)):
            raise ValueError(
                f"load_peft_adapter: tensor {first_key!r} is for module "
                f"{module!r}, which the config's target_modules="
                f"{config.get('target_modules')!r} does not select; PEFT would "
                "ignore it.")
        _check_parts(config, module, pair)
        layers = [layers_by_path[path] for path in groups[stripped]]
        rank, alpha = _expected_rank_alpha(config, module)
        fans = [_fans(layer) for layer in layers]
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
    _, family, backbone = _find_family(model, "load_peft_adapter")
    groups = _module_map(backbone, family)
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
