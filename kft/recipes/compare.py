"""`kft compare`: the fine-tuning methods measured on the user's own task.

Each method is a named stage policy applied to the same recipe (model,
data, epoch budget, seeds). Every method and seed runs as its own
`kft run` process, so its peak memory is its own and a crash loses
nothing else; finished results are kept and skipped on a rerun.

    kft compare quickstart --methods head,full,gradual,discriminative
"""

import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time

import yaml

from kft.recipes.causal import causal_stored
from kft.recipes.checkpoint import read_history
from kft.recipes.errors import RecipeError
from kft.recipes.loader import load_recipe
from kft.recipes.loader import resolved
from kft.recipes.methods import DEFAULT_CAUSAL_METHODS
from kft.recipes.methods import DEFAULT_METHODS
from kft.recipes.methods import METHODS
from kft.recipes.methods import method_stages
from kft.recipes.tasks import task_for
from kft.training.report import figure

__all__ = ["DEFAULT_CAUSAL_METHODS", "DEFAULT_METHODS", "METHODS", "compare",
           "method_stages"]

_RESULT = "result.json"
_HIGHER_IS_BETTER = ("val_accuracy", "val_reward_accuracy")


def _run_one(recipe_path, run_dir, smoke, log_path):
    """One `kft run` in its own process: `(returncode, peak_rss_mb, wall)`."""
    command = [sys.executable, "-m", "kft.cli", "run", recipe_path, "--quiet",
               "--overwrite", "--output-dir", run_dir]
    if smoke:
        command.append("--smoke")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        # wait4 gives this child's own resource use (peak RSS in KiB).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024.0, time.perf_counter() - started


def _error_from_log(log_path):
    with open(log_path, errors="replace") as f:
        lines = [line.rstrip() for line in f if line.strip()]
    messages = [line for line in lines if line.startswith("kft:")]
    return (messages or lines or ["no output"])[-1][:500]


def _measure(run_dir, peak_mb, wall):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)

    rows = read_history(os.path.join(run_dir, "history.csv"))
    # A causal LM's measure is its held-out completion loss (its token
    # accuracy says little), kept with perplexity and the model's bytes; a
    # preference run's is its held-out reward accuracy.
    causal = "model_bytes" in metrics
    monitor = ("val_reward_accuracy" if any("val_reward_accuracy" in r for r in rows)
               else "val_accuracy" if not causal and any(
                   "val_accuracy" in r for r in rows) else "val_loss")
    values = [r[monitor] for r in rows if monitor in r]
    best = (max(values) if monitor in _HIGHER_IS_BETTER else min(values)) \
        if values else None
    params = metrics["params"]
    trainable = max((s["trainable_params"] for s in metrics["stages"]),
                    default=params["trainable"])
    extra = {"model_bytes": metrics["model_bytes"], "perplexity": None if
             best is None or monitor != "val_loss"
             else round(math.exp(min(best, 50)), 4)} if causal else {}
    if causal:
        stored, what = causal_stored(metrics, run_dir)
    elif "adapter" in metrics:
        stored, what = metrics["adapter"]["bytes"], "adapter.npz"
    elif metrics.get("stages") and all(
            s["name"] == "prompt" for s in metrics["stages"]):
        stored, what = 4 * trainable, "prompt and head weights (float32)"
    else:
        stored = os.path.getsize(os.path.join(run_dir, "model.keras"))
        what = "model.keras"
    return {
        "status": "ok",
        "monitor": monitor,
        "best": best,
        "final": values[-1] if values else None,
        "trainable_params": int(trainable),
        "total_params": int(params["total"]),
        "trainable_share": trainable / max(params["total"], 1),
        "peak_memory_mb": round(peak_mb, 1),
        "median_step_seconds": metrics["timings"]["median_step_seconds"],
        "train_seconds": metrics["timings"]["train_seconds"],
        "wall_seconds": round(wall, 2),
        "stored_bytes": int(stored),
        "stored": what,
        **extra,
    }


def _summaries(results, methods):
    """Per method: mean / spread over seeds of the measured numbers."""
    summary = {}
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        ok = [r for r in runs if r["status"] == "ok" and r["best"] is not None]
        if not ok:
            first = runs[0] if runs else {"status": "skipped", "reason": ""}
            summary[method] = {"status": first["status"],
                               "reason": first.get("reason") or first.get("error")}
            continue
        best = [r["best"] for r in ok]

        def median(key, ok=ok):
            values = [r[key] for r in ok if r.get(key) is not None]
            return statistics.median(values) if values else None

        summary[method] = {
            "status": "ok", "seeds": len(ok),
            "failed_seeds": len(runs) - len(ok),
            "monitor": ok[0]["monitor"],
            "best_mean": statistics.fmean(best),
            "best_std": statistics.pstdev(best) if len(best) > 1 else 0.0,
            "trainable_params": ok[0]["trainable_params"],
            "trainable_share": ok[0]["trainable_share"],
            "peak_memory_mb": median("peak_memory_mb"),
            "median_step_seconds": median("median_step_seconds"),
            "wall_seconds": median("wall_seconds"),
            "stored_bytes": ok[0]["stored_bytes"],
            "stored": ok[0]["stored"],
        }
        if "model_bytes" in ok[0]:  # a causal LM
            summary[method]["model_bytes"] = ok[0]["model_bytes"]
        if ok[0].get("perplexity") is not None:  # its held-out loss
            summary[method]["perplexity"] = math.exp(
                min(statistics.fmean(best), 50))
    return summary


