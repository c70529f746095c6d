"""PyTorch checkpoints read without PyTorch: exact values, refused code.

The checkpoints here are written by hand, opcode by opcode, exactly as
`torch.save` lays them out, so the tests need neither PyTorch nor any
module named `torch`.
"""

import io
import json
import os
import struct
import zipfile

import numpy as np
import pytest

from kft.convert.timm import efficientnet_lite0_to_timm
from kft.convert.timm import lukemelas_to_timm_names
from kft.convert.torch_checkpoint import load_torch_state_dict

ASSETS = os.environ.get("KFT_ASSETS", os.path.expanduser("~/.cache/kft/assets"))
LITE0_DIR = os.path.join(ASSETS, "efficientnet_lite0")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# === Pickle opcodes (protocol 2), enough for a state dict ===


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _str(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value):
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _tuple(*items):
    return b"(" + b"".join(items) + b"t"


def _call(function, *args):
    return function + _tuple(*args) + b"R"


def _pickle(body):
    return b"\x80\x02" + body + b"."


def _ordered_dict(items):
    pairs = b"".join(_str(key) + value for key, value in items.items())
    return _call(_global("collections", "OrderedDict")) + b"(" + pairs + b"u"


def _tensor(storage, offset, size, stride, legacy, view=None):
    """`_rebuild_tensor_v2(storage, offset, size, stride, False, hooks)`.

    `view`: `(key, offset, numel)` of a legacy view into `storage`.
    """
    key, storage_type, numel = storage
    view = b"N" if view is None else _tuple(_str(view[0]), *map(_int, view[1:]))
    pid = [_str("storage"), _global("torch", storage_type), _str(key),
           _str("cpu"), _int(numel)] + ([view] if legacy else [])
    return _call(
        _global("torch._utils", "_rebuild_tensor_v2"),
        _tuple(*pid) + b"Q", _int(offset), _tuple(*map(_int, size)),
        _tuple(*map(_int, stride)), b"\x89", _ordered_dict({}),
    )


# === Checkpoints ===

DATA = np.arange(12, dtype="<f4") * 0.5 - 3  # one storage, several tensors
LONGS = np.array([7, -1, 2**40], dtype="<i8")
STORAGES = {"0": ("0", "FloatStorage", DATA.size),
            "1": ("1", "LongStorage", LONGS.size)}
EXPECTED = {
    "weight": DATA[:6].reshape(2, 3),
    "transposed": DATA[:6].reshape(2, 3).T,  # strides (1, 3): not contiguous
    "offset": DATA[7:11].reshape(2, 2),
    "steps": DATA[2:12:4],  # stride 4 from offset 2
    "counts": LONGS,
}


def _state_dict(legacy):
    f0, l1 = STORAGES["0"], STORAGES["1"]
    return _ordered_dict({
        "weight": _tensor(f0, 0, (2, 3), (3, 1), legacy),
        "transposed": _tensor(f0, 0, (3, 2), (1, 3), legacy),
        "offset": _tensor(f0, 7, (2, 2), (2, 1), legacy),
        "steps": _tensor(f0, 2, (3,), (4,), legacy),
        "counts": _tensor(l1, 0, (3,), (1,), legacy),
    })


def _legacy_bytes(state_dict_pickle, storages=(("0", DATA), ("1", LONGS))):
    sys_info = b"}(" + _str("protocol_version") + _int(1001) + _str(
        "little_endian") + b"\x88" + b"u"
    parts = [_pickle(_int(LEGACY_MAGIC)), _pickle(_int(1001)),
             _pickle(sys_info), state_dict_pickle,
             _pickle(b"](" + b"".join(_str(k) for k, _ in storages) + b"e")]
    for _, values in storages:
        parts.append(struct.pack("<q", values.size) + values.tobytes())
    return b"".join(parts)


def _zip_bytes(data_pickle, prefix="archive"):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{prefix}/data.pkl", data_pickle)
        archive.writestr(f"{prefix}/byteorder", "little")
        archive.writestr(f"{prefix}/data/0", DATA.tobytes())
        archive.writestr(f"{prefix}/data/1", LONGS.tobytes())
        archive.writestr(f"{prefix}/version", "3\n")
    return buffer.getvalue()


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _assert_exact(loaded):
    assert sorted(loaded) == sorted(EXPECTED)
    for name, expected in EXPECTED.items():
        assert loaded[name].dtype == expected.dtype, name
        assert loaded[name].flags["C_CONTIGUOUS"], name
        np.testing.assert_array_equal(loaded[name], expected, err_msg=name)


