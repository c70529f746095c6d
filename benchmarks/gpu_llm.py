"""GPU step times of causal-LM fine-tuning on the JAX backend: full, LoRA, QLoRA.

What it measures: a SmolLM2-135M-shaped keras-hub `Llama3Backbone` built
from its config with random weights (vocabulary 49152, hidden 576, 30
layers, 9 query / 3 key-value heads, intermediate 1536, tied embeddings:
what `kft.build_causal_lm("smollm2")` loads), trained through
`kft.sft.SFTCausalLM` (its default loss: sparse cross-entropy on the
logits, averaged over the weighted tokens) on random token ids,
sequence 512, batch 8, every token real and weighted. Methods:

- `full`: every weight trains (Adam 2e-5);
- `lora`: kft LoRA, all-linear (q, k, v, o, gate, up, down), rank 8,
  alpha 16 (Adam 2e-4);
- `qlora_int8`, `qlora_int4`: `lora` on a base quantized as
  `build_causal_lm(quantize=...)` does (`kft.causal_lm._quantize`:
  weight-only int8; int4 in 128-wide groups with an int8 embedding);
- `enable_lora`: keras-hub's `backbone.enable_lora(8,
  target_layer_names=[the same seven projections])`;
- diagnostics (`--methods` names them; not run by default): `keras_lora`,
  Keras' own `layer.enable_lora(8, lora_alpha=16)` on the same layers
  (its EinsumDense factors differ: 3.9M trainable, not 2.4M), and
  `frozen`, the base frozen with no adapter and only the final norm
  training, so no gradient enters the transformer layers: about the cost
  of the forward pass and the loss,

each under the dtype policies `float32` and `bfloat16`
(`keras.config.set_dtype_policy`; bfloat16 means bfloat16 weights too).
Per run: the median step time after warm-up (steps timed by a callback,
which waits for each step's loss), tokens/s, the first step (tracing and
XLA compilation), trainable parameters, bytes of variables and the
device's peak memory (`jax.Device.memory_stats()`, the process's own
allocator: JAX is told not to preallocate); then the LoRA / full step
ratio per dtype.

Each run is a process of its own (its own peak memory). Up to
`--parallel` of them build and compile at once; their timed steps run one
at a time, while no other run compiles (two locks), so compilation never
overlaps a timed step, though compile times grow with the overlap. A run
that fails reports its error; the others go on. kft's modules are
imported before Keras, so that they load without TensorFlow.

    KERAS_BACKEND=jax python benchmarks/gpu_llm.py [--out gpu_llm.json]
        [--methods full,lora,qlora_int8,qlora_int4,enable_lora]
        [--dtypes bfloat16,float32]
        [--steps 10] [--budget 330] [--parallel 4] [--tiny]

`--tiny` (2 layers, hidden 64, sequence 32, batch 2) checks the script on
a CPU in a minute. `--budget` is the wall time after which no run starts
and running ones are stopped.
"""

import argparse
import fcntl
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
from _llm import ALPHA
from _llm import RANK
from _llm import SMOLLM2
from _llm import TINY
from _llm import batches
from _llm import build_lm
from _llm import import_kft_first

METHODS = {
    "full": {"adapter": "full", "quantize": None, "lr": 2e-5},
    "lora": {"adapter": "kft_lora", "quantize": None, "lr": 2e-4},
    "qlora_int8": {"adapter": "kft_lora", "quantize": "int8", "lr": 2e-4},
    "qlora_int4": {"adapter": "kft_lora", "quantize": "int4", "lr": 2e-4},
    # keras-hub's `backbone.enable_lora(8, target_layer_names=...)` on the
    # same seven projections: issue 24's "LoRA <= 0.9x enable_lora".
    "enable_lora": {"adapter": "keras_hub_lora", "quantize": None, "lr": 2e-4},
    # Diagnostics, not run by default: where LoRA's time goes ("frozen":
    # the forward pass and loss, about; see the module docstring).
    "keras_lora": {"adapter": "keras_lora", "quantize": None, "lr": 2e-4},
    "frozen": {"adapter": "frozen", "quantize": None, "lr": 2e-4},
}
DEFAULT_METHODS = ("full", "lora", "qlora_int8", "qlora_int4", "enable_lora")
DTYPES = ("bfloat16", "float32")
DISCARDED = 2  # first steps of the timed fit, left out of the median
_START = time.perf_counter()
# Wall-clock start of the main process, which workers inherit for their logs.
_T0 = float(os.environ.setdefault("GPU_LLM_T0", str(time.time())))


def log(message, name="main"):
    print(f"[{time.time() - _T0:6.1f}s {name}] {message}", flush=True)


# === One run (a worker process) ===


