"""Every file kft reads from a user is read without running code.

For each reader, a crafted file: a pickle whose `__reduce__` would create
a marker file, a `.keras` file with a Lambda's bytecode, a YAML tag that
builds a Python object, headers that lie about offsets, sizes or counts,
truncated files. Each test asserts a clear error naming the file (or the
problem), that the marker was never created, and that the reader neither
hung (a deadline) nor allocated much (numpy reports its arrays to
`tracemalloc`).

Covered elsewhere, not repeated here: PyTorch checkpoints
(`test_convert_torch.py`: code in the pickle, a pickled object with
`__reduce__`, truncated and non-checkpoint files); recipe YAML
(`test_cli.py::test_yaml_tags_never_construct_python_objects`); truncated
CTranslate2 files (`test_convert_ctranslate2.py::
test_bad_files_raise_clear_errors`); corrupt and truncated images
(`test_faults.py::test_corrupt_images_are_skipped_with_paths_or_refused`);
a PEFT directory holding only `adapter_model.bin`
(`test_peft_format.py::test_pickle_only_directory_is_refused`).
"""

import contextlib
import io
import json
import os
import pickle
import re
import signal
import struct
import tracemalloc
import warnings
import zipfile
import zlib

import keras
import numpy as np
import pytest

import kft
from kft.cli import main
from kft.data.audio import AudioFileError
from kft.data.audio import from_audio_folder
from kft.data.audio import polyphase_kernel
from kft.data.audio import read_wav
from kft.data.sft import read_records
from kft.lora.io import load_adapter
from kft.lora.peft_load import load_peft_adapter
from kft.prompt.causal_lm import load_prompt
from kft.utils.safe_npz import read_npz

MiB = 2 ** 20


