"""In-memory data: arrays and `.npz` files -> batched `tf.data`
pipelines of `(images, labels)`, with the checks every loader shares.
"""

import os

import numpy as np
import tensorflow as tf

from kft.utils.safe_npz import read_npz

__all__ = ["DataBundle", "check_labels", "from_numpy", "load_npz", "subset_per_class"]

_AUTOTUNE = tf.data.AUTOTUNE


class DataBundle:
    """Train and validation datasets with what a model needs to know.

    Attributes:
        train: batched `tf.data.Dataset` of `(images, labels)`.
        val: the same for validation, or `None`.
        class_names: list of class names, index = label.
        input_shape: `(height, width, channels)` of the images.
    """

    def __init__(self, train, val, class_names, input_shape, skipped_files=()):
        self.train = train
        self.val = val
        self.class_names = list(class_names)
        self.input_shape = tuple(input_shape)
        # Unreadable files a loader left out (`from_image_folder`).
        self.skipped_files = list(skipped_files)

    @property
    def num_classes(self):
        return len(self.class_names)

    def __iter__(self):
        # `train, val = bundle` reads naturally.
        return iter((self.train, self.val))


def check_labels(y, num_classes=None, where="labels"):
    """Checks integer class labels before training; returns num_classes.

    Raises:
        ValueError: non-integer labels, labels out of range, or fewer
            than two classes.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(
            f"{where} must be a 1D array of integer class indices. Received "
            f"shape {y.shape}."
        )
    if y.size == 0:
        raise ValueError(f"{where} is empty: there is nothing to train on.")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(
                f"{where} must be integer class indices. Received values "
                f"such as {y[:3].tolist()}."
            )
    low, high = int(y.min()), int(y.max())
    if num_classes is None:
        num_classes = high + 1
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"{where} out of range: found label {bad}, but labels must be in "
            f"[0, {num_classes - 1}] for num_classes={num_classes}."
        )
    present = np.unique(y).size
    if present < 2:
        raise ValueError(
            f"{where} hold a single class ({low}); a classifier needs at "
            "least two."
        )
    return num_classes


def subset_per_class(x, y, per_class, seed=0):
    """Keeps at most `per_class` random examples of each class."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1. Received: {per_class}")
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        keep.extend(rng.permutation(idx)[:per_class])
    keep = np.sort(np.asarray(keep))
    return x[keep], y[keep]


def image_transform(image_size, channels):
    """Batched map: to float32, grayscale/RGB conversion, resize."""

    def transform(images, labels):
        images = tf.cast(images, tf.float32)
        if images.shape.rank == 3:
            images = images[..., tf.newaxis]
        have = images.shape[-1]
        if channels is not None and have != channels:
            if have == 1:
                images = tf.repeat(images, channels, axis=-1)
            elif have == 3 and channels == 1:
                images = tf.image.rgb_to_grayscale(images)
            else:
                raise ValueError(
                    f"Cannot convert images with {have} channels to "
                    f"{channels} channels."
                )
        if image_size is not None and tuple(images.shape[1:3]) != tuple(
            image_size
        ):
            images = tf.image.resize(images, image_size)
        return images, labels

    return transform


def _pipeline(x, y, batch_size, shuffle, seed, image_size, channels):
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(
        image_transform(image_size, channels), num_parallel_calls=_AUTOTUNE
    )
    return ds.prefetch(_AUTOTUNE)


def train_val_split(x, y, validation_split, seed):
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(
            "validation_split must be in [0, 1). Received: "
            f"validation_split={validation_split}"
        )
    if validation_split == 0.0:
        return (x, y), None
    labels, counts = np.unique(y, return_counts=True)
    single = [int(label) for label, count in zip(labels, counts) if count < 2]
    if single:
        raise ValueError(
            f"Class(es) {single} have a single example: a stratified "
            f"validation split (validation_split={validation_split}) would "
            "leave none to train on. Add examples or set validation_split=0.")
    rng = np.random.default_rng(seed)
    # Stratified: the same share of every class goes to validation.
    val_idx = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        val_idx.extend(idx[: max(1, int(round(len(idx) * validation_split)))])
    mask = np.zeros(len(y), dtype=bool)
    mask[val_idx] = True
    return (x[~mask], y[~mask]), (x[mask], y[mask])


