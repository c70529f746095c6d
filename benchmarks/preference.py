"""What a preference (DPO) train step costs against an SFT step, counted by XLA.

Issue 25's two cost goals, measured without depending on the machine: the
JAX train step of each variant is compiled on the CPU (`jax.jit(model
.train_step).lower(state, batch).compile()`, no step is run) and XLA's
analysis of the compiled module is read: flops and bytes accessed
(`cost_analysis()`), temporary memory and the step's arguments
(`memory_analysis()`; their sum is the step's peak memory, less what XLA
aliases).

The model: a keras-hub `Llama3Backbone` of SmolLM2-135M's shape
(`_llm.SMOLLM2`, random weights, bfloat16) with kft LoRA rank 8 on every
linear layer, AdamW. The same tokens in every variant: `--pairs` pairs of
`--seq` tokens, that is `2 * pairs` sequences.

- `sft_lora`: `kft.sft.SFTCausalLM` on the `2 * pairs` sequences as SFT
  rows (the denominator of every ratio);
- `dpo_lora`: `kft.preference.PreferenceCausalLM(loss="dpo")`, the
  reference the same weights with the adapters off (a second forward pass,
  without gradients, each step);
- `dpo_precomputed`: the same with the reference log-probabilities read
  from the batch (`reference="precomputed"`: no reference pass);
- `simpo_lora`: SimPO, reference-free.

    python benchmarks/preference.py [--layers 30] [--seq 256] [--pairs 4]
        [--variants sft_lora,dpo_lora,dpo_precomputed,simpo_lora]

`--layers 2 --seq 64 --pairs 2` checks the script in a minute.

Measured (default shape: 30 layers, sequence 256, 4 pairs; keras 3.15.1,
keras-hub 0.32.0, jax 0.10.2, XLA CPU; the same on any machine; about 2
minutes on two busy CPU cores):

                     sft_lora   dpo_lora   dpo_precomputed   simpo_lora   dpo_lora/sft
    flops (T)          1.2544     1.8554            1.2544       1.2544          1.479
    bytes (GB)          54.04      72.96             54.04        54.04          1.350
    temporary (GB)     5.4969     5.4969            5.4969       5.4969          1.000
    peak (GB)          5.7953     5.7953            5.7953       5.7953          1.000

Issue 25's goals: DPO step / SFT step <= 2.2 (flops: 1.48), peak memory
<= 1.3 (1.000: no second copy of the weights, and the reference pass keeps
no activations for a backward pass).
"""

import argparse
import gc
import os
import sys
import time

import numpy as np

os.environ["KERAS_BACKEND"] = "jax"
# `_llm` beside this file, and the kft of this checkout (not an installed one).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

from _llm import SMOLLM2  # noqa: E402
from _llm import batches  # noqa: E402
from _llm import build_lm  # noqa: E402
from _llm import import_kft_first  # noqa: E402

# Variant -> (PreferenceCausalLM arguments, or None for SFT).
VARIANTS = {
    "sft_lora": None,
    "dpo_lora": {"loss": "dpo", "reference": "adapters_off"},
    "dpo_precomputed": {"loss": "dpo", "reference": "precomputed"},
    "simpo_lora": {"loss": "simpo"},
}
METRICS = ("flops", "bytes_accessed", "temp_bytes", "peak_bytes")


def _data(variant, config, seq, pairs):
    """The batch: `2 * pairs` SFT rows, or the same rows as pairs."""
    x, y, weights = batches(1, 2 * pairs, seq, config["vocabulary_size"],
                            seed=0)
    if VARIANTS[variant] is None:
        return x, y, weights
    shape = (pairs, 2, seq)
    x = {key: value.reshape(shape) for key, value in x.items()}
    if VARIANTS[variant].get("reference") == "precomputed":
        x["reference_logps"] = np.full((pairs, 2), -100.0, "float32")
    return x, y.reshape(shape), weights.reshape(shape)


def compiled_step(variant, config, seq, pairs):
    """The compiled JAX train step of one variant, and its state."""
    import jax
    import keras

    from kft.preference.model import PreferenceCausalLM
    from kft.sft.model import SFTCausalLM

    keras.config.set_dtype_policy("bfloat16")
    keras.utils.set_random_seed(0)
    lm = build_lm(config, "kft_lora")
    options = VARIANTS[variant]
    model = (SFTCausalLM(lm) if options is None
             else PreferenceCausalLM(lm, **options))
    model.compile(optimizer=keras.optimizers.AdamW(2e-4))
    data = tuple(_data(variant, config, seq, pairs))
    # What `fit` does before its first step: builds the optimizer, the
    # loss and the metrics (their variables are part of the state).
    model._symbolic_build(data_batch=data)
    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))
    return jax.jit(model.train_step).lower(state, data).compile()


def measure(compiled):
    """`{metric: value}` of a compiled step (see `METRICS`)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per module
        cost = cost[0]
    memory = compiled.memory_analysis()
    temp = int(memory.temp_size_in_bytes)
    return {"flops": float(cost["flops"]),
            "bytes_accessed": float(cost["bytes accessed"]),
            "temp_bytes": temp,
            "peak_bytes": temp + int(memory.argument_size_in_bytes)}


def table(results):
    """Rows per metric: each variant, then each variant / `sft_lora`."""
    names = list(results)
    others = [n for n in names if n != "sft_lora" and "sft_lora" in results]
    width = max(len(n) for n in names) + 8
    header = f"{'':<16}" + "".join(f"{n:>{width}}" for n in names) + "".join(
        f"{n + '/sft':>{width}}" for n in others)
    lines = [header, "-" * len(header)]
    for metric in METRICS:
        scale, unit = (1e12, "T") if metric == "flops" else (1e9, "GB")
        row = f"{metric:<16}" + "".join(
            f"{results[n][metric] / scale:>{width - 3}.4f} {unit:<2}"
            for n in names)
        row += "".join(f"{results[n][metric] / results['sft_lora'][metric]:>{width}.3f}"
                       for n in others)
        lines.append(row)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=SMOLLM2["num_layers"])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {list(VARIANTS)}")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    import_kft_first()
    import keras

    config = dict(SMOLLM2, num_layers=args.layers)
    print(f"shape: {args.layers} layers, sequence {args.seq}, {args.pairs} "
          f"pairs ({2 * args.pairs} sequences), bfloat16, LoRA rank 8 "
          "all-linear", flush=True)
    results = {}
    for name in variants:
        start = time.perf_counter()
        compiled = compiled_step(name, config, args.seq, args.pairs)
        results[name] = measure(compiled)
        print(f"{name}: compiled in {time.perf_counter() - start:.0f} s: "
              f"{results[name]}", flush=True)
        del compiled
        keras.backend.clear_session()
        gc.collect()
    print(table(results))


if __name__ == "__main__":
    main()
