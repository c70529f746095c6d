"""Steps/s with 1 device vs MirroredStrategy over 2 logical CPU devices.

The CPU is split into two logical devices (`kft.distribute.split_cpu`), so
the same cores do the work either way: this shows that distributed
training runs (and what its overhead is), not a speed-up. On a machine
with GPUs, `distribution: mirrored` uses them all.

MobileNetV2 (alpha 0.35, 96 px), every layer trainable, global batch 32,
per-group learning rates (a `MultiOptimizer`), median of epochs 2..N.

    python benchmarks/distributed.py [--steps 10] [--epochs 4]
"""

import argparse
import statistics

import kft

DEVICES = kft.distribute.split_cpu(2)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from _timing import EpochTimer  # noqa: E402
from _timing import synthetic_images  # noqa: E402


def steps_per_second(strategy, data, steps, epochs):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = kft.build_classifier("mobilenet_v2", 4, input_shape=(96, 96, 3),
                                     alpha=0.35)
    timer = EpochTimer()
    kft.fine_tune(model, data, stages=[
        {"name": "all", "epochs": epochs, "trainable": "all",
         "learning_rate": {"head": 1e-3, "backbone": 1e-4},
         "steps_per_epoch": steps}],
        callbacks=[timer], verbose=0,
        strategy=strategy if strategy.num_replicas_in_sync > 1 else None)
    return steps / statistics.median(timer.times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    data = synthetic_images(4, 96, classes=4)
    one = steps_per_second(tf.distribute.get_strategy(), data, args.steps,
                           args.epochs)
    two = steps_per_second(tf.distribute.MirroredStrategy(DEVICES), data,
                           args.steps, args.epochs)
    print(f"1 device: {one:.2f} steps/s; MirroredStrategy on 2 logical CPU "
          f"devices: {two:.2f} steps/s; ratio 2/1 = {two / one:.2f} "
          "(the same 2 cores either way)")


if __name__ == "__main__":
    main()
