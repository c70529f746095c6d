"""`.npz` files from users, read without running code.

An `.npz` is a zip of `.npy` arrays. `np.load` unpickles object arrays
only with `allow_pickle=True`, which kft never passes; `read_npz` adds the
checks numpy leaves out, so a crafted file gets a sentence naming the file
and the entry, never a crash or a huge allocation:

- the file must be a zip (a pickle, or a single `.npy`, is named as such);
- every entry read must be an `.npy` array whose dtype holds no Python
  objects (refused before numpy sees the data);
- an entry's header may not declare more bytes than the entry holds, and
  the zip may not claim a size DEFLATE cannot reach: a lying shape is
  refused before anything is allocated.

`read_npz_with_meta` reads kft's own files (LoRA adapters, prompts): the
arrays plus a JSON object stored as the string array `__meta__`.
"""

import json
import math
import os
import zipfile

import numpy as np

__all__ = ["read_npz", "read_npz_with_meta"]

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
# DEFLATE expands at most about 1032:1; an entry claiming more lies.
_MAX_DEFLATE_RATIO = 1032


def _check_container(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such file: {path!r} (expected {what}).")
    with open(path, "rb") as f:
        start = f.read(6)
    if start.startswith(_NPY_MAGIC):
        raise ValueError(
            f"{path!r} holds a single array, not an .npz archive (expected "
            f"{what}). Write it with np.savez(path, name=array, ...).")
    if not start.startswith(_ZIP_MAGICS):
        pickled = " It looks like a pickle, which kft never loads." if (
            start[:1] == b"\x80") else ""
        raise ValueError(
            f"{path!r} is not a readable .npz file (expected {what}): it is "
            f"not a zip of .npy arrays.{pickled}")


def _check_entry(archive, member, name, path):
    """Refuses an object dtype or a shape the entry cannot hold, from the
    `.npy` header alone."""
    info = archive.getinfo(member)
    if (info.compress_type != zipfile.ZIP_STORED
            and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024):
        raise ValueError(
            f"{path!r}: entry {name!r} claims {info.file_size} bytes from "
            f"{info.compress_size} compressed, more than DEFLATE can expand; "
            "the file is damaged or crafted.")
    try:
        with archive.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # 3.0 (UTF-8 field names): numpy's own checks only
                return
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path!r}: array {name!r} has no valid .npy header "
                         f"({error}).") from None
    if dtype.hasobject:
        raise ValueError(
            f"{path!r}: array {name!r} holds Python objects (dtype {dtype}), "
            "which kft does not unpickle (allow_pickle=False). Save numbers, "
            "or strings as np.array(values, dtype=str).")
    needed = math.prod(shape) * dtype.itemsize
    if needed > info.file_size:
        raise ValueError(
            f"{path!r}: array {name!r} declares shape {shape} of {dtype} "
            f"({needed} bytes), but its entry holds {info.file_size} bytes; "
            "the file is damaged or crafted.")


def read_npz(path, what="an .npz file"):
    """The arrays of an `.npz` file, read without running code.

    Args:
        path: the file.
        what: what the file should be, for messages (`"a kft LoRA adapter
            file"`).

    Returns:
        A dict `name -> np.ndarray`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an `.npz`, an entry that is not an array, an
            object array, a header that lies about its size, or a
            truncated entry; the message names the file and the entry.

    Example:

    ```python
    np.savez("data.npz", x=np.zeros(3))
    read_npz("data.npz")["x"]   # array([0., 0., 0.])
    ```
    """
    path = os.fspath(path)
    _check_container(path, what)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path!r} is not a readable .npz file (expected "
                         f"{what}): {error}") from None
    with npz:
        members = {n[:-4] if n.endswith(".npy") else n: n
                   for n in npz.zip.namelist()}
        arrays = {}
        for name in members:
            member = members[name]
            if not member.endswith(".npy"):
                raise ValueError(
                    f"{path!r}: entry {member!r} is not a .npy array (expected "
                    f"{what}).")
            _check_entry(npz.zip, member, name, path)
            try:
                arrays[name] = npz[name]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
                raise ValueError(f"{path!r}: array {name!r} cannot be read "
                                 f"({error}).") from None
    return arrays


def read_npz_with_meta(path, what):
    """`(meta, arrays)` of a kft `.npz`: the JSON object stored as the
    string array `__meta__`, and every other array (`read_npz`)."""
    path = os.fspath(path)
    arrays = read_npz(path, what)
    header = arrays.pop("__meta__", None)
    if header is None or header.dtype.kind != "U" or header.shape != ():
        raise ValueError(f"{path!r} is not {what} (no '__meta__' header).")
    try:
        meta = json.loads(str(header))
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path!r} is not {what}: its '__meta__' header is "
                         f"not JSON ({error}).") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path!r} is not {what}: its '__meta__' header is a "
                         f"{type(meta).__name__}, not a JSON object.")
    return meta, arrays
