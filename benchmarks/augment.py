"""ImageAugmentation against the legacy ImageDataGenerator, and its cost in fit.

1. Images/s of `kft.augment.ImageAugmentation(...).flow` against the
   legacy `ImageDataGenerator(...).flow` from `tf_keras` (install it for
   this benchmark only: `pip install tf_keras`), matched transforms
   (rotation 20, shifts 0.1, horizontal flip, zoom 0.1, brightness
   [0.8, 1.2]), batch 32, at 96 and 224 px (goal >= 5x).
2. `fit` of a frozen MobileNetV2 (alpha 0.35, 96 px) fed through
   `ImageAugmentation` against the same `fit` fed pre-augmented cached
   tensors (goal >= 0.85x).

    python benchmarks/augment.py [--batches 20]
"""

import argparse
import time

import keras
import numpy as np
import tensorflow as tf
from _timing import EpochTimer

import kft
from kft.augment import ImageAugmentation

TRANSFORMS = dict(rotation_range=20, width_shift_range=0.1,
                  height_shift_range=0.1, horizontal_flip=True, zoom_range=0.1,
                  brightness_range=[0.8, 1.2])


def images_per_second(iterator, batches, batch_size=32):
    next(iterator)  # warm-up: tracing, thread pools
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def throughput(size, batches):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32 * (batches + 1), size, size, 3)).astype("float32")
    ours = images_per_second(
        iter(ImageAugmentation(**TRANSFORMS).flow(x, batch_size=32).repeat()),
        batches)
    try:
        from tf_keras.preprocessing.image import ImageDataGenerator
    except ImportError:
        return ours, None
    legacy = images_per_second(
        ImageDataGenerator(**TRANSFORMS).flow(x, batch_size=32, seed=0), batches)
    return ours, legacy




def fit_cost(steps=30, epochs=3):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32 * steps, 96, 96, 3)).astype("float32")
    y = rng.integers(0, 4, len(x))
    augmented = ImageAugmentation(**TRANSFORMS, seed=0).flow(
        x, y, batch_size=32, shuffle=True)
    cached = tf.data.Dataset.from_tensor_slices(
        (ImageAugmentation(**TRANSFORMS, seed=0).layer()(x, training=True), y)
    ).batch(32).cache()

    def run(data, in_model=False):
        keras.utils.set_random_seed(0)
        model = kft.build_classifier("mobilenet_v2", 4, input_shape=(96, 96, 3),
                                     alpha=0.35)
        if in_model:
            inputs = keras.Input((96, 96, 3))
            layer = ImageAugmentation(**TRANSFORMS, seed=0).layer()
            model = keras.Model(inputs, model(layer(inputs)))
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        timer = EpochTimer()
        model.fit(data, epochs=epochs, callbacks=[timer], verbose=0)
        return steps * 32 / min(timer.times[1:])

    plain = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).cache()
    return run(augmented), run(cached), run(plain, in_model=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    print("matched transforms:", TRANSFORMS)
    for size in (96, 224):
        ours, legacy = throughput(size, args.batches)
        line = f"{size:>3} px  ImageAugmentation {ours:8.0f} images/s"
        if legacy:
            line += (f"   legacy ImageDataGenerator {legacy:7.0f} images/s"
                     f"   ratio {ours / legacy:5.1f}x (goal >= 5x)")
        else:
            line += "   (tf_keras not installed: no legacy comparison)"
        print(line)
    augmented, cached, in_model = fit_cost()
    print(f"fit, frozen MobileNetV2 a=0.35 96px: pre-augmented cached "
          f"{cached:.0f} images/s")
    print(f"  augmented in tf.data (flow)   {augmented:6.0f} images/s, ratio "
          f"{augmented / cached:.2f}x (goal >= 0.85x)")
    print(f"  augmented inside the model    {in_model:6.0f} images/s, ratio "
          f"{in_model / cached:.2f}x")


if __name__ == "__main__":
    main()
