"""Data sets for fine-tuning, as batched `tf.data` pipelines.

Every loader checks the data before training starts (labels in range, at
least two classes, no empty folder) and returns `(train, val)` datasets
of `(images, labels)` batches, with images as float32 raw pixels in
[0, 255], which is what a kft model takes.
"""

import gzip
import os
import warnings

import numpy as np
import tensorflow as tf

from kft import offline
from kft.safe_npz import read_npz

__all__ = [
    "BUILTIN_DATASETS",
    "DataBundle",
    "FASHION_MNIST_CLASSES",
    "from_audio_folder",
    "check_labels",
    "from_image_folder",
    "from_numpy",
    "from_texts",
    "from_tfds",
    "load_builtin",
    "load_fashion_mnist",
    "load_fortunes",
    "load_npz",
    "load_wordnet_glosses",
    "without_files",
    "sft_dataset",
    "preference_dataset",
    "load_text_file",
    "scan_image_folder",
    "subset_per_class",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_ASSETS = os.path.join(os.path.dirname(__file__), "assets")
BUILTIN_DATASETS = {
    "fashion_mnist_holdout": os.path.join(_ASSETS, "fashion_mnist_holdout.npz"),
}
FORTUNES_DIRS = ("/usr/share/games/fortunes",)
FORTUNES_TOPICS = ("art", "computers", "politics", "science")
_AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


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


def _image_transform(image_size, channels):
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
        _image_transform(image_size, channels), num_parallel_calls=_AUTOTUNE
    )
    return ds.prefetch(_AUTOTUNE)


def _split(x, y, validation_split, seed):
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
        train_xy, val_xy = _split(x, y, validation_split, seed)
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
    (train_x, train_y), val = _split(np.asarray(paths), np.asarray(labels, "int32"),
                                     validation_split, seed)
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


