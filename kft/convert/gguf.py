"""llama.cpp GGUF Llama checkpoints to a Hugging Face directory keras-hub loads.

`gguf_to_hf` reads a GGUF file with the `gguf` package (maintained by
llama.cpp; it parses the file, it never runs code from it), dequantizes
every tensor to float32 and writes a Hugging Face Llama checkpoint:
`config.json`, `model.safetensors`, `tokenizer.json` and
`tokenizer_config.json`. `keras_hub.models.Llama3CausalLM.from_preset` loads
the directory: keras-hub maps `model_type: "llama"` to its Llama3 classes.

Three things llama.cpp changes on the way in are undone here:

- tensor names (`blk.0.attn_q.weight` -> `model.layers.0.self_attn.q_proj
  .weight`), through the two tables below;
- dimension order: ggml lists a matrix as `[ne0, ne1] = [in, out]`, numpy
  and Hugging Face as `(out, in)`;
- the Q and K projections: llama.cpp's `convert_hf_to_gguf.py` permutes
  their rows per head (rows `(head, 2, head_dim / 2)` interleaved) because
  its RoPE rotates adjacent pairs where Hugging Face rotates halves.

Weights are written as float32 so nothing is rounded twice; the directory
is about 4 bytes a parameter (SmolLM2-135M: about 540 MB, from a 98 MB
4-bit GGUF). A quantized GGUF gives a float32 copy of the quantized model,
not the original full-precision weights.
"""

import json
import math
import os
import re
import shutil
import struct

import numpy as np

__all__ = ["SUPPORTED_ARCHITECTURES", "gguf_to_hf"]

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.<key> -> Hugging Face config key. All are required.
_REQUIRED_HPARAMS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "context_length": "max_position_embeddings",
}
_REQUIRED_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
)

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# tokenizer.ggml.pre -> the Hugging Face pre-tokenizer llama.cpp mirrors
# (llama-vocab.cpp's regex_exprs for that pre-tokenizer type).
_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False,
                    "trim_offsets": True, "use_regex": True}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                 r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "default": (_GPT2_BYTE_LEVEL, False),
    "gpt-2": (_GPT2_BYTE_LEVEL, False),
    "smollm": ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _GPT2_BYTE_LEVEL]},
        False),
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT},
         "behavior": "Isolated", "invert": False},
        {**_GPT2_BYTE_LEVEL, "use_regex": False}]}, True),
}

# tokenizer.ggml.<role>_token_id -> Hugging Face config key.
_SPECIAL_TOKEN_IDS = {"bos": "bos_token_id", "eos": "eos_token_id",
                      "padding": "pad_token_id"}

# gguf.TokenType values: which tokens are added (special) tokens.
_CONTROL, _UNKNOWN, _USER_DEFINED = 3, 2, 4


# GGUF value types (gguf.GGUFValueType): the byte size of each scalar type;
# 8 is a string (uint64 length, bytes), 9 an array (item type, uint64 count).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8,
                 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DIMS, _MAX_NESTING, _MAX_KEY_BYTES = 4, 8, 65535


