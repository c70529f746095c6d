"""`kft tune` on the packaged quickstart_search: TPE with median pruning
against random search without pruning, the same number of trials.

For each seed: the default recipe (`quickstart`, the values the space
searches around) gives the target, its validation accuracy; then one
study per arm. Prints, side by side, the trials each arm needed to reach
the target (by trial number; a pruned trial counts as spent), its best
accuracy, the epochs it trained (pruned trials stop early) and its wall
time, the ratios random / TPE, and the search machinery's time per trial
(the study's wall time less its trials' durations: sampling, storage,
trials.csv, plots) against a trial's. Everything is measured in this one
process, one study after the other.

    python benchmarks/tune.py [--seeds 0,1,2] [--trials 20]
"""

import argparse
import statistics
import tempfile
import time

import optuna

import kft.recipes.tune as tune_module
from kft.recipes import load_recipe
from kft.recipes.runner import run_recipe

ARMS = ("tpe+median", "random")


def default_accuracy(seed):
    config = load_recipe("quickstart", [f"seed={seed}"])
    with tempfile.TemporaryDirectory() as out:
        _, metrics = run_recipe(config, out, verbose=0)
    return metrics["final"]["val"]["accuracy"]


def _random_sampler(configure):
    """`configure` with Optuna's RandomSampler in place of TPE."""

    def with_random(study, config, n_trials, shared):
        n_trials = configure(study, config, n_trials, shared)
        study.sampler = optuna.samplers.RandomSampler(seed=config.search.seed)
        return n_trials

    return with_random


def study(arm, seed, n_trials, target):
    """One study of `n_trials`; its numbers against `target`."""
    overrides = [f"seed={seed}", f"search.seed={seed}"]
    configure = tune_module.configure
    if arm == "random":
        overrides.append("search.pruner=none")
        tune_module.configure = _random_sampler(configure)
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            tune_module.tune("quickstart_search", n_trials, output_dir=out,
                             overrides=overrides, verbose=False)
            wall = time.perf_counter() - start
            trials = optuna.load_study(
                study_name="quickstart_search",
                storage=f"sqlite:///{out}/study.db").get_trials()
    finally:
        tune_module.configure = configure
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    reached = [t.number + 1 for t in complete if t.value >= target]
    durations = [t.duration.total_seconds() for t in trials if t.duration]
    return {
        "best": max(t.value for t in complete),
        "to_target": min(reached) if reached else None,
        "pruned": sum(t.state.name == "PRUNED" for t in trials),
        "epochs": sum(max(t.intermediate_values, default=0) for t in trials),
        "wall": wall,
        "trial_seconds": statistics.mean(durations),
        "machinery": (wall - sum(durations)) / len(trials),
    }


def _row(seed, target, results):
    cells = [f"{seed:>4}  {target:.4f}"]
    for arm in ARMS:
        r = results[arm]
        reached = f"{r['to_target']}" if r["to_target"] else "never"
        cells.append(f"{r['best']:.4f} {reached:>6} {r['pruned']:>6} "
                     f"{r['epochs']:>6} {r['wall']:>7.0f}")
    return " | ".join(cells)


def _summary(runs, n_trials):
    """Means per arm and the ratios random / TPE."""
    print("\nmeans and ratios (random / tpe+median)")
    means = {}
    for arm in ARMS:
        rows = [r[arm] for _, _, r in runs]
        # A study that never reached the target counts as n_trials + 1.
        means[arm] = {
            "to_target": statistics.mean(r["to_target"] or n_trials + 1 for r in rows),
            "best": statistics.mean(r["best"] for r in rows),
            "epochs": statistics.mean(r["epochs"] for r in rows),
            "wall": statistics.mean(r["wall"] for r in rows),
            "reached": sum(r["to_target"] is not None for r in rows),
        }
        m = means[arm]
        print(f"  {arm:<11} trials to target {m['to_target']:.1f} (reached in "
              f"{m['reached']}/{len(rows)} seeds), best {m['best']:.4f}, "
              f"epochs {m['epochs']:.0f}, wall {m['wall']:.0f} s")
    tpe, rnd = means["tpe+median"], means["random"]
    print(f"  ratios: trials to target {rnd['to_target'] / tpe['to_target']:.2f}x, "
          f"epochs trained {rnd['epochs'] / tpe['epochs']:.2f}x, "
          f"wall time {rnd['wall'] / tpe['wall']:.2f}x")
    rows = [r[arm] for _, _, r in runs for arm in ARMS]
    machinery = statistics.mean(r["machinery"] for r in rows)
    trial = statistics.mean(r["trial_seconds"] for r in rows)
    print(f"search machinery per trial {machinery:.2f} s against {trial:.1f} s "
          f"per trial ({100 * machinery / trial:.1f}%)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    runs = []
    for seed in seeds:
        target = default_accuracy(seed)
        results = {arm: study(arm, seed, args.trials, target) for arm in ARMS}
        runs.append((seed, target, results))
        print(f"seed {seed}: default {target:.4f}; " + "; ".join(
            f"{arm} best {r['best']:.4f}, target at trial {r['to_target']}, "
            f"{r['pruned']} pruned, {r['wall']:.0f} s" for arm, r in results.items()),
            flush=True)
    print(f"\nquickstart_search, {args.trials} trials per study, seeds {seeds}; "
          "target: the default recipe's val_accuracy at the seed")
    header = " | ".join(["seed  target"] + [
        f"{arm + ': best':<11} {'target':>6} {'pruned':>6} {'epochs':>6} "
        f"{'wall s':>7}" for arm in ARMS])
    print(header)
    for seed, target, results in runs:
        print(_row(seed, target, results))
    _summary(runs, args.trials)


if __name__ == "__main__":
    main()
