"""Steps/s of `kft.fine_tune` against a hand-written `compile` + `fit`.

Same model architecture, data, stage (head only, Adam 1e-3) and epochs;
the runs alternate (hand, kft, hand, kft, ...) in one process and the
steps/s of each run is measured over the epochs after the first (which
includes tracing). Prints the median of each and their ratio (goal:
kft / hand >= 0.98).

    python benchmarks/overhead.py [--runs 5] [--size 64] [--epochs 4]
"""

import argparse
import statistics
import time

import keras
import numpy as np

import kft


class StepTimer(keras.callbacks.Callback):
    """Wall time of each epoch after the first."""

    def __init__(self):
        super().__init__()
        self.seconds, self.steps = 0.0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1

    def on_epoch_end(self, epoch, logs=None):
        if self._first_epoch is None:
            self._first_epoch = epoch
            return
        self.seconds += time.perf_counter() - self._start
        self.steps += self._batches

    def on_train_begin(self, logs=None):
        self._first_epoch = None

    @property
    def steps_per_second(self):
        return self.steps / self.seconds


def build(size):
    keras.utils.set_random_seed(0)
    return kft.build_classifier("mobilenet_v2", 4, weights=None,
                                input_shape=(size, size, 3), alpha=0.35)


def hand_written(train, size, epochs):
    model = build(size)
    timer = StepTimer()
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train, epochs=epochs, callbacks=[timer], verbose=0)
    return timer.steps_per_second


def with_kft(train, size, epochs):
    model = build(size)
    timer = StepTimer()
    kft.fine_tune(model, train, stages=[
        {"epochs": epochs, "trainable": "head", "learning_rate": 1e-3}],
        callbacks=[timer], verbose=0)
    return timer.steps_per_second


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=1024)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.images, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, 4, args.images)
    train = kft.data.from_numpy(x, y, batch_size=32, shuffle=False).train.cache()

    hand, ours = [], []
    for run in range(args.runs):
        hand.append(hand_written(train, args.size, args.epochs))
        ours.append(with_kft(train, args.size, args.epochs))
        print(f"run {run + 1}: hand-written {hand[-1]:.1f} steps/s, "
              f"kft.fine_tune {ours[-1]:.1f} steps/s")
    h, k = statistics.median(hand), statistics.median(ours)
    print(f"\nMobileNetV2 a=0.35 {args.size}px, head stage, batch 32, "
          f"{args.runs} runs each (median)")
    print(f"{'hand-written compile+fit':<28}{h:>8.1f} steps/s")
    print(f"{'kft.fine_tune':<28}{k:>8.1f} steps/s")
    print(f"{'ratio kft / hand':<28}{k / h:>8.3f}x  (goal >= 0.98)")


if __name__ == "__main__":
    main()
