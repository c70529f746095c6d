"""What a LoRA train step costs, counted by XLA: kft LoRA, full, `enable_lora`.

Deterministic, machine-independent figures for issue 24: the JAX train
step of a causal LM is compiled on the CPU (`jax.jit(model.train_step)
.lower(state, batch).compile()`, no step is run) and XLA's own analysis
of the compiled module is read: flops and bytes accessed
(`cost_analysis()`), temporary memory (`memory_analysis()`), the arrays
of state the step takes (trainable, non-trainable, optimizer and metric
variables) and the matmuls (`dot` instructions, and oneDNN matmul custom
calls) in the optimised HLO text.

The model: a keras-hub `Llama3Backbone` of SmolLM2-135M's shape
(vocabulary 49152, 30 layers, hidden 576, intermediate 1536, 9 query / 3
key-value heads, tied embeddings; `_llm.SMOLLM2`) with random weights,
under `keras.config.set_dtype_policy("bfloat16")`, trained through
`kft.sft.SFTCausalLM` (AdamW, its default loss: sparse cross-entropy from
the logits over the weighted tokens) on sequence 512, batch 8. Variants:

- `full`: every weight trains;
- `kft_lora`: `kft.lora.apply_lora(lm, "all-linear", rank=8, alpha=16)`
  (q, k, v, o, gate, up, down);
- `enable_lora`: keras-hub's `backbone.enable_lora(8,
  target_layer_names=[the same seven projections])`;
- `floor`: no adapter; only the first block's input norm trains, so the
  gradient runs back through every layer and no weight gets a gradient
  of its size: the least a step with adapters in every layer can do.

    python benchmarks/lora_cost.py [--layers 30] [--seq 512] [--batch 8]
        [--variants full,kft_lora,enable_lora,floor] [--remat]

`--remat` compiles each variant a second time with its transformer blocks
rematerialised (`kft.remat.set_remat`, `build_causal_lm(remat=True)`)
and adds the ratio with / without remat per variant; issue 24's remat
case is `--seq 4096 --batch 1 --remat`.

`--layers 2 --seq 64 --batch 2` checks the script in half a minute; the
default shape compiles in about 20 s per variant on two CPU cores (the
three in a minute, at a peak of 2.8 GB resident).

Measured (default shape; keras 3.15.1, keras-hub 0.32.0, jax 0.10.2, XLA
CPU; the same on any machine). Before issue 24 (kft at 64336e3):

                        full     kft_lora  enable_lora  kft/full  kft/enable_lora
    flops (T)         3.7810       2.7366       3.5429     0.724            0.772
    bytes accessed (GB) 128.74     136.47       117.84     1.060            1.158
    temporary (GB)   16.3456      16.5986      16.1889     1.015            1.025
    state arrays         822        1,958        1,538     2.382            1.273
    matmuls              813        1,856        1,439     2.283            1.290

Adapters in the compute dtype (float32 masters cast for the step, the
scale and the on / off flag folded into `B`, no dropout state at dropout
0): kft_lora only changes (full and enable_lora as above):

                        full     kft_lora  enable_lora  kft/full  kft/enable_lora
    flops (T)         3.7810       2.7341       3.5429     0.723            0.772
    bytes accessed (GB) 128.74     128.51       117.84     0.998            1.091
    temporary (GB)   16.3456      16.5986      16.1889     1.015            1.025
    state arrays         822        1,748        1,538     2.127            1.137
    matmuls              813        1,856        1,439     2.283            1.290

Then the loss (`kft.losses.causal_lm.CausalLMLoss`, `SFTCausalLM`'s default: the
log-sum-exp a 128-position chunk at a time in float32, a custom gradient
in the logits' dtype; token accuracy off in training steps), which every
variant here trains with:

                        full     kft_lora  enable_lora  kft/full  kft/enable_lora
    flops (T)         3.7791       2.7321       3.5409     0.723            0.772
    bytes accessed (GB) 124.71     125.69       115.02     1.008            1.093
    temporary (GB)   15.9335      14.9880      14.5783     0.941            1.028
    state arrays         822        1,748        1,538     2.127            1.137
    matmuls              813        1,856        1,439     2.283            1.290

Then adapters that read one input computed together (`kft.lora.shared`:
q / k / v and gate / up, `x @ concat(A)` as one matmul, the `B` side of
members of one shape as one batched matmul, the member axis leading):

                        full     kft_lora  enable_lora  kft/full  kft/enable_lora
    flops (T)         3.7791       2.7342       3.5409     0.724            0.772
    bytes accessed (GB) 124.71     125.79       115.02     1.009            1.094
    temporary (GB)   15.9335      14.9925      14.5783     0.941            1.028
    state arrays         822        1,748        1,538     2.127            1.137
    matmuls              813        1,408        1,439     1.732            0.978

Then no per-layer `lora_active` variable (merge and `disable_adapters`
park the adapter instead), and training calls through `kft.lora.fused`
(`x @ (W + A B)` in one matmul with a custom gradient; groups share `x @
concat(A)`), with `floor`: the model frozen except the first block's
input norm, the least any adapter in every layer can move:

                              full          kft_lora       enable_lora             floor          kft/full   kft/enable_lora        floor/full floor/enable_lora
    flops                 3.7791 T          2.7077 T          3.5409 T          2.6694 T             0.716             0.765             0.706             0.754
    bytes_accessed     124.7097 GB       109.4942 GB       115.0172 GB       100.2612 GB             0.878             0.952             0.804             0.872
    temp_bytes          15.9335 GB        14.6105 GB        14.5783 GB        14.1625 GB             0.917             1.002             0.889             0.971
    state_arrays               822             1,538             1,538               280             1.871             1.000             0.341             0.182
    matmuls                    813             1,409             1,439               602             1.733             0.979             0.740             0.418

Issue 24's six ratios (goal; before -> now):

    flops, kft / full                  (keep)     0.724 -> 0.716
    bytes accessed, kft / full         <= 0.80    1.060 -> 0.878 (floor 0.804)
    bytes accessed, kft / enable_lora  <= 0.85    1.158 -> 0.952 (floor 0.872)
    temporary memory, kft / full       <= 0.95    1.015 -> 0.917
    state arrays, kft / enable_lora    <= 1.0     1.273 -> 1.000
    matmuls, kft / enable_lora         <= 1.0     1.290 -> 0.979

The bytes goals lie below `floor`, so no LoRA reaches them at this shape.

Rematerialisation (`--seq 4096 --batch 1 --remat --variants full,kft_lora`,
30 layers; about 4 minutes): each transformer block keeps only its input
for the backward pass and runs its forward pass again there. At this
length the attention scores (9 heads x 4096 x 4096 per layer, softmax in
float32: about 14 bytes a score kept for the backward pass) are most of
the memory; remat keeps one layer's at a time:

                              full        full+remat          kft_lora    kft_lora+remat     full remat/no      kft remat/no
    flops                 6.9297 T          8.7856 T          5.8582 T          7.7164 T             1.268             1.317
    bytes_accessed     519.7968 GB       677.9760 GB       502.9766 GB       662.6813 GB             1.304             1.318
    temp_bytes          63.4973 GB         3.2095 GB        62.5774 GB         2.9789 GB             0.051             0.048
    matmuls                    813             1,053             1,409             1,799             1.295             1.277

Issue 24's goal, temporary memory with remat / without at sequence 4096,
batch 1 <= 0.5: 0.051 (full), 0.048 (kft LoRA), for 1.27x / 1.32x the
flops. (Compiled without the flag this script sets, XLA:CPU's CSE merges
the recomputation back into the forward pass: 1.27x the flops and the
same 63.5 GB; XLA:GPU removes the barriers after scheduling.)
"""