def from_numpy(
    x,
    y,
    *,
    x_val=None,
    y_val=None,
    batch_size=32,
    validation_split=0.0,
    shuffle=True,
    seed=0,
    image_size=None,
    channels=None,
    num_classes=None,
    per_class=None,
    class_names=None,
):
    """Builds train/validation pipelines from NumPy image arrays.

    Args:
        x: images, `(N, H, W)` or `(N, H, W, C)`, any numeric dtype, raw
            pixel values in [0, 255].
        y: integer class labels, `(N,)`.
        x_val: images of a separate validation set (else
            `validation_split`).
        y_val: the labels of `x_val`.
        batch_size: batch size.
        validation_split: share of each class held out for validation.
        shuffle: shuffle the training set every epoch.
        seed: seed for the split, the subset and the shuffling.
        image_size: `(height, width)` to resize to, or `None` to keep.
        channels: convert to this many channels (1 <-> 3), or `None`.
        num_classes: the number of classes (default: max label + 1).
        per_class: keep at most this many training examples per class.
        class_names: names of the classes (default: `"0"`, `"1"`, ...).

    Returns:
        A `DataBundle`; `train, val = from_numpy(...)` also works.
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(
            f"x and y differ in length: {len(x)} images, {len(y)} labels."
        )
    num_classes = check_labels(y, num_classes, where="y")
    y = y.astype("int32")
    if x_val is not None:
        x_val, y_val = np.asarray(x_val), np.asarray(y_val).astype("int32")
        check_labels(y_val, num_classes, where="y_val")
        train_xy, val_xy = (x, y), (x_val, y_val)
    else:
        train_xy, val_xy = train_val_split(x, y, validation_split, seed)
    if per_class:
        train_xy = subset_per_class(*train_xy, per_class, seed=seed)
    train = _pipeline(*train_xy, batch_size, shuffle, seed, image_size, channels)
    val = None
    if val_xy is not None:
        val = _pipeline(*val_xy, batch_size, False, seed, image_size, channels)
    shape = train.element_spec[0].shape[1:]
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(
            f"class_names has {len(class_names)} names for {num_classes} "
            "classes."
        )
    return DataBundle(train, val, class_names, shape)


_NPZ_REQUIRED = ("x_train", "y_train")
_NPZ_OPTIONAL = ("x_val", "y_val", "class_names")


def load_npz(path):
    """Reads an image data set stored as NumPy arrays in one `.npz` file.

    The file holds `x_train` and `y_train`, and optionally `x_val` with
    `y_val` (both or neither) and `class_names` (strings). It is read with
    `allow_pickle=False`: a data file never runs code.

    Args:
        path: the `.npz` file (e.g. written by `np.savez`).

    Returns:
        `(x, y, x_val, y_val, class_names)`: NumPy arrays; `x_val`,
        `y_val` are `None` when absent and `class_names` is a list of
        strings or `None`.

    Raises:
        ValueError: the file is missing or not an `.npz`, a required array
            is missing (named), or an array holds Python objects.

    Example:

    ```python
    np.savez("data.npz", x_train=x, y_train=y,
             class_names=np.array(["cat", "dog"]))
    x, y, x_val, y_val, class_names = kft.data.load_npz("data.npz")
    bundle = kft.data.from_numpy(x, y, x_val=x_val, y_val=y_val,
                                 class_names=class_names)
    ```
    """
    path = os.fspath(path)
    expected = (f"arrays {list(_NPZ_REQUIRED)}, optionally x_val with y_val, "
                "and class_names")
    if not os.path.isfile(path):
        raise ValueError(f"No such .npz file: {path!r} (expected {expected}).")
    found = read_npz(path, expected)  # allow_pickle=False, sizes checked
    missing = [k for k in _NPZ_REQUIRED if k not in found]
    if ("x_val" in found) != ("y_val" in found):
        missing.append("y_val" if "x_val" in found else "x_val")
    if missing:
        raise ValueError(
            f"{path!r} lacks array(s) {missing}: expected {expected}. Found: "
            f"{sorted(found)}.")
    arrays = {key: found.get(key) for key in (*_NPZ_REQUIRED, *_NPZ_OPTIONAL)}
    names_array = arrays["class_names"]
    class_names = (None if names_array is None
                   else [str(c) for c in np.ravel(names_array)])
    return (arrays["x_train"], arrays["y_train"], arrays["x_val"],
            arrays["y_val"], class_names)