# === Round trips ===


def test_legacy_format_round_trips_exactly(tmp_path):
    path = _write(tmp_path, "legacy.pth",
                  _legacy_bytes(_pickle(_state_dict(legacy=True))))
    _assert_exact(load_torch_state_dict(path))


def test_zip_format_round_trips_exactly(tmp_path):
    path = _write(tmp_path, "model.pt",
                  _zip_bytes(_pickle(_state_dict(legacy=False)), "model"))
    _assert_exact(load_torch_state_dict(path))


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_nested_state_dict_is_unwrapped(tmp_path, key):
    wrapped = b"}(" + _str(key) + _state_dict(legacy=False) + _str(
        "epoch") + _int(3) + b"u"
    path = _write(tmp_path, "ckpt.pth", _zip_bytes(_pickle(wrapped)))
    _assert_exact(load_torch_state_dict(path))


def test_legacy_storage_views_are_sliced(tmp_path):
    view = _tensor(STORAGES["0"], 1, (2,), (2,), legacy=True, view=("9", 4, 6))
    state = _ordered_dict({"w": view})
    path = _write(tmp_path, "view.pth",
                  _legacy_bytes(_pickle(state), (("0", DATA),)))
    np.testing.assert_array_equal(load_torch_state_dict(path)["w"],
                                  DATA[4:10][1::2][:2])


def test_bfloat16_is_widened_to_float32(tmp_path):
    values = np.array([1.5, -2.0, 0.15625], dtype="<f4")
    halves = (values.view("<u4") >> 16).astype("<u2")
    state = _ordered_dict(
        {"w": _tensor(("0", "BFloat16Storage", 3), 0, (3,), (1,), True)})
    path = _write(tmp_path, "bf16.pth",
                  _legacy_bytes(_pickle(state), (("0", halves),)))
    loaded = load_torch_state_dict(path)["w"]
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, values)


# === Refused and broken files ===


@pytest.mark.parametrize("module, name", [
    ("os", "system"), ("builtins", "eval"), ("posix", "system"),
    ("torch.storage", "_load_from_bytes"), ("builtins", "getattr"),
])
@pytest.mark.parametrize("layout", ["legacy", "zip"])
def test_code_in_the_pickle_is_refused_not_run(tmp_path, module, name, layout):
    marker = tmp_path / "pwned"
    command = f"open({str(marker)!r}, 'w')" if name == "eval" else (
        f"touch {marker}")
    evil = _ordered_dict({"weight": _call(_global(module, name), _str(command))})
    data = (_legacy_bytes(_pickle(evil)) if layout == "legacy"
            else _zip_bytes(_pickle(evil)))
    path = _write(tmp_path, "evil.pth", data)
    with pytest.raises(ValueError, match=rf"'{module}\.{name}'.*evil\.pth"):
        load_torch_state_dict(path)
    assert not marker.exists()


def test_a_pickled_object_with_reduce_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = _write(tmp_path, "evil.pth", pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(ValueError, match=r"Refused to load global '\w+\.system'"):
        load_torch_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("data, message", [
    (b"hello, I am a text file\n", "not a readable PyTorch checkpoint"),
    (b"", "not a readable PyTorch checkpoint"),
    (b"\x80\x09garbage", "not a readable PyTorch checkpoint"),
    (_pickle(_int(42)) * 3, "magic number 42"),
])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, data, message):
    path = _write(tmp_path, "notes.txt", data)
    with pytest.raises(ValueError, match=message) as info:
        load_torch_state_dict(path)
    assert "notes.txt" in str(info.value)


def test_a_zip_without_data_pkl_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "hi")
    path = _write(tmp_path, "other.zip", buffer.getvalue())
    with pytest.raises(ValueError, match="not a PyTorch checkpoint.*data.pkl"):
        load_torch_state_dict(path)