import argparse
import gc
import os
import re
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"
# XLA:CPU removes `jax.checkpoint`'s optimization barriers before a CSE
# pass, which merges the recomputation back into the forward pass (remat
# then saves nothing); XLA:GPU removes them only after scheduling. Keep
# them, as the GPU does. No effect on a step without remat (same numbers).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                           "--xla_disable_hlo_passes=cse_barrier_expander").strip()
# `_llm` beside this file, and the kft of this checkout (not an installed one).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

from _llm import SMOLLM2  # noqa: E402
from _llm import batches  # noqa: E402
from _llm import build_lm  # noqa: E402
from _llm import import_kft_first  # noqa: E402

# Variant name -> `_llm.build_lm` adapter.
VARIANTS = {"full": "full", "kft_lora": "kft_lora",
            "enable_lora": "keras_hub_lora", "floor": "backward_floor"}
# Not run by default: kft LoRA with its training calls in the separate
# form (`x @ W + x @ A @ B` by autodiff), to show what `kft.lora.fused` does.
EXTRA_VARIANTS = {"kft_lora_unfused": "kft_lora"}
KNOWN = {**VARIANTS, **EXTRA_VARIANTS}
METRICS = ("flops", "bytes_accessed", "temp_bytes", "state_arrays", "matmuls")
# A matmul in optimised HLO: a `dot`, or (XLA:CPU with oneDNN) a custom
# call to a oneDNN matmul.
_MATMUL = re.compile(r"\sdot\(|custom_call_target=\"[^\"]*matmul[^\"]*\"")


