"""Read PyTorch checkpoints without PyTorch and without running their code.

A `.pth` / `.bin` file is a pickle, and unpickling runs whatever callables the
file names. `load_torch_state_dict` reads it through a restricted unpickler
that resolves only the handful of globals a state dict needs (an
`OrderedDict`, the tensor rebuild function and the storage types) and refuses
everything else, so a malicious file fails with a `ValueError` instead of
running code.

Both serializations PyTorch has written are understood:

- the zip format (PyTorch >= 1.6): `<name>/data.pkl` holds the pickled state
  dict, `<name>/data/<key>` the raw bytes of each storage;
- the legacy format: a sequence of pickles in one file (magic number,
  protocol version, system info, the state dict, the list of storage keys),
  followed by each storage's raw bytes, each preceded by its element count as
  an 8-byte little-endian integer.
"""

import collections
import os
import pickle
import struct
import zipfile

import numpy as np

__all__ = ["load_torch_state_dict"]

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001


class _CheckpointError(ValueError):
    """A checkpoint problem already described, with the file named."""


class _StorageType:
    """Stands in for `torch.<Name>Storage`: only its element type matters."""

    def __init__(self, name, dtype):
        self.name = name
        self.dtype = np.dtype(dtype)

    def __repr__(self):
        return f"torch.{self.name}"


# bfloat16 has no numpy dtype: it is read as uint16 and widened to float32.
_STORAGE_TYPES = {
    name: _StorageType(name, dtype)
    for name, dtype in [
        ("FloatStorage", "<f4"),
        ("DoubleStorage", "<f8"),
        ("HalfStorage", "<f2"),
        ("BFloat16Storage", "<u2"),
        ("LongStorage", "<i8"),
        ("IntStorage", "<i4"),
        ("ShortStorage", "<i2"),
        ("CharStorage", "i1"),
        ("ByteStorage", "u1"),
        ("BoolStorage", "?"),
    ]
}


class _Storage:
    """A storage named by the pickle; its bytes are attached after loading."""

    def __init__(self, storage_type, key, numel, root=None, offset=0):
        self.storage_type = storage_type
        self.key = key
        self.numel = numel
        self.root = root  # legacy views: the storage this one is a slice of
        self.offset = offset
        self.array = None

    def values(self):
        if self.root is None:
            return self.array
        values = self.root.values()
        if values is None:
            return None
        return values[self.offset : self.offset + self.numel]


class _TensorRef:
    """A tensor whose storage bytes may not have been read yet."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused_args):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): value for name, value in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of `_ALLOWED_GLOBALS`; storages by id."""

    def __init__(self, file, path, storages):
        super().__init__(file)
        self.path = path
        self.storages = storages  # key -> _Storage, filled while loading

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
        raise _CheckpointError(
            f"Refused to load global '{module}.{name}' from '{self.path}': "
            "loading it could run code, and a state dict needs only "
            f"{allowed}. If the file pickles a whole model rather than its "
            "state dict, re-save it with `torch.save(model.state_dict(), "
            "path)` where the file is trusted."
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise _CheckpointError(
                f"Unsupported persistent id {pid!r} in '{self.path}': only "
                "('storage', ...) records of a state dict are understood."
            )
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, _StorageType):
            raise _CheckpointError(
                f"Storage '{key}' in '{self.path}' has type {storage_type!r}; "
                f"expected one of torch.{', torch.'.join(_STORAGE_TYPES)}."
            )
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type, key, int(numel))
        storage = self.storages[key]
        view = pid[5] if len(pid) > 5 else None
        if view is None:  # zip format records have 5 fields, legacy 6
            return storage
        view_key, view_offset, view_numel = view
        return _Storage(storage_type, str(view_key), int(view_numel),
                        root=storage, offset=int(view_offset))


def _materialize(tensor, path):
    """Returns the numpy array a `_TensorRef` describes, bounds-checked."""
    values = tensor.storage.values()
    if values is None:
        raise _CheckpointError(
            f"Storage '{tensor.storage.key}' of '{path}' has no data record."
        )
    size, stride, offset = tensor.size, tensor.stride, int(tensor.offset)
    if len(size) != len(stride) or min((*size, *stride, offset, 0)) < 0:
        raise _CheckpointError(
            f"Bad tensor layout in '{path}': size={size}, stride={stride}, "
            f"offset={offset}; expected non-negative sizes and strides of "
            "the same length."
        )
    if 0 in size:
        array = np.zeros(size, values.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= values.size:
            raise _CheckpointError(
                f"Tensor in '{path}' reaches element {last} of storage "
                f"'{tensor.storage.key}', which holds {values.size} elements."
            )
        itemsize = values.dtype.itemsize
        # order="C": a copy keeps the source's memory order by default, and
        # writers such as safetensors store the buffer, not the strides.
        array = np.array(np.lib.stride_tricks.as_strided(
            values[offset:], shape=size,
            strides=[s * itemsize for s in stride], writeable=False,
        ), order="C")
    if tensor.storage.storage_type.name == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(array, array.dtype.newbyteorder("="))


def _resolve(obj, path):
    """Replaces every `_TensorRef` in nested dicts/lists/tuples by an array."""
    if isinstance(obj, _TensorRef):
        return _materialize(obj, path)
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v, path)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, path) for v in obj)
    return obj