def test_a_truncated_legacy_checkpoint_is_refused(tmp_path):
    data = _legacy_bytes(_pickle(_state_dict(legacy=True)))
    path = _write(tmp_path, "cut.pth", data[:-5])
    with pytest.raises(ValueError, match="ends early.*storage '1'"):
        load_torch_state_dict(path)


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    state = _ordered_dict(
        {"w": _tensor(STORAGES["0"], 5, (4, 3), (3, 1), legacy=True)})
    path = _write(tmp_path, "oob.pth",
                  _legacy_bytes(_pickle(state), (("0", DATA),)))
    with pytest.raises(ValueError, match="reaches element 16.*holds 12"):
        load_torch_state_dict(path)


# === lukemelas -> timm names ===


def _lukemelas_lite0_names():
    conv, norm = ["weight"], ["weight", "bias", "running_mean", "running_var",
                              "num_batches_tracked"]
    names = [f"_conv_stem.{p}" for p in conv] + [f"_bn0.{p}" for p in norm]
    for block in range(16):
        modules = [("_depthwise_conv", conv), ("_bn1", norm),
                   ("_project_conv", conv), ("_bn2", norm)]
        if block > 0:
            modules += [("_expand_conv", conv), ("_bn0", norm)]
        names += [f"_blocks.{block}.{m}.{p}" for m, ps in modules for p in ps]
    names += ["_conv_head.weight"] + [f"_bn1.{p}" for p in norm]
    return names + ["_fc.weight", "_fc.bias"]


def test_lite0_names_map_to_timm():
    state = {name: np.zeros(1) for name in _lukemelas_lite0_names()}
    renamed = lukemelas_to_timm_names(state)
    assert len(renamed) == 247  # num_batches_tracked dropped
    for name in [
        "conv_stem.weight", "bn1.running_var", "conv_head.weight",
        "bn2.bias", "classifier.weight", "classifier.bias",
        "blocks.0.0.conv_dw.weight", "blocks.0.0.bn1.weight",
        "blocks.0.0.conv_pw.weight", "blocks.0.0.bn2.running_mean",
        "blocks.1.0.conv_pw.weight", "blocks.1.0.bn1.weight",  # _blocks.1
        "blocks.1.1.conv_dw.weight", "blocks.1.1.bn2.bias",  # _blocks.2
        "blocks.2.0.conv_pwl.weight", "blocks.2.0.bn3.running_var",  # 3
        "blocks.5.3.conv_pwl.weight", "blocks.6.0.bn3.weight",  # 14, 15
    ]:
        assert name in renamed, name
    assert not any("num_batches_tracked" in name for name in renamed)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="'_blocks.16._bn0.weight'"):
        lukemelas_to_timm_names({"_blocks.16._bn0.weight": np.zeros(1)})


def test_converting_a_checkpoint_that_is_not_lite0_is_refused(tmp_path):
    state = _ordered_dict(
        {"_conv_stem.weight": _tensor(STORAGES["0"], 0, (2, 3), (3, 1), True)})
    path = _write(tmp_path, "tiny.pth",
                  _legacy_bytes(_pickle(state), (("0", DATA),)))
    with pytest.raises(ValueError, match="not an EfficientNet-Lite0 checkpoint"):
        efficientnet_lite0_to_timm(path, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# === The real ImageNet weights (kft convert efficientnet-lite0) ===


@pytest.mark.large
def test_converted_lite0_classifies_grace_hopper():
    weights = os.path.join(LITE0_DIR, "model.safetensors")
    if not os.path.exists(weights):
        pytest.skip(f"{weights} is missing: run "
                    "`kft convert efficientnet-lite0`")
    import keras
    import keras_hub
    import matplotlib

    with open(os.path.join(LITE0_DIR, "config.json")) as file:
        assert json.load(file)["architecture"] == "efficientnet_lite0"
    classifier = keras_hub.models.ImageClassifier.from_preset(LITE0_DIR)
    photo = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data",
                         "sample_data", "grace_hopper.jpg")
    image = np.asarray(keras.utils.load_img(photo), dtype="float32")
    logits = classifier.predict(image[None], verbose=0)[0]
    top5 = list(np.argsort(logits)[::-1][:5])
    # 652 is "military uniform" in the standard ImageNet-1k order (keras-hub's
    # `imagenet_id_to_name`, timm, Keras applications); 653 is "milk can".
    assert top5[0] == 652, top5
    assert {457, 834, 906} & set(top5), top5  # bow tie, suit, Windsor tie