def from_tfds(
    name,
    *,
    data_dir=None,
    train_split="train",
    val_split="test",
    batch_size=32,
    image_size=None,
    channels=None,
    download=False,
    shuffle=True,
):
    """Loads a TensorFlow Datasets image classification set.

    Args:
        name: the tfds name, e.g. `"tf_flowers"`.
        data_dir: where the prepared data lives (tfds' `data_dir`).
        train_split: a tfds split string.
        val_split: a tfds split string (`None` for no validation).
        download: allow tfds to download and prepare the data.
        shuffle: shuffle the training files and examples every epoch.

    Returns:
        A `DataBundle`.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:
        raise ValueError(
            f"Unknown tfds dataset {name!r}: {str(error).splitlines()[0]}"
        ) from None
    if download:
        if not builder.is_prepared():
            _require_tfds_network(builder, name, data_dir)
        try:
            builder.download_and_prepare()
        except Exception as error:
            raise RuntimeError(
                f"Could not download tfds dataset {name!r} (no network?). "
                f"Prepare it where there is a network and pass data_dir. "
                f"Cause: {str(error).splitlines()[0]}"
            ) from None
    elif not builder.is_prepared():
        raise RuntimeError(
            f"tfds dataset {name!r} is not prepared in "
            f"{builder.data_dir!r} and download=False. Prepare it where "
            "there is a network (tfds.load(name, data_dir=...)) and pass "
            "that data_dir, or set download=True."
        )
    info = builder.info
    class_names = info.features["label"].names
    transform = _image_transform(image_size, channels)

    def load(split, shuffle):
        ds = builder.as_dataset(split=split, as_supervised=True,
                                shuffle_files=shuffle)
        if shuffle:
            ds = ds.shuffle(1000)
        if image_size is not None:
            ds = ds.map(lambda x, y: (tf.image.resize(x, image_size), y))
        ds = ds.batch(batch_size).map(transform, num_parallel_calls=_AUTOTUNE)
        return ds.prefetch(_AUTOTUNE)

    train = load(train_split, shuffle)
    val = load(val_split, False) if val_split else None
    return DataBundle(train, val, class_names, train.element_spec[0].shape[1:])


def _require_tfds_network(builder, name, data_dir):
    """Fails in seconds, not minutes of tfds retries, when the data set
    cannot be downloaded (`kft.offline.require_network`)."""
    try:  # the data set's own source, from its checksums file
        url = next(iter(builder.url_infos or {}), None)
    except Exception:  # builders without checksums
        url = None
    offline.require_network(
        f"tfds data set {name!r}",
        f"data_dir=<a folder where tfds.load({name!r}, data_dir=...) "
        "prepared it on a machine with a network> (it is not prepared in "
        f"{data_dir or builder.data_dir!r})",
        url=url or "https://storage.googleapis.com")


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(data_dir=None):
    """Returns Fashion-MNIST as `((x_train, y_train), (x_test, y_test))`.

    Reads the original IDX files from `data_dir`, from the Debian package
    `dataset-fashion-mnist`, or falls back to `keras.datasets` (network).
    """
    candidates = [data_dir] if data_dir else list(FASHION_MNIST_DIRS)
    for folder in candidates:
        files = {
            key: os.path.join(folder, f"{key}-idx{rank}-ubyte.gz")
            for key, rank in (("train-images", 3), ("train-labels", 1),
                              ("t10k-images", 3), ("t10k-labels", 1))
        }
        if all(os.path.exists(p) for p in files.values()):
            return (
                (_read_idx(files["train-images"]), _read_idx(files["train-labels"])),
                (_read_idx(files["t10k-images"]), _read_idx(files["t10k-labels"])),
            )
    if data_dir:
        raise ValueError(f"No Fashion-MNIST IDX files in {data_dir!r}.")
    import keras

    from kft._keras_internals import before_keras_download

    instead = ("data_dir=<folder with the IDX files> (`apt-get install "
               "dataset-fashion-mnist` puts them where kft looks)")

    def check(url):  # only for files not in Keras' cache
        offline.require_network("Fashion-MNIST", instead, url=url)

    try:
        with before_keras_download(check):
            return keras.datasets.fashion_mnist.load_data()
    except offline.NetworkUnavailableError:
        raise
    except Exception:
        raise RuntimeError(
            "Fashion-MNIST is not installed and cannot be downloaded. "
            "Install it with `apt-get install dataset-fashion-mnist` or pass "
            "data_dir=<folder with the IDX files>."
        ) from None


def load_builtin(name):
    """Loads a data set that ships inside kft.

    Returns:
        `((x_train, y_train), (x_val, y_val), class_names)`.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(
            f"Unknown built-in dataset {name!r}. Known: "
            f"{sorted(BUILTIN_DATASETS)}."
        )
    with np.load(BUILTIN_DATASETS[name], allow_pickle=False) as data:
        return (
            (data["x_train"], data["y_train"]),
            (data["x_val"], data["y_val"]),
            [str(c) for c in data["class_names"]],
        )


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


