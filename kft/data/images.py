"""Image folders: one sub-folder per class, unreadable files skipped
and counted.
"""

import os
import warnings

import numpy as np
import tensorflow as tf

from kft.data.arrays import DataBundle
from kft.data.arrays import train_val_split

__all__ = ["from_image_folder", "scan_image_folder", "without_files"]

_AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def _hidden(name):
    # ".DS_Store", ".ipynb_checkpoints", macOS' "._photo.jpg" twins.
    return name.startswith(".")


def scan_image_folder(directory, classes=None):
    """Lists the images of a folder that holds one sub-folder per class.

    The one definition of an image folder in kft, shared by
    `from_image_folder` and `kft.augment.ImageAugmentation.
    flow_from_directory`:

    - a class is a sub-folder of `directory`; hidden ones (names starting
      with `"."`, such as `.ipynb_checkpoints`) are not classes;
    - an image is a file directly inside a class folder whose name ends
      with one of `IMAGE_EXTENSIONS` (any case); hidden files (such as
      macOS' `._photo.jpg`) are skipped and sub-folders are not searched;
    - classes and files are sorted by name, so labels and order do not
      depend on the file system.

    The folder's contents are listed, not decoded.

    Args:
        directory: the folder of class folders.
        classes: the class folders to read, in label order (default:
            every class folder, in alphabetical order).

    Returns:
        `(class_names, paths, labels)`: the class names (label = index),
        the image paths, and the integer label of each path. A class
        folder without images keeps its label and has no paths.

    Raises:
        ValueError: `directory` is not a folder, it has no class
            sub-folders, or a folder named in `classes` is missing.

    Example:

    ```python
    class_names, paths, labels = kft.data.scan_image_folder("data/train")
    # ["cat", "dog"], ["data/train/cat/001.jpg", ...], [0, ...]
    ```
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"Image folder not found: {directory!r}")
    found = sorted(
        entry.name for entry in os.scandir(directory)
        if entry.is_dir() and not _hidden(entry.name)
    )
    if classes is None:
        classes = found
    else:
        classes = [str(c) for c in classes]
        missing = [c for c in classes
                   if not os.path.isdir(os.path.join(directory, c))]
        if missing:
            raise ValueError(
                f"Image folder {directory!r} has no class folder(s) "
                f"{missing}. Class folders: {found}.")
    if not classes:
        raise ValueError(
            f"Image folder {directory!r} has no class sub-folders. Expected "
            "one sub-folder of images per class.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(directory, name)
        files = sorted(
            entry.name for entry in os.scandir(folder)
            if entry.is_file() and not _hidden(entry.name)
            and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        paths.extend(os.path.join(folder, f) for f in files)
        labels.extend([label] * len(files))
    return list(classes), paths, labels


def _readable(path, channels):
    """Whether TensorFlow decodes the whole file as an image."""
    try:
        tf.io.decode_image(tf.io.read_file(path), channels=channels,
                           expand_animations=False)
        return True
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
            tf.errors.UnknownError):
        return False


def from_image_folder(
    directory,
    *,
    image_size=(224, 224),
    batch_size=32,
    validation_split=0.2,
    seed=0,
    channels=3,
    on_bad_file="skip",
    verify=True,
    shuffle=True,
):
    """Loads `directory/<class_name>/*.jpg|png|...` with a validation split.

    Classes are the sub-folder names in alphabetical order, and the images
    are the files that `scan_image_folder` lists (hidden files and folders
    skipped). Every file is
    decoded once up front (`verify=True`), so a corrupt or truncated image
    is found here, with its path, and not as a crash deep in `tf.data`.
    Images of any size are resized to `image_size`; grayscale images are
    converted to `channels` (RGB by default), as are RGBA ones.

    Args:
        directory: one sub-folder of images per class.
        image_size: `(height, width)` after resizing.
        batch_size: batch size.
        validation_split: share of each class held out (stratified).
        seed: shuffling and split seed.
        channels: 1, 3 or 4.
        on_bad_file: `"skip"` (leave unreadable files out, warn with their
            count and paths, list them in `bundle.skipped_files`) or
            `"error"` (raise, listing them).
        verify: decode every file up front (set False for trusted data).
        shuffle: reshuffle the training set every epoch.

    Returns:
        A `DataBundle`.
    """
    if on_bad_file not in ("skip", "error"):
        raise ValueError(
            f"on_bad_file must be 'skip' or 'error'. Received: {on_bad_file!r}")
    if channels not in (1, 3, 4):
        raise ValueError(f"channels must be 1, 3 or 4. Received: {channels!r}")
    classes, paths, labels = scan_image_folder(directory)
    _check_image_classes(directory, classes, labels)
    bad = _unreadable_images(directory, paths, channels) if verify else []
    if bad:
        listed = "\n  ".join(bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
        if on_bad_file == "error":
            raise ValueError(
                f"{len(bad)} unreadable image file(s) in {directory!r}:\n  {listed}")
        warnings.warn(
            f"Skipped {len(bad)} unreadable image file(s) in {directory!r}:"
            f"\n  {listed}", stacklevel=2)
    paths, labels = without_files(directory, classes, paths, labels, bad,
                                  "Image folder", "images")
    (train_x, train_y), val = train_val_split(
        np.asarray(paths), np.asarray(labels, "int32"), validation_split, seed)
    size = tuple(int(v) for v in image_size)

    def pipeline(x, y, shuffle):
        return _image_file_pipeline(x, y, size, channels, batch_size,
                                    seed if shuffle else None)

    train = pipeline(train_x, train_y, shuffle)
    val_ds = pipeline(*val, False) if val is not None else None
    return DataBundle(train, val_ds, classes, (*size, channels), skipped_files=bad)


def without_files(directory, classes, paths, labels, bad, kind, what):
    """`(paths, labels)` without the `bad` files; a class folder left with
    none is an error (`kind`: "Image folder"; `what`: "images")."""
    unreadable = set(bad)
    labels = [label for p, label in zip(paths, labels) if p not in unreadable]
    paths = [p for p in paths if p not in unreadable]
    emptied = [name for i, name in enumerate(classes) if i not in set(labels)]
    if emptied:
        raise ValueError(
            f"{kind} {directory!r}: class folder(s) {emptied} hold no readable "
            f"{what}.")
    return paths, labels


def _check_image_classes(directory, classes, labels):
    """At least two classes, none of them empty."""
    counts = np.bincount(np.asarray(labels, "int64"), minlength=len(classes))
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:
        raise ValueError(
            f"Image folder {directory!r}: class folder(s) {empty} hold no "
            f"images ({', '.join(IMAGE_EXTENSIONS)}).")
    if len(classes) < 2:
        raise ValueError(
            f"Image folder {directory!r} holds a single class {classes}; a "
            "classifier needs at least two.")


def _unreadable_images(directory, paths, channels):
    """The paths TensorFlow cannot decode, with progress for large folders."""
    progress = None
    if len(paths) >= 2000:
        import keras

        print(f"Checking {len(paths)} images in {directory}")
        progress = keras.utils.Progbar(len(paths))
    bad = []
    for i, path in enumerate(paths):
        if not _readable(path, channels):
            bad.append(path)
        if progress is not None and (i + 1) % 200 == 0:
            progress.update(i + 1)
    return bad


def _image_file_pipeline(paths, labels, size, channels, batch_size, shuffle_seed):
    """Batches of `(image, label)` decoded from `paths` and resized to
    `size`; reshuffled every epoch unless `shuffle_seed` is None."""

    def load(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                                   expand_animations=False)
        image.set_shape((None, None, channels))
        image = tf.image.resize(tf.cast(image, tf.float32), size)
        return image, label

    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.map(load, num_parallel_calls=_AUTOTUNE).batch(batch_size).prefetch(
        _AUTOTUNE)
