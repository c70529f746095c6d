"""`kft.plan_memory` against XLA's memory analysis of the compiled step.

For each case, the JAX train step of a keras-hub `Llama3Backbone` trained
through `kft.sft.SFTCausalLM` (AdamW, kft's causal-LM loss) is compiled on
the CPU as Keras' JAX trainer compiles it (`jax.jit(train_step,
donate_argnums=0)`: the state is donated, so the step's outputs reuse its
arguments), and XLA's `memory_analysis()` is read: argument bytes (the
state and the batch) plus temporary bytes is what the device must hold.
`kft.plan_memory` predicts the same from the model's shape alone.

The check is in float32, where the CPU keeps the buffers a GPU keeps; in
bfloat16 XLA:CPU computes every matmul in float32 (it converts the bf16
operands and keeps float32 results), which a GPU does not, so the bf16
rows (`--dtype bfloat16`) show what the CPU does, not the plan's error.
The `TINY` shape and SmolLM2-135M's shape with 2 and 4 layers:

    python benchmarks/memory_plan.py [--dtype float32] [--cases all|quick]

`--cases quick` compiles the three fastest cases (about 30 s).

Measured (float32; keras 3.15.1, keras-hub 0.32.0, jax 0.10.2, XLA CPU;
the same on any machine):

    shape      method         seq batch  remat   XLA (MB)  plan (MB)  plan/XLA
    tiny       full           256     4     no       44.5       42.7     0.959
    tiny       lora           256     4     no       40.3       41.8     1.037
    smollm2-2  full           512     1     no      966.1      968.9     1.003
    smollm2-2  lora           512     4     no     1404.5     1414.4     1.007
    smollm2-2  qlora int8     512     1     no      486.4      472.8     0.972
    smollm2-2  full          2048     1     no     2501.1     2601.6     1.040
    smollm2-2  lora          2048     1    yes      963.8      958.3     0.994
    smollm2-4  full          2048     1     no     3722.1     3831.6     1.029
    smollm2-4  full          2048     1    yes     1476.9     1560.4     1.056
    smollm2-4  qlora int4    1024     2     no     2325.6     2353.3     1.012

Within 6% everywhere (the issue asks 15%; LoRA rows re-measured after
`kft.lora.fused` and the parked on / off switch). The plan's few coefficients
(bytes per token and block, per attention score, per logit) were read off
22 float32 compilations, most of these shapes among them; the QLoRA int4
row at 1024 x 2 is a shape they were not read from. On the 32-wide test
fixture (`tests/llm_fixtures`, 8-wide heads) the plan is 7-23% over XLA:
its attention scores take fewer bytes each than the fitted 12.

`--dtype bfloat16` (the plan for a GPU; XLA:CPU's float32 matmuls make
the CPU's step as large as in float32: 2,580 MB against 2,501 MB for the
2-layer full step at 2048), plan/XLA: tiny 0.77 / 0.82; smollm2-2 0.58
(full 512), 0.68 (lora 512x4), 0.66 (qlora int8), 0.64 (full 2048), 0.45
(lora remat 2048); smollm2-4 0.70 (full 2048), 0.55 (remat), 0.77 (qlora
int4). Checking the bfloat16 plan needs a GPU's measured peak (none was
lent for this work).
"""

import argparse
import gc
import os
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"
# Keep `jax.checkpoint`'s optimization barriers, as XLA:GPU does (see
# lora_cost.py): otherwise XLA:CPU undoes remat.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                           "--xla_disable_hlo_passes=cse_barrier_expander").strip()
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

from _llm import SMOLLM2  # noqa: E402
from _llm import TINY  # noqa: E402
from _llm import batches  # noqa: E402
from _llm import build_lm  # noqa: E402
from _llm import import_kft_first  # noqa: E402

# (name, shape, method, quantize, sequence, batch, remat)
CASES = [
    ("tiny", TINY, "full", None, 256, 4, False),
    ("tiny", TINY, "lora", None, 256, 4, False),
    ("smollm2-2", dict(SMOLLM2, num_layers=2), "full", None, 512, 1, False),
    ("smollm2-2", dict(SMOLLM2, num_layers=2), "lora", None, 512, 4, False),
    ("smollm2-2", dict(SMOLLM2, num_layers=2), "qlora", "int8", 512, 1, False),
    ("smollm2-2", dict(SMOLLM2, num_layers=2), "full", None, 2048, 1, False),
    ("smollm2-2", dict(SMOLLM2, num_layers=2), "lora", None, 2048, 1, True),
    ("smollm2-4", dict(SMOLLM2, num_layers=4), "full", None, 2048, 1, False),
    ("smollm2-4", dict(SMOLLM2, num_layers=4), "full", None, 2048, 1, True),
    ("smollm2-4", dict(SMOLLM2, num_layers=4), "qlora", "int4", 1024, 2, False),
]
QUICK = (0, 1, 2)


def compiled_memory(shape, method, quantize, sequence, batch, remat, dtype):
    """`(argument bytes, temporary bytes)` of the compiled train step."""
    import jax
    import keras

    from kft.sft.model import SFTCausalLM

    keras.config.set_dtype_policy(dtype)
    keras.utils.set_random_seed(0)
    adapter = "full" if method == "full" else "kft_lora"
    lm = build_lm(shape, adapter, quantize=quantize, remat=remat)
    model = SFTCausalLM(lm)
    model.compile(optimizer=keras.optimizers.AdamW(2e-4))
    data = tuple(batches(1, batch, sequence, shape["vocabulary_size"], seed=0))
    model._symbolic_build(data_batch=data)  # what fit does first
    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))
    step = jax.jit(model.train_step, donate_argnums=0)
    memory = step.lower(state, data).compile().memory_analysis()
    return memory.argument_size_in_bytes, memory.temp_size_in_bytes


def planned(shape, method, quantize, sequence, batch, remat, dtype):
    from kft.training.memory_plan import plan_memory

    return plan_memory(shape, method=method, quantize=quantize,
                       sequence_length=sequence, batch_size=batch,
                       dtype=dtype, remat=remat, attention="xla").peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cases", choices=("all", "quick"), default="all")
    args = parser.parse_args()
    import_kft_first()
    import keras

    cases = CASES if args.cases == "all" else [CASES[i] for i in QUICK]
    header = (f"{'shape':<11}{'method':<12}{'seq':>6}{'batch':>6}{'remat':>7}"
              f"{'XLA (MB)':>11}{'plan (MB)':>11}{'plan/XLA':>10}")
    lines = [header, "-" * len(header)]
    for name, shape, method, quantize, sequence, batch, remat in cases:
        start = time.perf_counter()
        arguments, temporary = compiled_memory(shape, method, quantize,
                                               sequence, batch, remat,
                                               args.dtype)
        xla = arguments + temporary
        plan = planned(shape, method, quantize, sequence, batch, remat,
                       args.dtype)
        label = f"{method} {quantize}" if quantize else method
        lines.append(f"{name:<11}{label:<12}{sequence:>6}{batch:>6}"
                     f"{'yes' if remat else 'no':>7}{xla / 1e6:>11.1f}"
                     f"{plan / 1e6:>11.1f}{plan / xla:>10.3f}")
        print(f"{lines[-1]}   ({time.perf_counter() - start:.0f} s)",
              flush=True)
        keras.backend.clear_session()
        gc.collect()
    print(f"\n{args.dtype}:\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
