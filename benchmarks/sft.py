"""SFT of SmolLM2-135M-Instruct on WordNet glosses: seven ways, one table.

The task is real supervised fine-tuning: "Define: <noun>\\n" -> its WordNet
gloss (Debian `wordnet-base`, `/usr/share/wordnet/data.noun`), 512 training
pairs and 64 held out, sequence 128, batch 8, the same steps for every
method. The model is a converted SmolLM2-135M-Instruct
(`~/.cache/kft/assets/smollm2_135m_instruct`, `kft.build_causal_lm`).

Methods (each in its own process, so peak RSS is its own):

- `lora`: kft LoRA, all-linear, rank 8, alpha 16, float32 base, packed rows;
- `enable_lora`: Keras' `layer.enable_lora(8, lora_alpha=16)` on the same
  layers, packed rows;
- `full`: full fine-tuning, packed rows;
- `qlora_int8`, `qlora_int4`: kft LoRA on the base quantized by
  `build_causal_lm(quantize=...)`, packed rows;
- `prompt`: kft prompt tuning, 20 virtual tokens (unpacked rows: prompt
  tuning refuses packing);
- `lora_unpacked`: `lora` on unpacked rows (real tokens/s vs packed);
- `lora_bf16`: `lora` on a bfloat16 base (step time vs float32);
- `peft_lora`: PyTorch + Hugging Face PEFT LoRA on the same checkpoint,
  the same token batches, layers, rank, rate and loss (`_peft_sft.py`,
  run with `--peft-python`: a separate venv; never a kft dependency).

Per method: held-out completion NLL (mean over the weighted tokens of the
64 held-out examples) before and after, median step time (steps after the
first two, which trace), real (non-padding) tokens/s, peak RSS, bytes of
model variables. Then the ratios against the goals. Timings on a shared
CPU are noisy; one run each.

    nice python benchmarks/sft.py [--methods lora,full] [--steps 12]
        [--results sft.json]

`--results` keeps each method's numbers in a JSON file, so a run in parts
(`--methods ...` several times) ends with the table of all of them;
`--methods "" --results sft.json` prints that table alone.
"""

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from _timing import StepTimer
from keras import ops

from kft.backbones.freezing import train_only
from kft.data.sft import sft_examples
from kft.data.text import load_wordnet_glosses
from kft.lora.model import LORA_TARGET_PRESETS
from kft.lora.model import apply_lora
from kft.models.causal_lm import build_causal_lm
from kft.prompt.causal_lm import prompt_tune_causal_lm
from kft.sft.model import SFTCausalLM

MODEL = os.path.expanduser("~/.cache/kft/assets/smollm2_135m_instruct")
WORDNET = "/usr/share/wordnet/data.noun"
SEQUENCE_LENGTH, BATCH_SIZE, TRAIN, HELDOUT = 128, 8, 512, 64
RANK, ALPHA, VIRTUAL_TOKENS = 8, 16, 20
TRACED = 2  # first steps, left out of the step time: tracing, warm-up
INIT_TEXT = "Write the dictionary definition of the word above."

# Method -> how it loads, adapts and trains. lr: visible NLL drop in 12 steps.
METHODS = {
    "lora": {"adapter": "kft_lora", "lr": 2e-4, "packing": True},
    "enable_lora": {"adapter": "keras_lora", "lr": 2e-4, "packing": True},
    "full": {"adapter": "full", "lr": 2e-5, "packing": True},
    "qlora_int8": {"adapter": "kft_lora", "lr": 2e-4, "packing": True,
                   "quantize": "int8"},
    "qlora_int4": {"adapter": "kft_lora", "lr": 2e-4, "packing": True,
                   "quantize": "int4"},
    "prompt": {"adapter": "prompt", "lr": 3e-2, "packing": False},
    "lora_unpacked": {"adapter": "kft_lora", "lr": 2e-4, "packing": False},
    "lora_bf16": {"adapter": "kft_lora", "lr": 2e-4, "packing": True,
                  "dtype": "bfloat16"},
    # PyTorch + PEFT on the same batches (`_peft_sft.py`, `--peft-python`).
    "peft_lora": {"adapter": "peft", "lr": 2e-4, "packing": True},
}
PEFT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "_peft_sft.py")
_START = time.perf_counter()