class _Lock:
    """`fcntl.flock` on a file: `"shared"` or `"exclusive"`."""

    def __init__(self, path, mode):
        self.path, self.mode = path, mode

    def __enter__(self):
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in __exit__
        fcntl.flock(self.file, fcntl.LOCK_SH if self.mode == "shared"
                    else fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def memory(device):
    stats = device.memory_stats() or {}
    return {key: stats.get(key) for key in (
        "bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def build(method, config):
    """The model to train (`kft.sft.SFTCausalLM`), compiled."""
    import keras

    from kft.sft.model import SFTCausalLM

    spec = METHODS[method]
    lm = build_lm(config, spec["adapter"], quantize=spec["quantize"])
    model = SFTCausalLM(lm)
    model.compile(optimizer=keras.optimizers.Adam(spec["lr"]))
    return model


def run_one(name, args, locks):
    """Builds, compiles (shared lock), then times (exclusive) one run."""
    compile_lock, timing_lock = locks
    method, dtype = name.rsplit("-", 1)
    config = TINY if args.tiny else SMOLLM2
    result = {"run": name, "method": method, "dtype": dtype,
              "sequence_length": args.sequence_length,
              "batch_size": args.batch_size}
    with _Lock(compile_lock, "shared"):
        import jax
        import keras
        from _timing import StepTimer

        device = jax.local_devices()[0]
        result["device"] = f"{device.platform}: {device.device_kind}"
        keras.config.set_dtype_policy(dtype)
        keras.utils.set_random_seed(0)
        start = time.perf_counter()
        model = build(method, config)
        result["build_s"] = time.perf_counter() - start
        result["trainable_params"] = int(sum(
            np.prod(v.shape) for v in model.trainable_variables))
        result["variable_bytes"] = int(sum(v.value.nbytes for v in model.weights))
        result["memory_after_build"] = memory(device)
        shape = (args.batch_size, args.sequence_length, config["vocabulary_size"])
        x, y, w = batches(args.warmup, *shape, seed=0)
        log(f"built in {result['build_s']:.1f} s, "
            f"{result['trainable_params']:,} trainable; compiling", name)
        timer = StepTimer()
        model.fit(x, y, sample_weight=w, batch_size=args.batch_size, epochs=1,
                  shuffle=False, verbose=0, callbacks=[timer])
        result["first_step_s"] = timer.times[0]
        result["warmup_step_s"] = timer.times[1:]
        log(f"first step (compile) {timer.times[0]:.1f} s; waiting to time", name)
    x, y, w = batches(DISCARDED + args.steps, *shape, seed=1)
    with _Lock(timing_lock, "exclusive"), _Lock(compile_lock, "exclusive"):
        timer = StepTimer()
        start = time.perf_counter()
        history = model.fit(x, y, sample_weight=w, batch_size=args.batch_size,
                            epochs=1, shuffle=False, verbose=0, callbacks=[timer])
        result["timed_fit_s"] = time.perf_counter() - start
    timed = timer.times[DISCARDED:]
    result["step_times"] = timer.times
    result["step_s"] = statistics.median(timed)
    result["min_step_s"] = min(timed)
    result["tokens_per_s"] = args.batch_size * args.sequence_length / result["step_s"]
    result["loss_last"] = float(history.history["loss"][-1])
    result["memory"] = memory(device)
    log(f"step {result['step_s'] * 1e3:.1f} ms (min {result['min_step_s'] * 1e3:.1f}), "
        f"{result['tokens_per_s']:,.0f} tokens/s, "
        f"peak {_gib(result['memory']['peak_bytes_in_use'])}", name)
    return result


def worker(args):
    import_kft_first()
    try:
        result = run_one(args.worker, args, args.locks.split(","))
        result["ok"] = True
    except Exception as error:  # report and let the other runs go on
        log(f"FAILED: {type(error).__name__}: {error}", args.worker)
        traceback.print_exc()
        method, dtype = args.worker.rsplit("-", 1)
        result = {"run": args.worker, "method": method, "dtype": dtype,
                  "ok": False, "error": f"{type(error).__name__}: {error}"[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
    with open(args.result, "w") as f:
        json.dump(result, f, indent=1)


# === Orchestration ===


def _gib(value):
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def environment():
    found = {"python": sys.version.split()[0],
             "XLA_PYTHON_CLIENT_PREALLOCATE":
                 os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")}
    for name in ("jax", "jaxlib", "keras", "keras_hub", "numpy"):
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception as error:  # noqa: BLE001 - reported, not raised
            found[name] = f"missing ({type(error).__name__})"
    try:
        import jax

        found["devices"] = [f"{d.platform}: {d.device_kind}" for d in jax.devices()]
        found["jax_default_matmul_precision"] = str(
            jax.config.jax_default_matmul_precision)
    except Exception as error:  # noqa: BLE001
        found["devices"] = f"error: {error}"
    return found


def summary(results):
    """Per dtype: each method's step / full's step and / lora's step."""
    rows = {}
    for dtype in DTYPES:
        ok = {r["method"]: r for r in results.values()
              if r.get("ok") and r["dtype"] == dtype}
        for method, r in ok.items():
            for base in ("full", "lora") if method != "full" else ():
                if base in ok and base != method:
                    rows[f"{method}/{base} step ({dtype})"] = (
                        r["step_s"] / ok[base]["step_s"])
    for method in METHODS:
        pair = [results.get(f"{method}-{d}") for d in DTYPES]
        if all(p and p.get("ok") for p in pair):
            rows[f"{method} bfloat16/float32 step"] = (
                pair[0]["step_s"] / pair[1]["step_s"])
    return rows


def table(results):
    header = (f"{'run':<22}{'step ms':>9}{'min ms':>9}{'tokens/s':>11}"
              f"{'1st step s':>11}{'peak GiB':>10}{'var MiB':>9}{'trainable':>13}")
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        if not r.get("ok"):
            lines.append(f"{name:<22}FAILED: {r.get('error', '?')[:150]}")
            continue
        peak = r["memory"].get("peak_bytes_in_use")
        lines.append(
            f"{name:<22}{r['step_s'] * 1e3:>9.1f}{r['min_step_s'] * 1e3:>9.1f}"
            f"{r['tokens_per_s']:>11,.0f}{r['first_step_s']:>11.1f}"
            f"{(peak or 0) / 2**30:>10.2f}{r['variable_bytes'] / 2**20:>9.1f}"
            f"{r['trainable_params']:>13,}")
    lines.append("")
    for label, value in summary(results).items():
        lines.append(f"{label:<36}{value:>8.3f}")
    return "\n".join(lines)


def save(args, results, env):
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"environment": env, "settings": {
                "model": "tiny" if args.tiny else "smollm2-135m",
                "config": TINY if args.tiny else SMOLLM2,
                "sequence_length": args.sequence_length,
                "batch_size": args.batch_size, "warmup": args.warmup,
                "discarded": DISCARDED, "steps": args.steps,
                "parallel": args.parallel, "rank": RANK, "alpha": ALPHA},
                "results": results, "summary": summary(results)}, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
            f.write(table(results) + "\n")


def orchestrate(args, runs):
    env = environment()
    log(f"environment: {json.dumps(env)}")
    results, running = {}, {}
    deadline = _START + args.budget
    with tempfile.TemporaryDirectory() as directory:
        locks = ",".join(os.path.join(directory, f"{n}.lock")
                         for n in ("compile", "timing"))
        pending = list(runs)
        while pending or running:
            while pending and len(running) < args.parallel \
                    and time.perf_counter() < deadline:
                name = pending.pop(0)
                out = os.path.join(directory, f"{name}.json")
                command = [sys.executable, os.path.abspath(__file__), "--worker",
                           name, "--result", out, "--locks", locks,
                           *_forwarded(args)]
                running[name] = (subprocess.Popen(command), out)
                log(f"started {name}")
            for name, (process, out) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                if os.path.exists(out):
                    with open(out) as f:
                        results[name] = json.load(f)
                else:
                    results[name] = {"run": name, "ok": False,
                                     "method": name.rsplit("-", 1)[0],
                                     "dtype": name.rsplit("-", 1)[1],
                                     "error": f"worker exit {process.returncode}"}
                save(args, results, env)
            if time.perf_counter() >= deadline:
                for name, (process, _) in running.items():
                    process.kill()
                    results[name] = {"run": name, "ok": False,
                                     "method": name.rsplit("-", 1)[0],
                                     "dtype": name.rsplit("-", 1)[1],
                                     "error": f"stopped at --budget {args.budget} s"}
                for name in pending:
                    results[name] = {"run": name, "ok": False,
                                     "method": name.rsplit("-", 1)[0],
                                     "dtype": name.rsplit("-", 1)[1],
                                     "error": "not started: --budget spent"}
                running, pending = {}, []
                save(args, results, env)
            time.sleep(0.2)
    results = {name: results[name] for name in runs if name in results}
    save(args, results, env)
    log("done")
    print(table(results), flush=True)
    return results


def _forwarded(args):
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup),
             "--sequence-length", str(args.sequence_length),
             "--batch-size", str(args.batch_size)]
    return flags + (["--tiny"] if args.tiny else [])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--steps", type=int, default=10,
                        help=f"timed steps (after {DISCARDED} discarded)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="steps of the compiling fit (>= 2)")
    parser.add_argument("--sequence-length", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--budget", type=float, default=330.0)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", help="results JSON (and a .txt table beside it)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--locks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sequence_length is None:
        args.sequence_length = 32 if args.tiny else 512
    if args.batch_size is None:
        args.batch_size = 2 if args.tiny else 8
    if args.warmup < 2 or args.steps < 1:
        parser.error("--warmup must be >= 2 and --steps >= 1")
    # Peak memory per process, from JAX's allocator, without the 75%
    # preallocation.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.worker:
        return worker(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = sorted(set(methods) - set(METHODS)) + sorted(set(dtypes) - set(DTYPES))
    if unknown:
        parser.error(f"unknown {unknown}; methods {list(METHODS)}, "
                     f"dtypes {list(DTYPES)}")
    # LoRA and full of one dtype first: the ratio the budget must keep.
    runs = [f"{m}-{d}" for d in dtypes for m in methods if m in ("lora", "full")]
    runs += [f"{m}-{d}" for d in dtypes for m in methods if m not in ("lora", "full")]
    orchestrate(args, runs)


if __name__ == "__main__":
    main()