class _WritesFile:
    """Pickles as `open(path, "w")`: unpickling it creates `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@contextlib.contextmanager
def _deadline(seconds):
    def expire(*_):
        raise TimeoutError(f"the reader ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _refused(call, error=ValueError, seconds=20, max_bytes=64 * MiB):
    """The error `call()` raises, after checking it came fast and without a
    big (numpy / Python) allocation."""
    tracemalloc.start()
    try:
        with _deadline(seconds), pytest.raises(error) as info:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < max_bytes, f"the reader allocated {peak / MiB:.0f} MiB"
    return str(info.value)


def _tiny_model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])


# === .npz: data sets, LoRA adapters, prompts ================================

def _evil_npz(path, marker):
    evil = np.empty(1, dtype=object)
    evil[0] = _WritesFile(marker)
    np.savez(path, __meta__=evil, x_train=evil, y_train=np.zeros(1),
             virtual_tokens=evil)


def _npy_bytes(shape, descr="<f8", data=b""):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def _zip(path, entries, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def _lying_shape(path, marker):
    _zip(path, {"x_train.npy": _npy_bytes((10 ** 12,), data=bytes(16)),
                "y_train.npy": _npy_bytes((10 ** 12,), data=bytes(16)),
                "__meta__.npy": _npy_bytes((10 ** 12,), data=bytes(16))})


def _deflate_bomb(path, marker):
    """A deflated entry whose central directory claims 1000 GB."""
    raw = _npy_bytes((2 ** 14,), data=bytes(2 ** 17))
    _zip(path, {"x_train.npy": raw, "y_train.npy": raw, "__meta__.npy": raw},
         zipfile.ZIP_DEFLATED)
    data = bytearray(open(path, "rb").read())
    at = data.find(b"PK\x01\x02")
    while at != -1:
        data[at + 24:at + 28] = struct.pack("<I", 2 ** 32 - 1)
        at = data.find(b"PK\x01\x02", at + 1)
    open(path, "wb").write(bytes(data))


def _pickle_named_npz(path, marker):
    open(path, "wb").write(pickle.dumps(_WritesFile(marker)))


def _truncated(path, marker):
    np.savez(path, __meta__=np.array("{}"), x_train=np.zeros(1000),
             y_train=np.zeros(1000))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _raw_entry(path, marker):
    _zip(path, {"x_train": b"raw bytes", "y_train": b"raw",
                "__meta__": b"{}"})


NPZ_FILES = {
    "pickled object array": (_evil_npz, "holds Python objects"),
    "pickle named .npz": (_pickle_named_npz, "looks like a pickle"),
    "shape past the entry": (_lying_shape, r"declares shape \(1000000000000,\)"),
    "deflate size lie": (_deflate_bomb, "more than DEFLATE can expand"),
    "truncated zip": (_truncated, "not a readable .npz file"),
    "entry not .npy": (_raw_entry, "is not a .npy array"),
}
NPZ_READERS = {
    "kft.data.load_npz": kft.data.load_npz,
    "kft.lora.load_adapter": lambda path: load_adapter(_tiny_model(), path),
    "kft.prompt_causal.load_prompt": lambda path: load_prompt(object(), path),
    "kft.utils.safe_npz.read_npz": read_npz,
}


@pytest.mark.parametrize("reader", sorted(NPZ_READERS))
@pytest.mark.parametrize("crafted", sorted(NPZ_FILES))
def test_npz_readers_refuse_crafted_files(tmp_path, reader, crafted):
    make, message = NPZ_FILES[crafted]
    path, marker = tmp_path / "crafted.npz", tmp_path / "MARKER"
    make(path, marker)
    error = _refused(lambda: NPZ_READERS[reader](path))
    assert str(path) in error
    assert re.search(message, error), error
    assert not marker.exists()


def test_the_crafted_npz_really_runs_code_when_unpickled(tmp_path):
    """The control: what kft refuses above is a working attack."""
    path, marker = tmp_path / "crafted.npz", tmp_path / "MARKER"
    _evil_npz(path, marker)
    with np.load(path, allow_pickle=True) as data:
        data["__meta__"]
    assert marker.exists()


@pytest.mark.parametrize("reader, meta, message", [
    ("lora", "[1, 2]", "is a list, not a JSON object"),
    ("lora", "{{{", "header is not JSON"),
    ("lora", "[" * 100_000, "header is not JSON"),
    ("prompt", '"text"', "is a str, not a JSON object"),
    ("prompt", None, "no '__meta__' header"),
])
def test_adapter_and_prompt_headers_must_be_json_objects(tmp_path, reader,
                                                         meta, message):
    path = tmp_path / "bad.npz"
    arrays = {"virtual_tokens": np.zeros((2, 4), "float32")}
    if meta is not None:
        arrays["__meta__"] = np.array(meta)
    np.savez(path, **arrays)
    read = {"lora": lambda: load_adapter(_tiny_model(), path),
            "prompt": lambda: load_prompt(object(), path)}[reader]
    error = _refused(read)
    assert str(path) in error and message in error


# === .keras files: `kft eval` / `kft export` (keras safe_mode) ================

def _run_dir(tmp_path, model_file):
    """A run directory whose config.yaml is valid and whose model.keras is
    `model_file`."""
    run = tmp_path / "run"
    run.mkdir()
    np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 32, 32, 3), "float32"),
             y_train=np.array([0, 1, 0, 1]))
    (run / "config.yaml").write_text(
        "name: tiny\n"
        "model: {backbone: mobilenet_v2, input_shape: [32, 32, 3],"
        " backbone_kwargs: {alpha: 0.35}}\n"
        f"data: {{source: numpy, path: {tmp_path / 'd.npz'}, batch_size: 4}}\n"
        "stages:\n  - {name: head, epochs: 1}\n")
    os.replace(model_file, run / "model.keras")
    return run


def _lambda_model(path, marker):
    """A Lambda whose Python bytecode, rebuilt on load, creates `marker`."""
    target = str(marker)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Lambda(lambda x: (open(target, "w").close(), x)[1]),
        keras.layers.Dense(2)])
    model.save(path)
    os.remove(target)  # building the model ran it once, here


def _foreign_callable_model(path, marker):
    """A config naming `subprocess.Popen` as a layer class."""
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(path)
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    config["config"]["layers"][1] = {
        "module": "subprocess", "class_name": "Popen", "registered_name": None,
        "config": {"args": ["touch", str(marker)]}}
    files["config.json"] = json.dumps(config).encode()
    _zip(path, files)


@pytest.mark.parametrize("make, message", [
    (_lambda_model, "deserialization of a `Lambda` layer"),
    (_foreign_callable_model, "Could not locate class 'Popen'"),
], ids=["lambda bytecode", "subprocess.Popen in the config"])
@pytest.mark.parametrize("command", ["eval", "export"])
def test_kft_eval_and_export_load_model_keras_in_safe_mode(tmp_path, capsys,
                                                          make, message, command):
    marker = tmp_path / "MARKER"
    make(tmp_path / "crafted.keras", marker)
    run = _run_dir(tmp_path, tmp_path / "crafted.keras")
    with _deadline(60):
        assert main([command, str(run)]) == 1
    assert message in capsys.readouterr().err
    assert not marker.exists()


def test_the_crafted_lambda_really_runs_code_outside_safe_mode(tmp_path):
    marker = tmp_path / "MARKER"
    _lambda_model(tmp_path / "crafted.keras", marker)
    assert not marker.exists()
    keras.saving.load_model(tmp_path / "crafted.keras", safe_mode=False)
    assert marker.exists()


# === YAML: a run's config.yaml (`kft eval`, `kft export`, `kft generate`) ======

def test_run_config_yaml_tags_never_construct_python_objects(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        f"name: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml: not valid YAML" in err and "python/object/apply" in err
    assert not marker.exists()


# === safetensors: PEFT adapter directories ===================================

def _safetensors(header, data=b"", length=None):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _tensor(shape, start, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, end]}


SAFETENSORS = {
    "offsets past the end": _safetensors({"w": _tensor([4], 0, 16)}, bytes(8)),
    "overlapping tensors": _safetensors(
        {"a": _tensor([2], 0, 8), "b": _tensor([2], 4, 12)}, bytes(12)),
    "huge shape": _safetensors({"w": _tensor([2 ** 40, 2 ** 40], 0, 8)}, bytes(8)),
    "huge header length": struct.pack("<Q", 2 ** 62) + b"{}",
    "header not JSON": struct.pack("<Q", 5) + b"hello",
    "truncated": _safetensors({"w": _tensor([4], 0, 16)}, bytes(16))[:20],
    "empty": b"",
}


@pytest.mark.parametrize("crafted", sorted(SAFETENSORS))
def test_peft_safetensors_with_lying_headers_are_refused(tmp_path, crafted):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2,
         "target_modules": ["q_proj"]}))
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(SAFETENSORS[crafted])
    error = _refused(lambda: load_peft_adapter(_tiny_model(), str(adapter)))
    assert f"{str(weights)!r} is not a valid safetensors file" in error


@pytest.mark.parametrize("config, message", [
    ("{not json", "is not valid JSON"),
    ("[" * 100_000, "is not valid JSON"),
    ('["LORA"]', "holds a list, not a JSON object"),
])
def test_peft_adapter_config_must_be_a_json_object(tmp_path, config, message):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(config)
    (adapter / "adapter_model.safetensors").write_bytes(
        _safetensors({"w": _tensor([1], 0, 4)}, bytes(4)))
    error = _refused(lambda: load_peft_adapter(_tiny_model(), str(adapter)))
    assert "adapter_config.json" in error and message in error


# === GGUF =====================================================================

def _gguf_string(text):
    return struct.pack("<Q", len(text)) + text


def _gguf(tensors, kvs):
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs)


GGUF_FILES = {
    # gguf's reader followed this count and looped for ever.
    "array count past the end": (
        _gguf(0, 1) + _gguf_string(b"general.architecture")
        + struct.pack("<IIQ", 9, 0, 2 ** 62) + bytes(8),
        r"\(4611686018427387904 items\) needs"),
    "string array count past the end": (
        _gguf(0, 1) + _gguf_string(b"k") + struct.pack("<IIQ", 9, 8, 2 ** 40)
        + bytes(64), r"\(1099511627776 items\) needs"),
    "metadata count past the end": (_gguf(0, 2 ** 60),
                                    "1152921504606846976 metadata entries"),
    "tensor count past the end": (_gguf(2 ** 60, 0), "1152921504606846976 tensors"),
    "key length past the end": (_gguf(0, 1) + struct.pack("<Q", 2 ** 60)
                                + bytes(8), "a metadata key is"),
    "tensor data past the end": (
        _gguf(1, 0) + _gguf_string(b"t")
        + struct.pack("<IQQIQ", 2, 2 ** 32, 2 ** 32, 0, 0),
        "tensor 't' .* reaches past the end of the file"),
    "arrays nested too deep": (
        _gguf(0, 1) + _gguf_string(b"k") + struct.pack("<I", 9)
        + struct.pack("<IQ", 9, 1) * 20, "nested at most 8 deep"),
    "unknown value type": (_gguf(0, 1) + _gguf_string(b"k")
                           + struct.pack("<I", 99) + bytes(8), "value type 99"),
    "unknown version": (b"GGUF" + struct.pack("<I", 7) + bytes(16), "version 7"),
    "not GGUF": (b"\x80\x04pickle", "magic bytes 'GGUF'"),
    "empty": (b"", "magic bytes 'GGUF'"),
}


@pytest.mark.parametrize("crafted", sorted(GGUF_FILES))
def test_gguf_with_absurd_counts_or_lengths_is_refused(tmp_path, crafted):
    pytest.importorskip("gguf")
    from kft.convert.gguf import gguf_to_hf

    data, message = GGUF_FILES[crafted]
    path = tmp_path / "crafted.gguf"
    path.write_bytes(data)
    error = _refused(lambda: gguf_to_hf(path, tmp_path / "out"))
    assert f"{path} is not a valid GGUF file" in error
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


# === CTranslate2 model.bin ====================================================

def _ct2_string(text):
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _ct2(count, variable=b""):
    return (struct.pack("<I", 6) + _ct2_string("WhisperSpec")
            + struct.pack("<II", 3, count) + variable)


@pytest.mark.parametrize("data, message", [
    # 65536**4 = 2**64 bytes: an int64 product wraps to 0 = the stored size.
    (_ct2(1, _ct2_string("w") + struct.pack("<B4IBI", 4, *[65536] * 4, 0, 0)),
     "should hold 73786976294838206464 bytes; the file says 0"),
    (_ct2(2 ** 32 - 1), "is truncated"),
], ids=["dims overflowing int64", "absurd variable count"])
def test_ctranslate2_with_absurd_shapes_or_counts_is_refused(tmp_path, data,
                                                             message):
    from kft.convert.ctranslate2 import CTranslate2FormatError
    from kft.convert.ctranslate2 import read_ctranslate2

    path = tmp_path / "model.bin"
    path.write_bytes(data)
    error = _refused(lambda: read_ctranslate2(path), CTranslate2FormatError)
    assert str(path) in error and message in error


# === WAV ======================================================================

def _wav(path, rate=16000, bits=16, frames=1600, fmt=1, data_size=None):
    width = max(bits // 8, 1)
    data = (0.3 * np.sin(np.arange(frames) / 5) * 2 ** (8 * width - 1)).astype(
        f"<i{width}").tobytes() if width in (2, 4) else bytes(frames * width)
    body = (b"WAVEfmt " + struct.pack("<IHHIIHH", 16, fmt, 1, rate,
                                      rate * width, width, bits)
            + b"data" + struct.pack("<I", len(data) if data_size is None
                                    else data_size) + data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def test_wav_without_a_sample_width_is_a_clear_error(tmp_path):
    # 0-bit samples divided by zero before.
    path = _wav(tmp_path / "zero_bits.wav", bits=0)
    error = _refused(lambda: read_wav(path), AudioFileError)
    assert str(path) in error and "0-bit samples is not supported" in error


def test_wav_chunk_sizes_past_the_end_read_only_what_is_there(tmp_path):
    path = _wav(tmp_path / "lying.wav", frames=100, data_size=2 ** 32 - 1)
    tracemalloc.start()
    samples, rate = read_wav(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert samples.shape == (100, 1) and rate == 16000 and peak < 4 * MiB


def test_a_sample_rate_needing_a_huge_resampling_kernel_is_refused(tmp_path):
    # 44,057 Hz shares no factor with 16 kHz: a 44,000 x 16,000 kernel.
    message = "Resampling 44057 Hz to 16000 Hz needs a"
    assert message in _refused(lambda: polyphase_kernel(44057, 16000))
    root = tmp_path / "audio"
    for label in ("a", "b"):
        for i in range(2):
            _wav(root / label / f"{i}.wav")
    _wav(root / "a" / "crafted.wav", rate=44057)
    with _deadline(60), pytest.warns(UserWarning, match=message):
        bundle = from_audio_folder(root, max_seconds=0.1, validation_split=0)
    assert [os.path.basename(p) for p in bundle.skipped_files] == ["crafted.wav"]


# === Images ===================================================================

def _png_header_only(width, height):
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))


def test_image_folders_skip_lying_headers_and_pickles(tmp_path):
    import tensorflow as tf

    root, marker = tmp_path / "images", tmp_path / "MARKER"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            pixels = np.full((8, 8, 3), 60 * i, np.uint8)
            (root / label / f"{i}.png").write_bytes(
                tf.io.encode_png(pixels).numpy())
    # 30,000 x 30,000 RGB would be 2.7 GB; the file is 100 bytes.
    (root / "cat" / "huge.png").write_bytes(_png_header_only(30000, 30000))
    (root / "dog" / "pickle.png").write_bytes(pickle.dumps(_WritesFile(marker)))
    with _deadline(60), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = kft.data.from_image_folder(str(root), image_size=(8, 8),
                                            validation_split=0)
    assert sorted(os.path.basename(p) for p in bundle.skipped_files) == [
        "huge.png", "pickle.png"]
    assert any("Skipped 2 unreadable" in str(w.message) for w in caught)
    assert not marker.exists()


# === Text: CSV / JSONL data and SFT records ===================================

TEXT_FILES = {
    "invalid UTF-8": (".jsonl", b'{"text": "\xff\xfe", "label": 0}\n',
                      "UnicodeDecodeError"),
    "JSON nested 100,000 deep": (".jsonl", b"[" * 100_000 + b"\n",
                                 "RecursionError|not valid JSON"),
    "a JSON line that is not an object": (".jsonl", b"[1, 2]\n",
                                          "not a JSON object"),
    "a CSV field over the csv limit": (
        ".csv", b'text,label\n"' + b"x" * 200_000 + b'",0\n',
        "field larger than field limit"),
}


@pytest.mark.parametrize("crafted", sorted(TEXT_FILES))
def test_text_files_are_parsed_as_data_with_clear_errors(tmp_path, crafted):
    suffix, data, message = TEXT_FILES[crafted]
    path = tmp_path / f"data{suffix}"
    path.write_bytes(data)
    error = _refused(lambda: kft.data.load_text_file(str(path)))
    assert str(path) in error
    assert re.search(message, error), error


@pytest.mark.parametrize("suffix, data, message", [
    (".json", b"{not json", "not valid JSON"),
    (".json", b"[" * 100_000, "RecursionError"),
    (".jsonl", b"[" * 100_000 + b"\n", "not valid JSON"),
    (".csv", b"prompt,completion\n\xff,\xfe\n", "UnicodeDecodeError"),
])
def test_sft_files_are_parsed_as_data_with_clear_errors(tmp_path, suffix, data,
                                                        message):
    path = tmp_path / f"records{suffix}"
    path.write_bytes(data)
    error = _refused(lambda: read_records(str(path)))
    assert str(path) in error and message in error