def _load_zip(path):
    """Reads the zip serialization: `<name>/data.pkl` + `<name>/data/<key>`."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.rpartition("/")[2] == "data.pkl"]
        if len(pickles) != 1:
            raise _CheckpointError(
                f"'{path}' is a zip file but not a PyTorch checkpoint: "
                f"expected one '<name>/data.pkl' entry, found {pickles}."
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        storages = {}
        with archive.open(pickles[0]) as file:
            result = _RestrictedUnpickler(file, path, storages).load()
        for key, storage in storages.items():
            dtype = storage.storage_type.dtype
            if byteorder == "big":
                dtype = dtype.newbyteorder(">")
            data = archive.read(f"{prefix}data/{key}")
            storage.array = np.frombuffer(data, dtype, count=storage.numel)
    return result


def _read_exact(file, count, path, what):
    """Reads `count` bytes, refusing sizes beyond the end of the file."""
    remaining = os.fstat(file.fileno()).st_size - file.tell()
    if count > remaining:
        raise _CheckpointError(
            f"'{path}' ends early: needed {count} bytes for {what}, "
            f"{remaining} are left."
        )
    data = file.read(count)
    if len(data) != count:
        raise _CheckpointError(
            f"'{path}' ends early: needed {count} bytes for {what}, "
            f"got {len(data)}."
        )
    return data


def _load_legacy(file, path):
    """Reads the legacy serialization from an open binary file."""
    storages = {}
    header = [_RestrictedUnpickler(file, path, storages).load() for _ in range(3)]
    magic, protocol, sys_info = header
    if magic != _LEGACY_MAGIC_NUMBER or protocol != _LEGACY_PROTOCOL_VERSION:
        raise _CheckpointError(
            f"'{path}' is not a PyTorch checkpoint: magic number {magic!r} "
            f"and protocol {protocol!r}, expected {_LEGACY_MAGIC_NUMBER:#x} "
            f"and {_LEGACY_PROTOCOL_VERSION}."
        )
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian"):
        raise _CheckpointError(
            f"'{path}' was written on a big-endian machine ({sys_info!r}); "
            "only little-endian legacy checkpoints are supported."
        )
    result = _RestrictedUnpickler(file, path, storages).load()
    keys = _RestrictedUnpickler(file, path, storages).load()
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise _CheckpointError(f"'{path}' lists storage '{key}' no tensor uses.")
        what = f"storage '{key}'"
        (numel,) = struct.unpack("<q", _read_exact(file, 8, path, what))
        if numel != storage.numel:
            raise _CheckpointError(
                f"Storage '{key}' of '{path}' records {numel} elements, its "
                f"tensors expect {storage.numel}."
            )
        dtype = storage.storage_type.dtype
        data = _read_exact(file, numel * dtype.itemsize, path, what)
        storage.array = np.frombuffer(data, dtype)
    return result


# What a pickle that is not a checkpoint (or is truncated) raises on loading.
_NOT_A_PICKLE_ERRORS = (
    pickle.UnpicklingError, EOFError, KeyError, IndexError, TypeError,
    AttributeError, ValueError, struct.error, OverflowError, MemoryError,
    zipfile.BadZipFile,
)


def _unwrap_state_dict(result, path):
    """Returns the state dict, looking under "state_dict" / "model" too."""
    for key in ("state_dict", "model"):
        if isinstance(result, dict) and isinstance(result.get(key), dict):
            result = result[key]
            break
    if not isinstance(result, dict):
        raise _CheckpointError(
            f"'{path}' holds a {type(result).__name__}, not a state dict: "
            "expected a dict of tensors (possibly under 'state_dict' or "
            "'model')."
        )
    return {
        str(k): v for k, v in result.items() if isinstance(v, np.ndarray)
    }


def load_torch_state_dict(path):
    """Reads a PyTorch state dict into numpy arrays, without PyTorch.

    The file is unpickled with a restricted unpickler: only
    `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
    `torch._utils._rebuild_parameter` and the `torch.*Storage` types are
    resolved, so loading never runs code named by the file. Both the zip
    format (PyTorch >= 1.6) and the legacy format are read. A state dict
    nested under "state_dict" or "model" is unwrapped; entries that are not
    tensors are dropped. bfloat16 tensors come back as float32.

    Args:
        path: path of a `.pth` / `.pt` / `.bin` file written by `torch.save`.

    Returns:
        A dict mapping each tensor name to a numpy array with the tensor's
        shape and dtype (a contiguous copy, whatever the tensor's strides).

    Raises:
        ValueError: when the file names any other global (for instance
            `os.system`), is not a PyTorch checkpoint, or is truncated.

    Example:

    >>> from kft.convert.torch_checkpoint import load_torch_state_dict
    >>> weights = load_torch_state_dict("efficientnet-lite0.pth")  # doctest: +SKIP
    >>> weights["_conv_stem.weight"].shape  # doctest: +SKIP
    (32, 3, 3, 3)
    """
    path = str(path)
    try:
        if zipfile.is_zipfile(path):
            result = _load_zip(path)
        else:
            with open(path, "rb") as file:
                result = _load_legacy(file, path)
    except _CheckpointError:
        raise
    except _NOT_A_PICKLE_ERRORS as error:
        raise ValueError(
            f"'{path}' is not a readable PyTorch checkpoint (expected the zip "
            "or the legacy `torch.save` format): "
            f"{type(error).__name__}: {error}"
        ) from error
    return _unwrap_state_dict(_resolve(result, path), path)
