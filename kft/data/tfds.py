"""TensorFlow Datasets, offline when the data is already prepared.
"""


import tensorflow as tf

from kft.data.arrays import DataBundle
from kft.data.arrays import image_transform
from kft.utils import offline

__all__ = ["from_tfds"]

_AUTOTUNE = tf.data.AUTOTUNE


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
    transform = image_transform(image_size, channels)

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
    cannot be downloaded (`kft.utils.offline.require_network`)."""
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
