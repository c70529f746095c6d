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

import dataclasses
import math
import re

import keras

from kft._keras_internals import all_layers
from kft._keras_internals import kernel_variable
from kft.backbones.anatomy import is_keras_hub_backbone

__all__ = ["supported_architectures"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
TENSOR_PREFIX = "base_model.model."
# PEFT keeps DoRA's magnitude in a `DoraLinearLayer.weight` but saves it
# as `<module>.lora_magnitude_vector`, without `.weight` (peft's
# `LoraModel._get_adapter_state_dict`), for checkpoints older than that.
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"
LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B",
                  MAGNITUDE_SUFFIX: "M"}


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
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "text_classifier": "SEQ_CLS"}


def supported_architectures():
    """The keras-hub backbone classes with a PEFT name map, and the
    Hugging Face model each one stands for."""
    return {name: family.hf_model for name, family in _FAMILIES.items()}


def find_family(model, caller):
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


def module_map(backbone, family):
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


def layer_index(hf_path, family):
    """The block index of a Hugging Face module path, or None."""
    pattern = re.escape(family.hf_block).replace(r"\{i\}", r"(\d+)")
    match = re.search(rf"(?:^|\.){pattern}\.", hf_path)
    return int(match.group(1)) if match else None


def layer_fans(layer):
    """(fan_in, fan_out) of a Dense / EinsumDense kernel as a matrix."""
    if hasattr(layer, "lora_a"):
        return tuple(layer.lora_a.shape)[0], tuple(layer.lora_b.shape)[1]
    shape = tuple(kernel_variable(layer).shape)
    contracted = 1
    if isinstance(layer, keras.layers.EinsumDense):
        _, kernel, output = re.split(r",|->", layer.equation.replace(" ", ""))
        contracted = sum(axis not in output for axis in kernel)
    return math.prod(shape[:contracted]), math.prod(shape[contracted:])
