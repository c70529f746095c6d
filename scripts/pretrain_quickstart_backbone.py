"""Pretrains the small backbone that ships with kft for the offline quickstart.

ImageNet weights cannot be downloaded everywhere (CI, air-gapped machines),
so kft ships its own pretrained backbone: MobileNetV2 (alpha 0.35, 32x32)
trained here on six Fashion-MNIST classes. The four other classes are held
out of pretraining; a small sample of them ships as the quickstart's
fine-tuning data set, so `kft run quickstart` shows real transfer to
classes the backbone has never seen.

Writes, into `kft/assets/`:

- `mobilenet_v2_035_fashion_mnist.weights.h5`: the backbone weights
  (no top), loadable with `weights="fashion_mnist"`.
- `fashion_mnist_holdout.npz`: 4 held-out classes, `x_train` (200 per
  class), `x_val` (100 per class), `y_train`, `y_val`, `class_names`.

Data: `apt-get install dataset-fashion-mnist` (Debian), or
`keras.datasets.fashion_mnist` where there is a network.

Usage:

    python scripts/pretrain_quickstart_backbone.py [--epochs 10]
        [--limit N] [--output-dir kft/assets]
"""

import argparse
import os
import time

import numpy as np

import kft
from kft.data.builtin import FASHION_MNIST_CLASSES
from kft.data.builtin import load_fashion_mnist

PRETRAIN_CLASSES = (0, 1, 2, 3, 4, 5)  # T-shirt/top .. Sandal
HOLDOUT_CLASSES = (6, 7, 8, 9)  # Shirt, Sneaker, Bag, Ankle boot
HOLDOUT_TRAIN_PER_CLASS = 200
HOLDOUT_VAL_PER_CLASS = 100


def _select(x, y, classes):
    mask = np.isin(y, classes)
    remap = {c: i for i, c in enumerate(classes)}
    return x[mask], np.array([remap[c] for c in y[mask]], dtype="int32")


def write_holdout(x, y, path, seed=0):
    """Writes the held-out classes sample used by the quickstart."""
    rng = np.random.default_rng(seed)
    x_hold, y_hold = _select(x, y, HOLDOUT_CLASSES)
    train_idx, val_idx = [], []
    for label in range(len(HOLDOUT_CLASSES)):
        idx = rng.permutation(np.flatnonzero(y_hold == label))
        train_idx.extend(idx[:HOLDOUT_TRAIN_PER_CLASS])
        val_idx.extend(
            idx[
                HOLDOUT_TRAIN_PER_CLASS : HOLDOUT_TRAIN_PER_CLASS
                + HOLDOUT_VAL_PER_CLASS
            ]
        )
    train_idx = rng.permutation(train_idx)
    val_idx = rng.permutation(val_idx)
    np.savez_compressed(
        path,
        x_train=x_hold[train_idx],
        y_train=y_hold[train_idx],
        x_val=x_hold[val_idx],
        y_val=y_hold[val_idx],
        class_names=np.array([FASHION_MNIST_CLASSES[c] for c in HOLDOUT_CLASSES]),
    )


def pretrain(x, y, x_test, y_test, epochs, batch_size=128, seed=0):
    """Trains MobileNetV2 (alpha 0.35, 32 px) on the pretraining classes."""
    import keras

    keras.utils.set_random_seed(seed)
    x, y = _select(x, y, PRETRAIN_CLASSES)
    x_test, y_test = _select(x_test, y_test, PRETRAIN_CLASSES)
    train, _ = kft.data.from_numpy(
        x, y, batch_size=batch_size, image_size=(32, 32), channels=3, seed=seed
    )
    test, _ = kft.data.from_numpy(
        x_test, y_test, batch_size=256, image_size=(32, 32), channels=3,
        shuffle=False,
    )
    model = kft.build_classifier(
        "mobilenet_v2",
        len(PRETRAIN_CLASSES),
        weights=None,
        input_shape=(32, 32, 3),
        alpha=0.35,
        bn="train",
        head={"dropout": 0.2},
    )
    kft.unfreeze(model)
    # keras.applications' MobileNetV2 uses BatchNorm momentum 0.999, made
    # for ImageNet-length runs: over a few thousand steps its moving
    # statistics would stay near their initial values, and inference (which
    # the quickstart uses, with BatchNorm frozen) would be at chance.
    for layer in model.get_layer("backbone").layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    steps = int(train.cardinality()) * epochs
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps - steps // 20, warmup_target=3e-3, warmup_steps=steps // 20
    )
    augment = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomTranslation(0.1, 0.1),
        ]
    )
    train = train.map(lambda a, b: (augment(a, training=True), b))
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(train, validation_data=test, epochs=epochs, verbose=2)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N training images (tests)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the Fashion-MNIST IDX files")
    parser.add_argument(
        "--output-dir",
        default=os.path.join(os.path.dirname(__file__), "..", "kft", "assets"),
    )
    args = parser.parse_args()

    start = time.time()
    (x, y), (x_test, y_test) = load_fashion_mnist(args.data_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    write_holdout(x, y, os.path.join(args.output_dir, "fashion_mnist_holdout.npz"))
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
        x_test, y_test = x_test[: args.limit], y_test[: args.limit]
    model = pretrain(x, y, x_test, y_test, args.epochs)
    path = os.path.join(
        args.output_dir, "mobilenet_v2_035_fashion_mnist.weights.h5"
    )
    model.get_layer("backbone").save_weights(path)
    print(
        f"Wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB) in "
        f"{time.time() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