def compiled_step(adapter, config, sequence_length, batch_size, remat=False,
                  fused=True, quantize=None):
    """The compiled JAX train step of one variant, and its state."""
    import jax
    import keras

    from kft.lora.dense import LoRADense
    from kft.lora.dense import LoRAEinsumDense
    from kft.sft.model import SFTCausalLM

    for cls in (LoRADense, LoRAEinsumDense):
        cls._fusable = fused

    keras.config.set_dtype_policy("bfloat16")
    keras.utils.set_random_seed(0)
    model = SFTCausalLM(build_lm(config, adapter, quantize=quantize, remat=remat))
    model.compile(optimizer=keras.optimizers.AdamW(2e-4))
    data = tuple(batches(1, batch_size, sequence_length,
                         config["vocabulary_size"], seed=0))
    # What `fit` does before its first step: builds the optimizer, the
    # loss and the metrics (their variables are part of the state).
    model._symbolic_build(data_batch=data)
    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))
    compiled = jax.jit(model.train_step).lower(state, data).compile()
    return compiled, state


def measure(compiled, state):
    """`{metric: value}` of a compiled step (see `METRICS`)."""
    import jax

    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per module
        cost = cost[0]
    return {
        "flops": float(cost["flops"]),
        "bytes_accessed": float(cost["bytes accessed"]),
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
        "state_arrays": len(jax.tree_util.tree_leaves(state)),
        "matmuls": len(_MATMUL.findall(compiled.as_text())),
    }


def _value(metric, value):
    if metric == "flops":
        return f"{value / 1e12:.4f} T"
    if metric in ("bytes_accessed", "temp_bytes"):
        return f"{value / 1e9:.4f} GB"
    return f"{value:,}"


def _ratios(results):
    """`(numerator, denominator)` pairs of the table: kft/full,
    kft/enable_lora, and each variant with remat / without."""
    pairs = [("kft_lora", "full"), ("kft_lora", "enable_lora"),
             ("kft_lora", "kft_lora_unfused"),
             ("floor", "full"), ("floor", "enable_lora")]
    pairs += [(f"{name}+remat", name) for name in VARIANTS]
    return [(a, b) for a, b in pairs if a in results and b in results]


def _ratio_label(a, b):
    if a == f"{b}+remat":
        return f"{b.split('_')[0]} remat/no"
    return f"{a.split('_')[0]}/{b}"


def table(results):
    """Rows per metric: each variant, then the ratios of `_ratios`."""
    names = list(results)
    ratios = _ratios(results)
    header = f"{'':<16}" + "".join(f"{n:>18}" for n in names) + "".join(
        f"{_ratio_label(a, b):>18}" for a, b in ratios)
    lines = [header, "-" * len(header)]
    for metric in METRICS:
        row = f"{metric:<16}" + "".join(
            f"{_value(metric, results[n][metric]):>18}" for n in names)
        row += "".join(f"{results[a][metric] / results[b][metric]:>18.3f}"
                       for a, b in ratios)
        lines.append(row)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=SMOLLM2["num_layers"])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {list(KNOWN)}")
    parser.add_argument("--quantize", choices=("int8", "int4"),
                        help="the base quantized first (QLoRA; for kft_lora "
                        "and kft_lora_unfused)")
    parser.add_argument("--remat", action="store_true",
                        help="also each variant with its transformer blocks "
                        "rematerialised (kft.remat.set_remat)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(KNOWN))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(KNOWN)}")
    import_kft_first()
    import keras

    config = dict(SMOLLM2, num_layers=args.layers)
    print(f"shape: {args.layers} layers, sequence {args.seq}, batch "
          f"{args.batch}, bfloat16", flush=True)
    results = {}
    runs = [(name, remat) for name in variants
            for remat in ((False, True) if args.remat else (False,))]
    for name, remat in runs:
        label = f"{name}+remat" if remat else name
        start = time.perf_counter()
        compiled, state = compiled_step(
            KNOWN[name], config, args.seq, args.batch, remat=remat,
            fused=not name.endswith("_unfused"), quantize=args.quantize)
        results[label] = measure(compiled, state)
        print(f"{label}: compiled in {time.perf_counter() - start:.0f} s: "
              f"{results[label]}", flush=True)
        del compiled, state
        keras.backend.clear_session()
        gc.collect()
    print(table(results))


if __name__ == "__main__":
    main()