class _Layout:
    """Walks a GGUF header, checking every count and length against the
    bytes the file has left, before the `gguf` reader trusts them: it
    follows counts as written, and an array claiming 2**62 numbers made it
    loop for ever."""

    def __init__(self, file, path):
        self.file, self.path = file, path
        self.size = os.fstat(file.fileno()).st_size
        self.order = "<"

    def fail(self, problem):
        raise ValueError(f"{self.path} is not a valid GGUF file: {problem}.")

    def need(self, count, what):
        at = self.file.tell()
        if count > self.size - at:
            self.fail(f"{what} needs {count} bytes at offset {at}, the file "
                      f"has {self.size - at} left")

    def skip(self, count, what):
        self.need(count, what)
        self.file.seek(count, os.SEEK_CUR)

    def unpack(self, fmt, what):
        self.need(struct.calcsize(fmt), what)
        raw = self.file.read(struct.calcsize(fmt))
        return struct.unpack(self.order + fmt, raw)[0]

    def string(self, what):
        length = self.unpack("Q", f"the length of {what}")
        if length > _MAX_KEY_BYTES:
            self.fail(f"{what} is {length} bytes long (at most "
                      f"{_MAX_KEY_BYTES})")
        self.need(length, what)
        return self.file.read(length).decode("utf-8", errors="replace")

    def value(self, kind, what, depth=0):
        if kind in _SCALAR_SIZES:
            self.skip(_SCALAR_SIZES[kind], what)
        elif kind == _STRING:
            self.skip(self.unpack("Q", f"the length of {what}"), what)
        elif kind == _ARRAY and depth < _MAX_NESTING:
            item = self.unpack("I", f"the item type of {what}")
            count = self.unpack("Q", f"the length of {what}")
            if item in _SCALAR_SIZES:
                self.skip(count * _SCALAR_SIZES[item], f"{what} ({count} items)")
                return
            self.need(count * 8, f"{what} ({count} items)")  # 8 bytes each at least
            for index in range(count):
                self.value(item, f"item {index} of {what}", depth + 1)
        else:
            self.fail(f"{what} has value type {kind} (known: 0-12, arrays "
                      f"nested at most {_MAX_NESTING} deep)")

    def check(self, quant_sizes):
        if self.file.read(4) != b"GGUF":
            self.fail("it does not start with the magic bytes 'GGUF'")
        version = self.unpack("I", "the version")
        if version & 0xFFFF == 0:  # written on a big-endian machine
            self.order, version = ">", int.from_bytes(
                version.to_bytes(4, "little"), "big")
        if version not in (2, 3):
            self.fail(f"version {version}; kft reads versions 2 and 3")
        tensor_count = self.unpack("Q", "the tensor count")
        kv_count = self.unpack("Q", "the metadata count")
        self.need(kv_count * 12 + tensor_count * 24,
                  f"{kv_count} metadata entries and {tensor_count} tensors")
        alignment = 32
        for _ in range(kv_count):
            key = self.string("a metadata key")
            kind = self.unpack("I", f"the type of {key!r}")
            if key == "general.alignment" and kind == _UINT32:
                alignment = self.unpack("I", key)
            else:
                self.value(kind, repr(key))
        if alignment < 1 or alignment & (alignment - 1):
            self.fail(f"general.alignment is {alignment}, not a power of two")
        tensors = []
        for _ in range(tensor_count):
            name = self.string("a tensor name")
            n_dims = self.unpack("I", f"the rank of tensor {name!r}")
            if n_dims > _MAX_DIMS:
                self.fail(f"tensor {name!r} has {n_dims} dimensions (at most "
                          f"{_MAX_DIMS})")
            dims = [self.unpack("Q", f"the shape of tensor {name!r}")
                    for _ in range(n_dims)]
            kind = self.unpack("I", f"the type of tensor {name!r}")
            offset = self.unpack("Q", f"the offset of tensor {name!r}")
            tensors.append((name, dims, kind, offset))
        start = -(-self.file.tell() // alignment) * alignment
        for name, dims, kind, offset in tensors:
            if kind not in quant_sizes:
                self.fail(f"tensor {name!r} has ggml type {kind}, which the "
                          "gguf package does not know")
            block, type_size = quant_sizes[kind]
            length = math.prod(dims) * type_size // block
            if start + offset + length > self.size:
                self.fail(f"tensor {name!r} (shape {dims}, {length} bytes at "
                          f"offset {start + offset}) reaches past the end of "
                          f"the file ({self.size} bytes)")


def _check_layout(path, gguf):
    """Refuses a truncated or crafted GGUF file with a sentence, before
    `gguf.GGUFReader` reads it."""
    with open(path, "rb") as file:
        _Layout(file, path).check(gguf.GGML_QUANT_SIZES)


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "Reading GGUF files needs the `gguf` package (maintained by "
            "llama.cpp): pip install gguf") from None
    return gguf


def _metadata(reader):
    """All key/value fields of a GGUF file as plain Python values."""
    values = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or not field.types:
            continue
        value = field.contents()
        if isinstance(value, float):
            # Stored as float32: 1e-05 is read back as 9.99999974e-06.
            value = float(str(np.float32(value)))
        values[key] = value
    return values


