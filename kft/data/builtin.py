"""Real data sets that install offline: Fashion-MNIST (Debian
`dataset-fashion-mnist`) and the embedded hold-out set.
"""

import gzip
import os

import numpy as np

from kft.utils import offline

__all__ = ["BUILTIN_DATASETS", "FASHION_MNIST_CLASSES", "load_builtin",
           "load_fashion_mnist"]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
BUILTIN_DATASETS = {
    "fashion_mnist_holdout": os.path.join(_ASSETS, "fashion_mnist_holdout.npz"),
}


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
