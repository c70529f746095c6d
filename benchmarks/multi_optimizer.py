"""Step time of a discriminative (multi-group) Adam against a single Adam.

MobileNetV2 (alpha 0.35, 96 px), everything trainable, batch 32, synthetic
data. The same model is trained with `keras.optimizers.Adam` and with
`kft.optimizers.discriminative` (3 groups: head, top 6 blocks, rest; and
one group per block, 19 groups), alternating, in one process. Step time
is the median over epochs after the first (tracing); retraces are counted
by the number of times the train function is traced.

    python benchmarks/multi_optimizer.py [--runs 3] [--steps 30]
"""

import argparse
import statistics

import keras
from _timing import EpochTimer
from _timing import count_traces
from _timing import synthetic_images

import kft
from kft import optimizers


def build():
    keras.utils.set_random_seed(0)
    model = kft.build_classifier("mobilenet_v2", 4, input_shape=(96, 96, 3),
                                 alpha=0.35, bn="train")
    kft.unfreeze(model)
    return model


def step_time(make_optimizer, data, steps, epochs=4):
    model = build()
    model.compile(optimizer=make_optimizer(model),
                  loss="sparse_categorical_crossentropy")
    timer = EpochTimer()
    traces = count_traces(model)
    model.fit(data, epochs=epochs, steps_per_epoch=steps, callbacks=[timer],
              verbose=0)
    return statistics.median(timer.times[1:]) / steps, traces[0]




def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    data = synthetic_images(args.steps)

    variants = {
        "single Adam": lambda m: keras.optimizers.Adam(1e-3),
        "discriminative, 3 groups": lambda m: optimizers.discriminative(
            m, {"head": 1e-3, r"block_1[1-6]_.*|Conv_1.*": 1e-4}, default_lr=1e-5),
        "discriminative, per block": lambda m: optimizers.discriminative(
            m, lr=(1e-5, 1e-3)),
    }
    times = {name: [] for name in variants}
    traces = {}
    for run in range(args.runs):
        for name, make in variants.items():
            seconds, count = step_time(make, data, args.steps)
            times[name].append(seconds)
            traces[name] = count
            print(f"run {run + 1} {name:<28} {1000 * seconds:7.1f} ms/step")
    base = statistics.median(times["single Adam"])
    print("\nMobileNetV2 a=0.35 96px, all trainable, batch 32 (median of runs)")
    for name in variants:
        t = statistics.median(times[name])
        print(f"{name:<28}{1000 * t:8.1f} ms/step  {t / base:6.3f}x  "
              f"traces of train_function: {traces[name]}")
    print("goal: discriminative / single <= 1.03x, no extra retraces")


if __name__ == "__main__":
    main()