def _check_architecture(meta, path):
    architecture = meta.get("general.architecture")
    if architecture is None:
        raise ValueError(f"{path} has no `general.architecture` key: it is "
                         "not a GGUF model file.")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"Unsupported GGUF architecture in {path}. Allowed: "
            f"{list(SUPPORTED_ARCHITECTURES)}. Received: "
            f"general.architecture={architecture!r}.")
    tokenizer_model = meta.get("tokenizer.ggml.model")
    if tokenizer_model not in (None, "gpt2"):
        raise ValueError(
            f"Unsupported tokenizer in {path}: only byte-level BPE "
            "(tokenizer.ggml.model='gpt2') converts to the tokenizer.json "
            "keras-hub's Llama3 reads. Received: "
            f"tokenizer.ggml.model={tokenizer_model!r}.")
    return architecture


def _rope_scaling(meta, arch, path, tensor_names):
    """The Hugging Face `rope_scaling` entry, or None without scaling."""
    if "rope_freqs.weight" in tensor_names:
        # Llama 3.1-style scaling is stored as per-frequency factors, from
        # which factor / low / high / original length cannot be read back.
        raise ValueError(
            f"{path} scales RoPE with per-frequency factors (tensor "
            "`rope_freqs.weight`, Llama 3.1 style); converting them back to "
            "a Hugging Face `rope_scaling` entry is not supported.")
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor_key = f"{arch}.rope.scaling.factor"
    if kind != "linear" or factor_key not in meta:
        raise ValueError(
            f"Unsupported RoPE scaling in {path}. Allowed: "
            f"{arch}.rope.scaling.type 'none' or 'linear' (with {factor_key}). "
            f"Received: {arch}.rope.scaling.type={kind!r}, "
            f"{factor_key}={meta.get(factor_key)!r}.")
    return {"rope_type": "linear", "factor": meta[factor_key]}


def _hf_config(meta, arch, path, tensor_names):
    """`config.json` less `vocab_size` / `tie_word_embeddings` (from tensors)."""
    missing = [f"{arch}.{key}" for key in _REQUIRED_HPARAMS
               if f"{arch}.{key}" not in meta]
    missing += [key for key in _REQUIRED_TOKENIZER_KEYS if key not in meta]
    if missing:
        raise ValueError(
            f"{path} lacks metadata keys a Hugging Face Llama checkpoint "
            f"needs: {missing}.")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    config.update({hf_key: meta[f"{arch}.{key}"]
                   for key, hf_key in _REQUIRED_HPARAMS.items()})
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    config["num_key_value_heads"] = meta.get(
        f"{arch}.attention.head_count_kv", heads)
    config["head_dim"] = hidden // heads
    rope_dims = meta.get(f"{arch}.rope.dimension_count", config["head_dim"])
    if hidden % heads or rope_dims != config["head_dim"]:
        raise ValueError(
            f"Unsupported attention shape in {path}: keras-hub's Llama needs "
            "head_dim = embedding_length / head_count, all of it rotated. "
            f"Received: {arch}.embedding_length={hidden}, "
            f"{arch}.attention.head_count={heads}, "
            f"{arch}.rope.dimension_count={rope_dims}.")
    config["rope_theta"] = meta.get(f"{arch}.rope.freq_base", 10000.0)
    config["rope_scaling"] = _rope_scaling(meta, arch, path, tensor_names)
    for role, hf_key in _SPECIAL_TOKEN_IDS.items():
        if f"tokenizer.ggml.{role}_token_id" in meta:
            config[hf_key] = meta[f"tokenizer.ggml.{role}_token_id"]
    config.update(hidden_act="silu", attention_bias=False, mlp_bias=False,
                  torch_dtype="float32")
    return config