def log(message):
    print(f"[{time.perf_counter() - _START:6.0f}s] {message}", flush=True)


# === Data ===


def wordnet_pairs(path=WORDNET, n=TRAIN + HELDOUT, seed=0):
    """`n` (prompt, completion) records drawn from WordNet's noun glosses
    (`kft.data.load_wordnet_glosses`), each gloss cut at its first ';'."""
    records = [{"prompt": r["prompt"],
                "completion": r["completion"].split(";", 1)[0].strip()}
               for r in load_wordnet_glosses(path)]
    records = [r for r in records if r["completion"]]
    order = np.random.default_rng(seed).permutation(len(records))[:n]
    return [records[i] for i in order]


def arrays(records, lm, packing):
    (x, y, w), stats = sft_examples(records, lm, sequence_length=SEQUENCE_LENGTH,
                                    packing=packing, shuffle=False)
    return (x, y, w), stats


def train_dataset(x, y, w):
    return (tf.data.Dataset.from_tensor_slices((x, y, w))
            .batch(BATCH_SIZE, drop_remainder=True).repeat())


def heldout_nll(model, x, y, w, batch_size=16):
    """Mean NLL over the weighted (completion) tokens of unpacked rows.

    Rows go in order of length, each batch cut to its longest row: causal
    attention makes the numbers those of full rows, for a fraction of the
    compute. Eager calls: nothing to trace.
    """
    lengths = x["padding_mask"].sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    total = count = 0.0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = int(lengths[rows].max())
        inputs = {k: v[rows, :width] for k, v in x.items()}
        logits = ops.cast(model(inputs, training=False), "float32")
        nll = ops.convert_to_numpy(ops.sparse_categorical_crossentropy(
            y[rows, :width], logits, from_logits=True))
        total += float((nll * w[rows, :width]).sum())
        count += float(w[rows, :width].sum())
    return total / count


# === Models ===


def load(spec):
    quantize = spec.get("quantize")
    collect = gc.collect
    if quantize:
        # Keras' quantize() runs gc.collect() for every float kernel it
        # drops: ~60 s for this model. Nothing here needs it then.
        gc.collect = lambda *args: 0
    try:
        return build_causal_lm(MODEL, sequence_length=SEQUENCE_LENGTH,
                               dtype=spec.get("dtype"), quantize=quantize)
    finally:
        gc.collect = collect


def target_layers(lm):
    """The Dense / EinsumDense layers kft's "all-linear" preset adapts."""
    names = set()
    for cls in type(lm.backbone).__mro__:
        for preset in LORA_TARGET_PRESETS.get(cls.__name__, {}).values():
            names.update(preset)
    return [layer for layer in lm.backbone._flatten_layers()
            if layer.name in names]


def adapt(lm, adapter):
    """The model to train, after freezing / adapting `lm` for `adapter`."""
    if adapter == "kft_lora":
        apply_lora(lm, targets="all-linear", rank=RANK, alpha=ALPHA)
    elif adapter == "keras_lora":
        layers = target_layers(lm)
        train_only(lm, layers)
        for layer in layers:
            layer.enable_lora(RANK, lora_alpha=ALPHA)
    elif adapter == "prompt":
        return prompt_tune_causal_lm(lm, VIRTUAL_TOKENS, init_text=INIT_TEXT)
    return SFTCausalLM(lm)


def variable_bytes(model):
    return int(sum(v.numpy().nbytes for v in model.weights))


# === One method ===


def real_tokens_per_step(padding_mask, steps):
    """Non-padding tokens in each of the first `steps` batches of
    `train_dataset` (full batches, repeated)."""
    usable = len(padding_mask) // BATCH_SIZE * BATCH_SIZE
    rows = np.arange(steps * BATCH_SIZE) % usable
    return padding_mask[rows].reshape(steps, -1).sum(axis=1)