def load_fortunes(topics=FORTUNES_TOPICS, *, data_dir=None, per_topic=None,
                  min_chars=20, seed=0):
    """A real topic-classification text set: the `fortune` files by topic.

    Debian's `fortunes` package installs one plain-text file per topic
    (`computers`, `politics`, `science`, `art`, ...), entries separated by
    `%` lines. Each entry is an example labelled with its file's topic.
    Whitespace is collapsed; entries shorter than `min_chars` and entries
    found under two topics are dropped.

    Args:
        topics: file names to read; classes in this order.
        data_dir: the folder of the files (default: Debian's).
        per_topic: keep at most this many entries per topic (a seeded
            random choice), for balanced or smaller sets.
        min_chars: drop shorter entries.
        seed: for the `per_topic` choice.

    Returns:
        `(texts, labels, class_names)`.
    """
    folders = [data_dir] if data_dir else list(FORTUNES_DIRS)
    folder = next((f for f in folders if f and os.path.isdir(f)), None)
    if folder is None:
        raise RuntimeError(
            "The fortunes files are not installed. Install them with "
            "`apt-get install fortunes` or pass data_dir=<folder of the files>.")
    topics = list(topics)
    if len(topics) < 2:
        raise ValueError(f"Give at least 2 topics. Received: {topics!r}")
    entries = {}
    for topic in topics:
        path = os.path.join(folder, topic)
        if not os.path.isfile(path):
            available = sorted(
                f for f in os.listdir(folder)
                if "." not in f and os.path.isfile(os.path.join(folder, f)))
            raise ValueError(
                f"No fortunes topic {topic!r} in {folder}. Available: {available}")
        with open(path, encoding="utf-8", errors="replace") as f:
            chunks = f.read().split("\n%\n")
        entries[topic] = [" ".join(c.split()) for c in chunks
                          if len(" ".join(c.split())) >= min_chars]
    seen = {}
    for texts in entries.values():
        for text in set(texts):
            seen[text] = seen.get(text, 0) + 1
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for label, topic in enumerate(topics):
        kept = list(dict.fromkeys(t for t in entries[topic] if seen[t] == 1))
        if per_topic is not None and len(kept) > per_topic:
            kept = [kept[i] for i in sorted(rng.choice(len(kept), per_topic,
                                                       replace=False))]
        texts.extend(kept)
        labels.extend([label] * len(kept))
    return texts, labels, topics


def load_text_file(path, text_column="text", label_column="label"):
    """Reads texts and labels from a `.csv` (with a header row) or `.jsonl`.

    Labels may be integers or names; names are mapped to indices in
    alphabetical order.

    Returns:
        `(texts, labels, class_names)`.
    """
    import csv

    if not os.path.isfile(path):
        raise ValueError(f"Text file not found: {path!r}")
    try:
        rows = _text_rows(path)
    except (UnicodeDecodeError, RecursionError, csv.Error) as error:
        # Plain parsers, nothing runs; say which file and what broke.
        raise ValueError(f"{path}: not readable as text data "
                         f"({type(error).__name__}: {error})") from None
    if not rows:
        raise ValueError(f"{path!r} holds no examples.")
    for key in (text_column, label_column):
        if key not in rows[0]:
            raise ValueError(
                f"{path!r} has no column {key!r}. Columns: {sorted(rows[0])}")
    texts = [str(r[text_column]) for r in rows]
    raw = [r[label_column] for r in rows]
    try:
        labels = [int(v) for v in raw]
        class_names = [str(i) for i in range(max(labels) + 1)]
    except (TypeError, ValueError):
        class_names = sorted({str(v) for v in raw})
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[str(v)] for v in raw]
    return texts, labels, class_names


def _text_rows(path):
    """The records of a `.jsonl` (objects) or `.csv` / `.tsv` file."""
    import csv
    import json

    rows = []
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(
                            f"{path}:{number}: not valid JSON: {error}") from None
                    if not isinstance(rows[-1], dict):
                        raise ValueError(
                            f"{path}:{number}: not a JSON object (a "
                            f"{type(rows[-1]).__name__}).")
    elif path.endswith((".csv", ".tsv")):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(
                f, delimiter="\t" if path.endswith(".tsv") else ","))
    else:
        raise ValueError(
            f"Text data must be .csv, .tsv or .jsonl. Received: {path!r}")
    return rows