def _unpermute(weight, num_heads):
    """Undoes `convert_hf_to_gguf.py`'s per-head row permutation of Q / K.

    llama.cpp stores rows as `(head, 2, head_dim / 2)` flattened in the
    order `(head, head_dim / 2, 2)`, so its RoPE can rotate adjacent pairs.
    """
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2,
                           *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def _hf_name(gguf_name, path):
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_TENSOR_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_TENSORS:
        layer, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK_TENSORS[kind]}.weight"
    raise ValueError(
        f"Unexpected tensor in {path}: {gguf_name!r}. A Llama GGUF holds "
        f"{sorted(_GLOBAL_TENSORS)} and blk.N.<kind>.weight with <kind> in "
        f"{sorted(_BLOCK_TENSORS)}.")


def _convert_tensors(reader, config, path):
    """Every tensor, dequantized to float32, in Hugging Face name and layout."""
    gguf = _import_gguf()
    heads_for = {"self_attn.q_proj.weight": config["num_attention_heads"],
                 "self_attn.k_proj.weight": config["num_key_value_heads"]}
    tensors = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, path)
        # ggml lists dimensions innermost first: [in, out] is numpy (out, in).
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise ValueError(
                f"Cannot dequantize tensor {tensor.name!r} of {path}: "
                f"{error}.") from None
        values = np.array(values, dtype=np.float32).reshape(shape)
        num_heads = heads_for.get(name.split(".", 3)[-1])
        tensors[name] = values if num_heads is None else _unpermute(
            values, num_heads)
    return tensors


def _expected_shapes(config):
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    query = config["num_attention_heads"] * head_dim
    key_value = config["num_key_value_heads"] * head_dim
    vocab = config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    per_layer = {"self_attn.q_proj": (query, hidden),
                 "self_attn.k_proj": (key_value, hidden),
                 "self_attn.v_proj": (key_value, hidden),
                 "self_attn.o_proj": (hidden, query),
                 "mlp.gate_proj": (inner, hidden),
                 "mlp.up_proj": (inner, hidden),
                 "mlp.down_proj": (hidden, inner),
                 "input_layernorm": (hidden,),
                 "post_attention_layernorm": (hidden,)}
    for layer in range(config["num_hidden_layers"]):
        for name, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{name}.weight"] = shape
    return shapes


def _check_shapes(tensors, config, path):
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = {name: (tensors[name].shape, shape) for name, shape in
             expected.items() if name in tensors
             and tensors[name].shape != shape}
    if missing or extra or wrong:
        raise ValueError(
            f"The tensors of {path} do not match its metadata. Missing: "
            f"{missing[:5]}; unexpected: {extra[:5]}; wrong shapes "
            f"(received, expected): {dict(list(wrong.items())[:5])}.")


def _post_processor(meta, tokens):
    byte_level = {"type": "ByteLevel", "add_prefix_space": True,
                  "trim_offsets": False, "use_regex": True}
    if not meta.get("tokenizer.ggml.add_bos_token", False):
        return byte_level
    bos_id = meta["tokenizer.ggml.bos_token_id"]
    bos = {"SpecialToken": {"id": tokens[bos_id], "type_id": 0}}
    template = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": tokens[bos_id], "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {tokens[bos_id]: {
            "id": tokens[bos_id], "ids": [bos_id], "tokens": [tokens[bos_id]]}},
    }
    return {"type": "Sequence", "processors": [byte_level, template]}


def _tokenizer_json(meta, path):
    """A Hugging Face `tokenizers` byte-level BPE (`tokenizer.json`)."""
    tokens = meta["tokenizer.ggml.tokens"]
    token_types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"Unsupported pre-tokenizer in {path}. Allowed: "
            f"{sorted(_PRE_TOKENIZERS)}. Received: tokenizer.ggml.pre={pre!r}.")
    pre_tokenizer, ignore_merges = _PRE_TOKENIZERS[pre]
    added_tokens = [
        {"id": index, "content": token, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False,
         "special": token_type != _USER_DEFINED}
        for index, (token, token_type) in enumerate(zip(tokens, token_types))
        if token_type in (_CONTROL, _UNKNOWN, _USER_DEFINED)
    ]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added_tokens, "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _post_processor(meta, tokens),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                    "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": {token: index for index, token in enumerate(tokens)},
            "merges": list(meta["tokenizer.ggml.merges"]),
        },
    }


