"""Costs of freezing and of unfreezing inside one `fit`.

MobileNetV2 (alpha 0.35, 96 px, batch 32, BatchNorm trainable with its
block), synthetic data, Adam. Prints, as medians over runs alternating in
one process:

1. step time with only the head trainable / with everything trainable
   (goal <= 0.40: frozen blocks get no backward pass);
2. steady-state step time after an unfreeze by `GradualUnfreezing` inside
   one `fit` / a fresh `compile` + `fit` with the same trainable set (goal
   <= 1.02), and the number of train-step traces per unfreeze (goal <= 1).

    python benchmarks/unfreeze.py [--runs 3] [--steps 20] [--blocks 6]
"""

import argparse
import statistics

import keras
from _timing import EpochTimer
from _timing import count_traces
from _timing import synthetic_images

import kft
from kft.training.callbacks import GradualUnfreezing


def build():
    keras.utils.set_random_seed(0)
    return kft.build_classifier("mobilenet_v2", 4, input_shape=(96, 96, 3),
                                alpha=0.35, bn="train")


def run(model, data, steps, epochs, callbacks=()):
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss="sparse_categorical_crossentropy")
    timer = EpochTimer()
    traces = count_traces(model)
    model.fit(data, epochs=epochs, steps_per_epoch=steps, verbose=0,
              callbacks=[*callbacks, timer])
    return [t / steps for t in timer.times], traces[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=6)
    args = parser.parse_args()
    data = synthetic_images(args.steps)

    results = {k: [] for k in ("head", "all", "after_unfreeze", "fresh")}
    traces = {}
    for r in range(args.runs):
        model = build()
        times, _ = run(model, data, args.steps, 3)
        results["head"].append(statistics.median(times[1:]))

        model = build()
        kft.unfreeze(model)
        times, _ = run(model, data, args.steps, 3)
        results["all"].append(statistics.median(times[1:]))

        model = build()
        times, count = run(model, data, args.steps, 4, callbacks=[
            GradualUnfreezing({1: args.blocks}, verbose=0)])
        # Epoch 0: head only (first trace); epoch 1: the unfreeze and its
        # retrace; epochs 2-3: steady state.
        results["after_unfreeze"].append(statistics.median(times[2:]))
        traces["after_unfreeze"] = count

        model = build()
        kft.unfreeze(model, last_n_blocks=args.blocks)
        times, count = run(model, data, args.steps, 3)
        results["fresh"].append(statistics.median(times[1:]))
        traces["fresh"] = count
        print(f"run {r + 1}: " + ", ".join(
            f"{k} {1000 * v[-1]:.1f} ms/step" for k, v in results.items()))

    m = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nMobileNetV2 a=0.35 96px, batch 32, {args.runs} runs (median)")
    print(f"head only            {1000 * m['head']:7.1f} ms/step")
    print(f"all trainable        {1000 * m['all']:7.1f} ms/step")
    print(f"ratio head / all     {m['head'] / m['all']:7.3f}   (goal <= 0.40)")
    print(f"after unfreeze of top {args.blocks} blocks inside fit "
          f"{1000 * m['after_unfreeze']:7.1f} ms/step")
    print(f"fresh compile + fit, same blocks       "
          f"{1000 * m['fresh']:7.1f} ms/step")
    print(f"ratio after / fresh  {m['after_unfreeze'] / m['fresh']:7.3f}   "
          "(goal <= 1.02)")
    extra = traces["after_unfreeze"] - traces["fresh"]
    print(f"train-step traces: fresh fit {traces['fresh']}, fit with one "
          f"unfreeze {traces['after_unfreeze']} -> {extra} extra per unfreeze "
          "(goal <= 1)")


if __name__ == "__main__":
    main()