def from_texts(texts, labels, *, batch_size=32, validation_split=0.2,
               shuffle=True, seed=0, class_names=None):
    """Batched `tf.data` pipelines of `(string, label)` for text models.

    A keras-hub text classifier (`kft.build_text_classifier`) takes these
    raw strings. The validation split is stratified.

    Returns:
        A `DataBundle` (`input_shape` is `()`).
    """
    texts = np.asarray([str(t) for t in texts], dtype=object)
    labels = np.asarray(labels)
    if len(texts) != len(labels):
        raise ValueError(
            f"texts and labels differ in length: {len(texts)} and {len(labels)}")
    num_classes = check_labels(labels, len(class_names) if class_names else None,
                               where="labels")
    (train_x, train_y), val = _split(texts, labels.astype("int32"),
                                     validation_split, seed)

    def pipeline(x, y, shuffle_it):
        ds = tf.data.Dataset.from_tensor_slices((x.astype(str), y))
        if shuffle_it:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(_AUTOTUNE)

    train = pipeline(train_x, train_y, shuffle)
    val_ds = pipeline(*val, False) if val is not None else None
    names = class_names or [str(i) for i in range(num_classes)]
    return DataBundle(train, val_ds, names, ())


def sft_dataset(records_or_path, lm, *, format="prompt_completion", batch_size=8,
                packing=False, shuffle=True, **kwargs):
    """Supervised fine-tuning batches for a causal LM: `kft.sft.sft_dataset`.

    Yields `(x, y, sample_weight)` as keras-hub's `CausalLMPreprocessor`
    does, with weight 1 on completion (assistant) tokens only; train with
    `kft.sft.SFTCausalLM(lm)`. See `kft.sft.sft_dataset` for every argument.
    """
    from kft.sft import sft_dataset as build

    return build(records_or_path, lm, format=format, batch_size=batch_size,
                 packing=packing, shuffle=shuffle, **kwargs)


WORDNET_NOUNS = ("/usr/share/wordnet/data.noun",)


def load_wordnet_glosses(path=None, *, max_examples=None, seed=0):
    """WordNet's noun definitions as SFT records: "Define: word" -> gloss.

    A real supervised fine-tuning task that installs offline (Debian
    `wordnet-base`): 82,115 noun synsets, each with a human-written gloss.
    The first lemma of each synset is the word (underscores become
    spaces); the gloss is its text before the first example sentence.

    Args:
        path: WordNet's `data.noun` (default: the Debian package's).
        max_examples: keep this many, drawn at random with `seed`.
        seed: the draw's seed.

    Returns:
        A list of `{"prompt": "Define: <word>\n", "completion": <gloss>}`.
    """
    path = path or next((p for p in WORDNET_NOUNS if os.path.exists(p)), None)
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(
            "WordNet is not installed: apt-get install wordnet-base (or pass "
            "path= to a WordNet data.noun file).")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" ") or "|" not in line:
                continue  # the licence header
            fields, gloss = line.split("|", 1)
            word = fields.split()[4].replace("_", " ")
            gloss = gloss.split(';"', 1)[0].split('; "', 1)[0].strip()
            if gloss:
                records.append({"prompt": f"Define: {word}\n", "completion": gloss})
    if max_examples is not None and max_examples < len(records):
        rng = np.random.default_rng(seed)
        keep = sorted(rng.choice(len(records), max_examples, replace=False))
        records = [records[i] for i in keep]
    return records


def from_audio_folder(directory, **kwargs):
    """WAV class folders -> fixed-length mono waveforms, a `DataBundle`; see
    `kft.audio_data.from_audio_folder` for the arguments."""
    from kft.audio_data import from_audio_folder as load

    return load(directory, **kwargs)


def preference_dataset(records_or_path, lm, *, format="prompt_chosen_rejected",
                       batch_size=8, shuffle=True, **kwargs):
    """Preference batches for a causal LM: `kft.preference_data.preference_dataset`.

    Yields `(x, y, sample_weight)` of shape `(batch, 2, length)`: the chosen
    and the rejected answer of each prompt (TRL's `prompt`, `chosen`,
    `rejected`; or chat `messages`; or unpaired `prompt`, `completion`,
    `label` for KTO), weight 1 on the answers' tokens only; train with
    `kft.preference.PreferenceCausalLM(lm)`. See
    `kft.preference_data.preference_dataset` for every argument.
    """
    from kft.preference_data import preference_dataset as build

    return build(records_or_path, lm, format=format, batch_size=batch_size,
                 shuffle=shuffle, **kwargs)