def _tokenizer_config(meta, config, path):
    """`tokenizer_config.json`: special tokens and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    tokenizer_config = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    roles = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token",
             "padding": "pad_token"}
    for role, hf_key in roles.items():
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise ValueError(
                f"Token id out of range in {path}: tokenizer.ggml.{role}"
                f"_token_id={token_id}, the vocabulary has {len(tokens)} "
                "tokens.")
        tokenizer_config[hf_key] = tokens[token_id]
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer_config


def _write_atomically(path, write):
    """`write(temporary_path)`, then a rename: no half-written file remains."""
    temporary = path + ".partial"
    write(temporary)
    os.replace(temporary, path)


def _write_json(path, value):
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(value, file, indent=2, ensure_ascii=False)
            file.write("\n")

    _write_atomically(path, write)


def gguf_to_hf(gguf_path, output_dir):
    """Converts a llama.cpp GGUF Llama checkpoint to a Hugging Face directory.

    Dequantizes every tensor to float32, undoes llama.cpp's Q / K row
    permutation and dimension order, and writes `config.json`,
    `model.safetensors`, `tokenizer.json` (byte-level BPE) and
    `tokenizer_config.json` (special tokens, `chat_template`) into
    `output_dir`, replacing files of those names. `config.json` is written
    last, so a directory holding it holds a complete conversion.

    keras-hub reads `model_type: "llama"` as its Llama3 model. Two config
    values it does not read: `rms_norm_eps` (its Llama3 uses 1e-6; pass
    `layer_norm_epsilon` to `Llama3Backbone.from_preset` for another) and
    `add_bos_token` (its preprocessor prepends the start token unless
    `add_start_token=False`).

    Args:
        gguf_path: path of a `.gguf` file with
            `general.architecture` in `SUPPORTED_ARCHITECTURES` and a
            byte-level BPE tokenizer (`tokenizer.ggml.model = "gpt2"`).
        output_dir: directory to write; created if missing.

    Returns:
        `output_dir`, as a string.

    Example:

    ```python
    import keras_hub
    from kft.convert.gguf import gguf_to_hf

    hf_dir = gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
    causal_lm = keras_hub.models.Llama3CausalLM.from_preset(hf_dir)
    causal_lm.compile(sampler="greedy")
    causal_lm.generate("The capital of France is", max_length=16)
    ```
    """
    gguf = _import_gguf()
    path, output_dir = os.fspath(gguf_path), os.fspath(output_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No GGUF file at gguf_path={path!r}.")
    _check_layout(path, gguf)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError) as error:
        raise ValueError(f"{path} is not a GGUF file kft can read: "
                         f"{type(error).__name__}: {error}") from None
    meta = _metadata(reader)
    arch = _check_architecture(meta, path)
    config = _hf_config(meta, arch, path, {t.name for t in reader.tensors})
    tokenizer_config = _tokenizer_config(meta, config, path)
    tokenizer = _tokenizer_json(meta, path)
    tensors = _convert_tensors(reader, config, path)
    embedding = tensors.get("model.embed_tokens.weight")
    config["vocab_size"] = (len(meta["tokenizer.ggml.tokens"])
                            if embedding is None else embedding.shape[0])
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    _check_shapes(tensors, config, path)

    from safetensors.numpy import save_file

    os.makedirs(output_dir, exist_ok=True)
    _write_json(os.path.join(output_dir, "tokenizer.json"), tokenizer)
    _write_json(os.path.join(output_dir, "tokenizer_config.json"),
                tokenizer_config)

    def write_safetensors(temporary):
        save_file(tensors, temporary, metadata={"format": "pt"})
        # safetensors creates the file owner-only; match the JSON files.
        shutil.copymode(os.path.join(output_dir, "tokenizer.json"), temporary)

    _write_atomically(os.path.join(output_dir, "model.safetensors"),
                      write_safetensors)
    _write_json(os.path.join(output_dir, "config.json"), config)
    return output_dir
