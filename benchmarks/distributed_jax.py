"""JAX `keras.distribution` on 4 host CPU devices vs 1 device: step time
and the loss difference.

The CPU is split into 4 XLA host devices
(`--xla_force_host_platform_device_count=4`), so the same cores do the
work either way: this shows that distributed training runs, gives the
same numbers, and what its overhead is, not a speed-up. On a machine with
several GPUs or TPU cores, `distribution: data_parallel` uses them all.

- `data_parallel`: MobileNetV2 (alpha 0.35, 32 px, kft's packaged
  Fashion-MNIST weights), every layer trainable (BatchNorm too, on the
  global batch), per-group learning rates (a `MultiOptimizer`), global
  batch 32, `kft.fine_tune`.
- `model_parallel` (`--llm`): a random Llama 3 (4 layers, hidden 256),
  keras-hub's layout map on a `{batch: 2, model: 2}` mesh, full SFT of
  `kft.sft.SFTCausalLM`, batch 8 x 64 tokens.

Each is trained twice from the same weights on the same batches (1
device, then 4); median step time of the steps after the first epoch
(which compiles), and the largest relative difference in the per-epoch
losses and in the final weights (to each variable's largest entry).

    nice python benchmarks/distributed_jax.py [--steps 8] [--epochs 3] [--llm]
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=4")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _timing import StepTimer  # noqa: E402
from _timing import synthetic_images  # noqa: E402

import kft  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _train(build, data, stages, distribution, mesh=None, layout=None):
    """Builds under `distribution` ("none": 1 device), trains; returns
    (median step seconds after epoch 1, per-epoch losses, weights)."""
    timer = StepTimer()
    with kft.distribute.keras_distribution(distribution, mesh, layout=layout):
        keras.utils.set_random_seed(0)
        model = build()
        histories = kft.fine_tune(model, data, stages=stages, callbacks=[timer],
                                  verbose=0)
        weights = {w.path: keras.ops.convert_to_numpy(w) for w in model.weights}
    steps = stages[0]["steps_per_epoch"]
    losses = np.array([x for h in histories for x in h.history["loss"]])
    return statistics.median(timer.times[steps:]), losses, weights


def _compare(label, one, many, devices):
    loss = float(np.max(np.abs(one[1] - many[1]) / np.abs(one[1])))
    # Relative to each variable's largest entry (BatchNorm's moving
    # variances reach the hundreds).
    weights, worst = max(
        (float(np.abs(a - many[2][path]).max() / max(np.abs(a).max(), 1e-12)), path)
        for path, a in one[2].items())
    print(f"{label}: 1 device {one[0] * 1e3:.1f} ms/step; {devices} "
          f"{many[0] * 1e3:.1f} ms/step (ratio {many[0] / one[0]:.2f}); "
          f"losses {np.round(one[1], 4).tolist()}, max relative loss "
          f"difference {loss:.1e}, max relative weight difference "
          f"{weights:.1e} ({worst})")


def data_parallel(steps, epochs):
    data = synthetic_images(steps, 32, classes=4, batch_size=32)
    stages = [{"name": "all", "epochs": epochs, "trainable": "all",
               "steps_per_epoch": steps,
               "learning_rate": {"head": 1e-3, "backbone": 1e-4}}]

    def build():
        return kft.build_classifier("mobilenet_v2", 4, input_shape=(32, 32, 3),
                                    alpha=0.35, weights="fashion_mnist",
                                    head={"dropout": 0.0}, bn="train")

    one = _train(build, data, stages, "none")
    many = _train(build, data, stages, "data_parallel")
    _compare("data_parallel, MobileNetV2 32 px, batch 32", one, many,
             "data_parallel on 4 devices")


def model_parallel(steps, epochs):
    import keras_hub
    from llm_fixtures import tiny_causal_lm

    def build():
        lm = tiny_causal_lm(sequence_length=64, num_layers=4, hidden_dim=256)
        return kft.sft.SFTCausalLM(lm)

    records = [f"{a} {b} {c} hello {a} {b}" * 3
               for a in "abcde" for b in "abcde" for c in "ab"]
    data = kft.data.sft_dataset(records, build().lm, format="text",
                                batch_size=8, shuffle=False).repeat()
    stages = [{"name": "sft", "epochs": epochs, "trainable": "all",
               "steps_per_epoch": steps, "learning_rate": 1e-3}]
    one = _train(build, data, stages, "none")
    many = _train(build, data, stages, "model_parallel",
                  {"batch": 2, "model": 2}, keras_hub.models.Llama3Backbone)
    _compare("model_parallel, Llama 3 4x256, batch 8 x 64 tokens", one, many,
             "model_parallel {batch: 2, model: 2}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--llm", action="store_true",
                        help="also model_parallel on a small Llama 3")
    args = parser.parse_args()
    print(f"devices: {keras.distribution.list_devices()}")
    data_parallel(args.steps, args.epochs)
    if args.llm:
        model_parallel(args.steps, args.epochs)


if __name__ == "__main__":
    main()
