"""The results of `kft tune` that people look at: `trials.csv` (one row
per trial), `best.yaml` (the best trial's recipe, ready for `kft run`),
the plots (optimisation history, parallel coordinates, parameter
importances) and `kft tune --show`."""

import csv
import math
import os
import warnings

import yaml

from kft.recipes.errors import RecipeError
from kft.recipes.loader import trial_base
from kft.recipes.search import trial_recipe
from kft.recipes.tune.study import finished

__all__ = ["BEST_YAML", "TRIALS_CSV", "best_trial", "show", "trial_line",
           "write_results", "write_trials_csv"]

TRIALS_CSV = "trials.csv"
BEST_YAML = "best.yaml"


def trial_line(trial, metric):
    params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    state = trial.state.name.lower()
    if state == "pruned":
        state += f" after epoch {max(trial.intermediate_values, default=0)}"
    value = "" if trial.value is None else f" {metric} {trial.value:.4f}"
    error = trial.user_attrs.get("error")
    return (f"trial {trial.number}: {state}{value} ({params}) {seconds:.0f} s"
            + (f": {error}" if error else ""))


def _short(value):
    return f"{value:.3g}" if isinstance(value, float) else str(value)



def best_trial(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False,
                                        states=(TrialState.COMPLETE,))
            if t.value is not None and not math.isnan(t.value)]
    if not done:
        return None
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(done, key=lambda t: t.value)



def write_results(study, study_dir, config, metric):
    """`trials.csv`, `best.yaml` (when a trial completed) and the plots;
    returns the names written."""
    files = [write_trials_csv(study, study_dir, config, metric)]
    best = best_trial(study)
    if best is not None:
        files.append(_write_best(best, study, study_dir, config, metric))
    files.extend(_write_plots(study, study_dir, config))
    return files


def write_trials_csv(study, study_dir, config, metric):
    """One row per trial: number, state, the metric, each parameter,
    epochs reported, seconds, what it retried, its error, its run."""
    keys = list(config.search.space)
    fields = ["number", "state", metric, *keys, "epochs", "seconds",
              "retry_of", "error", "worker", "run_dir"]
    path = os.path.join(study_dir, TRIALS_CSV)
    # Workers sharing a study directory each write their own temporary file.
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for trial in study.get_trials(deepcopy=False):
            writer.writerow({
                "number": trial.number, "state": trial.state.name,
                metric: "" if trial.value is None else trial.value,
                **{key: trial.params.get(key, "") for key in keys},
                "epochs": max(trial.intermediate_values, default=0),
                "seconds": (round(trial.duration.total_seconds(), 2)
                            if trial.duration else ""),
                "retry_of": trial.user_attrs.get("retry_of", ""),
                "error": trial.user_attrs.get("error", ""),
                "worker": trial.user_attrs.get("worker", ""),
                "run_dir": trial.user_attrs.get("run_dir", ""),
            })
    os.replace(temporary, path)
    return TRIALS_CSV


def _write_best(best, study, study_dir, config, metric):
    """The recipe with the best trial's values, ready for `kft run`."""
    recipe = trial_recipe(trial_base(config), best.params)
    path = os.path.join(study_dir, BEST_YAML)
    done = finished(study)
    header = (f"# kft run {path}\n"
              f"# The best of {done} finished trial(s) of the search over "
              f"{config.name}: trial {best.number}, {metric} {best.value:.4f} "
              f"({best.user_attrs.get('run_dir', '')}).\n"
              + "".join(f"#   {k}: {v}\n" for k, v in best.params.items()))
    with open(path, "w") as f:
        f.write(header)
        yaml.safe_dump(recipe, f, sort_keys=False)
    return BEST_YAML


def _write_plots(study, study_dir, config):
    """Optimisation history, parallel coordinates and (two parameters or
    more, four completed trials or more) parameter importances, as PNG."""
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    completed = len(study.get_trials(deepcopy=False,
                                     states=(TrialState.COMPLETE,)))
    wanted = {"history.png": plots.plot_optimization_history}
    if completed >= 1:
        wanted["parallel_coordinates.png"] = plots.plot_parallel_coordinate
    if len(config.search.space) >= 2 and completed >= 4:
        wanted["param_importances.png"] = plots.plot_param_importances
    written = []
    for name, plot in wanted.items():
        with warnings.catch_warnings():
            # Optuna marks its matplotlib plots experimental; a study whose
            # values are all equal draws a flat axis.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # too few trials for this plot yet
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(os.path.join(study_dir, name), dpi=100)
        plt.close(figure)
        written.append(name)
    return written


def show(study_dir):
    """The trials of a study directory (its `trials.csv`) as a table, with
    the count per state and the best recipe's path."""
    path = os.path.join(study_dir, TRIALS_CSV)
    if not os.path.exists(path):
        raise RecipeError(f"--show: {study_dir!r} is not a study directory "
                          f"(no {TRIALS_CSV}).")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    columns = [c for c in fields if c not in ("error", "worker", "run_dir")]
    widths = {c: max([len(c)] + [len(_cell(r[c])) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns),
             "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(_cell(r[c]).ljust(widths[c]) for c in columns)
              for r in rows]
    states = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in states.items()))
    best = os.path.join(study_dir, BEST_YAML)
    if os.path.exists(best):
        with open(best) as f:
            f.readline()
            lines.append(f.readline().lstrip("# ").rstrip())
        lines.append(f"Best recipe: {best} (kft run {best})")
    return "\n".join(lines)


def _cell(text):
    try:
        number = float(text)
    except ValueError:
        return text
    if text.lstrip("-").isdigit():
        return text
    return f"{number:.4g}"