def _advice(summary):
    """One sentence per method, derived from the numbers.

    Methods within 1% of the best validation metric count as equally good;
    among those the one with the shortest wall time is the better choice.
    """
    done = {m: s for m, s in summary.items() if s["status"] == "ok"}
    sentences = {m: f"{m}: {s['status']} ({s['reason']})."
                 for m, s in summary.items() if s["status"] != "ok"}
    if not done:
        return sentences
    higher = next(iter(done.values()))["monitor"] in _HIGHER_IS_BETTER

    def quality(s):
        """The metric as a share of the best (1.0 = the best)."""
        if higher:
            return s["best_mean"] / best["best_mean"] if best["best_mean"] else 1.0
        return best["best_mean"] / s["best_mean"] if s["best_mean"] else 1.0

    best_method = (max if higher else min)(done, key=lambda m: done[m]["best_mean"])
    best = done[best_method]
    good = [m for m in done if quality(done[m]) >= 0.99]
    choice = min(good, key=lambda m: done[m]["wall_seconds"])
    fastest = min(done, key=lambda m: done[m]["wall_seconds"])
    reference = "full" if "full" in done else best_method
    ref = done[reference]
    for method, s in done.items():
        parts = [f"{method} reached {100 * quality(s):.1f}% of the best "
                 f"validation {'accuracy' if higher else 'loss'} ({best_method})"]
        if method != reference:
            step_ratio = ((s["median_step_seconds"] or 0)
                          / (ref["median_step_seconds"] or 1))
            param_ratio = s["trainable_params"] / max(ref["trainable_params"], 1)
            parts.append(f"with {100 * param_ratio:.2f}% of {reference}'s "
                         f"trainable parameters and {100 * step_ratio:.0f}% of "
                         "its step time")
        wall_ratio = s["wall_seconds"] / max(done[choice]["wall_seconds"], 1e-9)
        if method == choice:
            verdict = ("the better choice here: as good as the best (within 1%) "
                       "in the least wall time")
        elif method in good:
            verdict = (f"as good as {choice}, at {100 * wall_ratio:.0f}% of its "
                       "wall time")
        elif method == fastest:
            verdict = f"the quickest baseline; {choice} is worth its extra time"
        elif s["stored_bytes"] < 0.05 * done[choice]["stored_bytes"]:
            verdict = ("worth it when many task variants must be stored (small "
                       f"files); otherwise {choice}")
        else:
            verdict = f"{choice} does better on this task"
        sentences[method] = ", ".join(parts) + f": {verdict}."
    return sentences