def run_peft(name, spec, x, y, w, steps, peft_python):
    """The PEFT twin of `lora` on the same token batches, in `peft_python`
    (a virtual environment with torch, transformers, peft)."""
    if not peft_python:
        raise SystemExit("peft_lora needs --peft-python (or KFT_PEFT_PYTHON): "
                         "the Python of a venv with torch, transformers, peft")
    with tempfile.TemporaryDirectory() as directory:
        batches = os.path.join(directory, "batches.npz")
        np.savez(batches, token_ids=x["token_ids"], padding_mask=x["padding_mask"],
                 targets=y, weights=w)
        out = os.path.join(directory, "peft.json")
        subprocess.run([peft_python, PEFT_SCRIPT, MODEL, batches, out,
                        str(steps), str(spec["lr"])], check=True)
        with open(out) as f:
            peft = json.load(f)
    times = peft["step_times"]
    step = statistics.median(times[TRACED:])
    real_tokens = real_tokens_per_step(x["padding_mask"], steps)[TRACED:].mean()
    log(f"{name}: steps {[round(t, 2) for t in times]} s, losses "
        f"{[round(v, 3) for v in peft['losses']]}")
    nan = float("nan")  # held-out NLL: measured on the kft side only
    return {
        "method": name, "nll_before": nan, "nll_after": nan,
        "train_loss_last": peft["losses"][-1], "step_s": step,
        "first_step_s": times[0], "min_step_s": min(times[TRACED:]),
        "step_times": times, "tokens_per_s": float(real_tokens / step),
        "real_tokens_per_step": float(real_tokens),
        "peak_rss_mb": peft["peak_rss_mb"], "variable_bytes": peft["variable_bytes"],
        "trainable_params": peft["trainable_params"], "steps": steps,
        "lr": spec["lr"], "packing": spec["packing"],
    }


def run_method(name, steps, peft_python=None):
    spec = METHODS[name]
    keras.utils.set_random_seed(0)
    log(f"{name}: loading {os.path.basename(MODEL)} "
        f"({spec.get('dtype') or 'float32'}, quantize={spec.get('quantize')})")
    lm = load(spec)
    records = wordnet_pairs()
    heldout, _ = arrays(records[TRAIN:], lm, packing=False)
    (x, y, w), stats = arrays(records[:TRAIN], lm, packing=spec["packing"])
    log(f"{name}: train {stats.summary()}")
    if spec["adapter"] == "peft":
        return run_peft(name, spec, x, y, w, steps, peft_python)
    model = adapt(lm, spec["adapter"])
    trainable = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    log(f"{name}: {trainable:,} trainable parameters; held-out NLL ...")
    before = heldout_nll(model, *heldout)
    log(f"{name}: NLL before {before:.4f}; training {steps} steps")
    model.compile(optimizer=keras.optimizers.Adam(spec["lr"]))
    timer = StepTimer()
    history = model.fit(train_dataset(x, y, w), steps_per_epoch=steps, epochs=1,
                        verbose=0, callbacks=[timer])
    step = statistics.median(timer.times[TRACED:])
    real_tokens = real_tokens_per_step(x["padding_mask"], steps)[TRACED:].mean()
    log(f"{name}: steps {[round(t, 2) for t in timer.times]} s")
    after = heldout_nll(model, *heldout)
    log(f"{name}: NLL after {after:.4f}")
    return {
        "method": name, "nll_before": before, "nll_after": after,
        "train_loss_last": float(history.history["loss"][-1]),
        "step_s": step, "first_step_s": timer.times[0],
        "min_step_s": min(timer.times[TRACED:]), "step_times": timer.times,
        "tokens_per_s": float(real_tokens / step),
        "real_tokens_per_step": float(real_tokens),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "variable_bytes": variable_bytes(model), "trainable_params": trainable,
        "steps": steps, "lr": spec["lr"], "packing": spec["packing"],
    }


# === The table ===


def _ratio(results, a, b, key):
    if a in results and b in results and results[b][key]:
        return results[a][key] / results[b][key]
    return None


def _drop(result):
    return result["nll_before"] - result["nll_after"]


def _step_ratio(results, a, b):
    """Median step ratio, and the ratio of the fastest steps: on a shared
    CPU the minimum is the steadier of the two."""
    return (_ratio(results, a, b, "step_s"),
            _ratio(results, a, b, "min_step_s"))