def _markdown(summary, advice):
    lines = ["| method | validation (best, mean ± sd) | trainable | peak memory "
             "| step time | wall time | stored |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, s in summary.items():
        if s["status"] != "ok":
            lines.append(f"| {method} | {s['status']}: {s['reason']} | | | | | |")
            continue
        step = s["median_step_seconds"]
        ppl = f", perplexity {s['perplexity']:.2f}" if "perplexity" in s else ""
        variables = (f"; model variables {s['model_bytes'] / 1e6:.2f} MB"
                     if "model_bytes" in s else "")
        lines.append(
            f"| {method} | {s['best_mean']:.3f} ± {s['best_std']:.3f} "
            f"({s['monitor']}{ppl}, {s['seeds']} seed"
            f"{'s' if s['seeds'] > 1 else ''}) "
            f"| {s['trainable_params']:,} ({100 * s['trainable_share']:.2f}%) "
            f"| {s['peak_memory_mb']:.0f} MB "
            f"| {'-' if step is None else f'{1000 * step:.0f} ms'} "
            f"| {s['wall_seconds']:.0f} s "
            f"| {s['stored_bytes'] / 1e6:.2f} MB ({s['stored']}){variables} |")
    lines.append("")
    lines.extend(f"- {advice[m]}" for m in summary if m in advice)
    return "\n".join(lines) + "\n"


def _plot(results, path):

    fig = figure(figsize=(6, 4))
    ax = fig.subplots()
    for method in dict.fromkeys(r["method"] for r in results):
        ok = [r for r in results if r["method"] == method and r["status"] == "ok"
              and r["best"] is not None]
        if ok:
            ax.scatter([r["wall_seconds"] for r in ok], [r["best"] for r in ok],
                       label=method)
    monitor = next((r["monitor"] for r in results if r["status"] == "ok"), "")
    ax.set_xlabel("wall time per run (s)")
    ax.set_ylabel(f"best {monitor}")
    ax.set_title("methods: validation metric against wall time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)




def compare(recipe, methods=None, *, epochs=None, seeds=(0,), output_dir=None,
            overrides=None, rerun=False, smoke=False, verbose=True):
    """Runs each method on the recipe's task and compares them.

    Args:
        recipe: a packaged recipe name or a YAML path.
        methods: names from `METHODS` (default: the task's
            `default_methods`: `DEFAULT_METHODS`, or `DEFAULT_CAUSAL_METHODS`
            for a causal LM); those that do not apply to the model (prompt
            tuning on an image model; on a causal LM all but `full`,
            `lora`, `qlora` and `prompt`) are skipped with a reason.
        epochs: the epoch budget of every method (default: the recipe's
            total epochs).
        seeds: one run per method and seed.
        output_dir: where runs and results go (default
            `runs/compare-<recipe name>`).
        overrides: `--set` style overrides of the recipe.
        rerun: run again what already has a result.
        smoke: synthetic data, random weights, two steps per stage.
        verbose: print one line per run.

    Returns:
        The comparison as a dict (also `compare.json`; `compare.csv`,
        `compare.md` and `compare.png` beside it).
    """
    config = load_recipe(recipe, overrides)
    task = task_for(config)
    if methods is None:
        methods = task.default_methods
    methods = _check_methods(methods, (*METHODS, *task.default_methods,
                                       *task.methods))
    seeds = [int(s) for s in seeds]
    epochs = epochs or sum(stage.epochs for stage in config.stages)
    if epochs < 1:
        raise RecipeError(f"--epochs must be >= 1. Received: {epochs}")
    output_dir = output_dir or os.path.join(config.output_dir or "runs",
                                            f"compare-{config.name}")
    os.makedirs(output_dir, exist_ok=True)
    base = resolved(config)
    results = []
    for method in methods:
        changes, reason = task.method_changes(method, epochs, base)
        for seed in seeds:
            if changes is None:
                results.append({"method": method, "seed": seed,
                                "status": "skipped", "reason": reason})
                continue
            derived = {**base, **changes, "seed": seed,
                       "name": f"{config.name}-{method}"}
            folder = os.path.join(output_dir, method, f"seed_{seed}")
            results.append(_method_result(method, seed, derived, folder,
                                          rerun=rerun, smoke=smoke,
                                          verbose=verbose))
    summary = _summaries(results, methods)
    report = {"recipe": config.name, "epochs": epochs, "seeds": seeds,
              "smoke": smoke, "methods": summary, "advice": _advice(summary),
              "runs": results,
              "descriptions": {m: task.method_description(m)
                               for m in methods}}
    _write_report(report, results, output_dir)
    report["output_dir"] = output_dir
    return report


def _check_methods(methods, allowed=METHODS):
    """`methods` without repeats; a `RecipeError` for a name that is
    neither a kft method nor one of the task's own."""
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise RecipeError("--methods: give at least one method")
    allowed = tuple(dict.fromkeys(allowed))
    unknown = [m for m in methods if m not in allowed]
    if unknown:
        raise RecipeError(f"--methods: unknown {unknown}; allowed: "
                          f"{', '.join(allowed)}")
    return methods


def _method_result(method, seed, derived, folder, *, rerun, smoke, verbose):
    """One method and seed: its kept result, or a fresh `kft run` of the
    derived recipe in its own process."""
    result_path = os.path.join(folder, _RESULT)
    if os.path.exists(result_path) and not rerun:
        if verbose:
            print(f"{method} seed {seed}: kept ({result_path})")
        with open(result_path) as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    recipe_path = os.path.join(folder, "recipe.yaml")
    with open(recipe_path, "w") as f:
        yaml.safe_dump(derived, f, sort_keys=False)
    run_dir, log_path = os.path.join(folder, "run"), os.path.join(folder, "log.txt")
    code, peak_mb, wall = _run_one(recipe_path, run_dir, smoke, log_path)
    result = {"method": method, "seed": seed}
    if code == 0:
        result.update(_measure(run_dir, peak_mb, wall))
    else:
        result.update(status="failed", exit_code=code,
                      error=_error_from_log(log_path),
                      log=log_path, wall_seconds=round(wall, 2))
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)
    if verbose:
        shown = (f"best {result['monitor']} {result['best']:.4f}, "
                 f"{result['wall_seconds']:.0f} s"
                 if result["status"] == "ok" and result["best"] is not None
                 else result.get("error", result["status"]))
        print(f"{method} seed {seed}: {shown}", flush=True)
    return result


_CSV_FIELDS = ["method", "seed", "status", "monitor", "best", "final",
               "trainable_params", "total_params", "trainable_share",
               "peak_memory_mb", "median_step_seconds", "train_seconds",
               "wall_seconds", "stored_bytes", "stored", "reason", "error",
               "perplexity", "model_bytes"]


def _write_report(report, results, output_dir):
    """compare.json, compare.csv, compare.md and compare.png."""
    with open(os.path.join(output_dir, "compare.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output_dir, "compare.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    with open(os.path.join(output_dir, "compare.md"), "w") as f:
        f.write(_markdown(report["methods"], report["advice"]))
    _plot(results, os.path.join(output_dir, "compare.png"))