def ratios(results):
    """`(label, value or (median, min) or None, goal text)` rows."""
    nll = (_ratio(results, "lora", "enable_lora", "nll_after") or 1) - 1
    drops = None
    if {"qlora_int8", "lora"} <= set(results) and _drop(results["lora"]):
        drops = _drop(results["qlora_int8"]) / _drop(results["lora"])
    return [
        ("kft LoRA step / enable_lora step",
         _step_ratio(results, "lora", "enable_lora"), "<= 0.85"),
        ("kft LoRA NLL after / enable_lora NLL after - 1",
         nll if {"lora", "enable_lora"} <= set(results) else None,
         "|x| <= 0.01"),
        ("LoRA step / full step", _step_ratio(results, "lora", "full"),
         "<= 0.70"),
        ("QLoRA int8 bytes / float32 LoRA bytes",
         _ratio(results, "qlora_int8", "lora", "variable_bytes"), "<= 0.30"),
        ("QLoRA int8 NLL drop / float32 LoRA NLL drop", drops, ">= 0.95"),
        ("QLoRA int4 bytes / float32 LoRA bytes",
         _ratio(results, "qlora_int4", "lora", "variable_bytes"), "<= 0.17"),
        ("packed / unpacked real tokens/s",
         _ratio(results, "lora", "lora_unpacked", "tokens_per_s"), ">= 1.5"),
        ("bf16 step / float32 step", _step_ratio(results, "lora_bf16", "lora"),
         "(report)"),
        ("kft LoRA step / PEFT LoRA step",
         _step_ratio(results, "lora", "peft_lora"), "<= 0.9"),
        ("kft LoRA peak RSS / PEFT peak RSS",
         _ratio(results, "lora", "peft_lora", "peak_rss_mb"), "<= 1.0"),
    ]


def _shown(value):
    if value is None or value == (None, None):
        return "n/a (method not run)"
    if isinstance(value, tuple):
        return f"{value[0]:.3f} (min {value[1]:.3f})"
    return f"{value:.3f}"


def table(results):
    header = (f"{'method':<14}{'NLL before':>11}{'NLL after':>10}{'drop':>8}"
              f"{'step s':>8}{'min s':>7}{'1st s':>7}{'real tok/s':>11}"
              f"{'RSS MB':>8}{'var MB':>8}{'trainable':>12}")
    lines = [header, "-" * len(header)]
    for name in METHODS:
        if name not in results:
            continue
        r = results[name]
        lines.append(
            f"{name:<14}{r['nll_before']:>11.4f}{r['nll_after']:>10.4f}"
            f"{_drop(r):>8.4f}{r['step_s']:>8.2f}{r['min_step_s']:>7.2f}"
            f"{r['first_step_s']:>7.1f}{r['tokens_per_s']:>11.0f}"
            f"{r['peak_rss_mb']:>8.0f}{r['variable_bytes'] / 2**20:>8.1f}"
            f"{r['trainable_params']:>12,}")
    lines.append("")
    for label, value, goal in ratios(results):
        lines.append(f"{label:<46}{_shown(value):>24}  goal {goal}")
    return "\n".join(lines)


# === Main ===


def run_in_subprocess(name, steps, peft_python=None):
    """One method in a fresh Python: its own peak RSS, no leftovers."""
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "result.json")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        extra = ["--peft-python", peft_python] if peft_python else []
        code = subprocess.call([sys.executable, __file__, "--worker", name,
                                "--steps", str(steps), "--out", out, *extra],
                               env=env)
        if code != 0:
            log(f"{name}: FAILED (exit {code})")
            return None
        with open(out) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--results", help="JSON file that accumulates results")
    parser.add_argument("--peft-python", default=os.environ.get("KFT_PEFT_PYTHON"),
                        help="for peft_lora: the Python of a venv with torch, "
                        "transformers and peft")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with open(args.out, "w") as f:
            json.dump(run_method(args.worker, args.steps, args.peft_python), f)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.steps < TRACED + 2:
        parser.error(f"--steps must be >= {TRACED + 2} ({TRACED} traced, then "
                     f"timed). Received: {args.steps}")
    results = {}
    if args.results and os.path.exists(args.results):
        with open(args.results) as f:
            results = json.load(f)
    for name in methods:
        result = run_in_subprocess(name, args.steps, args.peft_python)
        if result is None:
            continue
        results[name] = result
        if args.results:
            with open(args.results, "w") as f:
                json.dump(results, f, indent=1)
    log("done")
    print(table(results))


if __name__ == "__main__":
    main()
