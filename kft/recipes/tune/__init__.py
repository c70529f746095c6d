"""`kft tune`: a hyperparameter search over a recipe's `search:` space.

    kft tune quickstart_search --trials 12
    kft tune --show runs/tune-quickstart_search

The search runs on Optuna: its TPE sampler (seeded), its median and
Hyperband pruners and its relational storage (a SQLite file in the study
directory by default, a database URL for several machines). Optuna was
picked over KerasTuner because its studies live in a database that
several processes share and that survives the process, which is what
resuming after a crash and spreading a study over machines need, and its
pruners take a value per epoch from any loop.

Design: each trial is a normal kft run (`run_recipe`, in this process)
of the resolved recipe with the trial's values set at their dotted keys,
in `OUTPUT_DIR/trial_NNN/`. The per-epoch metric reaches Optuna through a
Keras callback placed in every stage's `callbacks` (`Stage.callbacks`,
the Python API's slot for extra callbacks, which the recipe hash and
`config.yaml` leave out): it reports the validation metric at each
epoch's end and raises `optuna.TrialPruned` inside `fit` when the pruner
says so. That is the whole hook: the runner is used as it is, with no
subclass and no copy of its training phase. Trials run in this process
rather than as subprocesses (as `kft compare` runs its methods) because
the pruner's answer is needed inside `fit` at every epoch, and a start-up
of about 10 s per trial would be a large share of a small trial; Keras'
state is cleared after each trial.

A study survives its process: finished trials stay in the storage. On
`--resume` of a study in its own directory, trials the killed process
left RUNNING are marked FAIL (one process works on such a study); with
a shared database URL, Optuna's heartbeat fails a trial whose process
stopped beating. A trial cut that way (or by Ctrl-C) is run again once,
with the same values, as a new trial (`retry_of`); a trial that failed
with an error is not. The study ends when COMPLETE + PRUNED trials reach
the requested number; FAIL trials do not count.
"""

import csv
import hashlib
import json
import logging
import math
import os
import warnings

import yaml

from kft.recipes.errors import RecipeError
from kft.recipes.loader import load_recipe
from kft.recipes.loader import resolved
from kft.recipes.loader import trial_base
from kft.recipes.search import trial_recipe

__all__ = ["show", "tune"]

STUDY_DB = "study.db"
TRIALS_CSV = "trials.csv"
BEST_YAML = "best.yaml"
# Seconds between a worker's heartbeats, and without one before its
# running trial counts as cut (a shared database URL only).
HEARTBEAT_SECONDS, GRACE_SECONDS = 60, 180
_LOSS_NAMES = ("loss", "error", "mae", "mse", "perplexity")


def objective_metric(config):
    """`(metric, direction)` a study optimizes: `search.metric` /
    `search.direction`, or the task's validation metric (`val_accuracy`,
    maximized, for a classifier; `val_loss`, minimized, otherwise)."""
    search = config.search
    metric = search.metric
    if metric is None:
        from kft.recipes.tasks import task_for
        from kft.recipes.tasks.classification import ClassifierTask

        classifier = isinstance(task_for(config), ClassifierTask)
        metric = "val_accuracy" if classifier else "val_loss"
    direction = search.direction
    if direction is None:
        lower = any(metric.endswith(name) for name in _LOSS_NAMES)
        direction = "minimize" if lower else "maximize"
    return metric, direction


def _study_hash(config):
    """The resolved recipe's hash without the study's budget (`trials`,
    `timeout_minutes` may change on a resume)."""
    data = resolved(config)
    for key in ("trials", "timeout_minutes"):
        data["search"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# === The per-epoch report ===

def _reporter(trial, metric):
    """A Keras callback that reports `metric` to the trial at each epoch's
    end and stops the trial (`optuna.TrialPruned`) when the pruner says so."""
    import keras
    import optuna

    class TrialReporter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            if metric not in logs:
                available = sorted(k for k in logs if k.startswith("val_"))
                raise RecipeError(
                    f"search.metric: the runs report no {metric!r} (their "
                    f"validation metrics: {available or 'none'}); set "
                    "search.metric to one of them")
            value = float(logs[metric])
            # Keras counts epochs over all stages; the step is epochs done.
            trial.report(value, step=epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch + 1}: {metric} {value:.4f}")

    return TrialReporter()


def _suggest(trial, key, distribution):
    kind, values = distribution.kind, distribution.values
    if kind == "loguniform":
        return trial.suggest_float(key, values[0], values[1], log=True)
    if kind == "uniform":
        return trial.suggest_float(key, values[0], values[1])
    if kind == "int":
        return trial.suggest_int(key, values[0], values[1])
    return trial.suggest_categorical(key, values)


def _final_value(metrics, metric, trial):
    """The finished run's metric: its final evaluation in `metrics.json`
    (after any early-stopping restore), else the last epoch's report."""
    evaluation = metrics.get("final", {}).get("val", {})
    value = evaluation.get(metric.removeprefix("val_"))
    if isinstance(value, (int, float)):
        return float(value)
    reported = trial.intermediate_values
    return reported[max(reported)] if reported else float("nan")


def _trial_config(base, params, reporter):
    """The validated recipe of one trial, the reporter on every stage."""
    import pydantic

    from kft.recipes.errors import format_validation_error
    from kft.recipes.schema import RecipeConfig

    try:
        config = RecipeConfig.model_validate(trial_recipe(base, params))
    except pydantic.ValidationError as error:
        raise RecipeError(format_validation_error(
            error, model=RecipeConfig,
            title=f"The recipe is invalid with the trial's values {params}")) from None
    return config.model_copy(update={"stages": [
        stage.model_copy(update={"callbacks": [*stage.callbacks, reporter]})
        for stage in config.stages]})


def _objective(config, study_dir, metric):
    """The function Optuna calls per trial: one kft run of the recipe with
    the trial's values. A trial that fails records its error (a trial cut
    by a kill or Ctrl-C has none, and is run again on resume)."""
    import keras
    import optuna

    from kft.recipes.runner import run_recipe
    from kft.training.callbacks import NonFiniteLoss

    base = trial_base(config)
    # A cut trial is run again from its start: no per-epoch checkpoints.
    base["callbacks"]["checkpoints"] = False

    def objective(trial):
        params = {key: _suggest(trial, key, distribution)
                  for key, distribution in config.search.space.items()}
        run_dir = os.path.join(study_dir, f"trial_{trial.number:03d}")
        trial.set_user_attr("run_dir", run_dir)
        try:
            trial_config = _trial_config(base, params, _reporter(trial, metric))
            _, metrics = run_recipe(trial_config, run_dir, verbose=0,
                                    overwrite=True)
            return _final_value(metrics, metric, trial)
        except optuna.TrialPruned:
            raise
        except Exception as error:
            if (isinstance(error, RuntimeError)
                    and isinstance(error.__context__, NonFiniteLoss)):
                # A diverged trial is a result, not a broken study: FAIL, kept.
                trial.set_user_attr("error", "diverged (non-finite loss)")
                return float("nan")
            trial.set_user_attr("error", f"{type(error).__name__}: {error}")
            raise
        finally:
            keras.backend.clear_session()

    return objective


# === The study ===

def _storage(url, local):
    import optuna

    if local:
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": 60}})
    # Several workers: a worker that stops beating has its trial failed
    # (Optuna marks its heartbeat experimental).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS)


def _open_study(config, study_dir, storage_url, resume, direction):
    """Creates, resumes or joins the study; checks it is this recipe's."""
    import optuna

    local = storage_url is None
    db_path = os.path.join(study_dir, STUDY_DB)
    if local:
        if os.path.exists(db_path) and not resume:
            raise RecipeError(
                f"{study_dir!r} holds a study already ({STUDY_DB}). Pass "
                "--resume to continue it, or another --output-dir.")
        if resume and not os.path.exists(db_path):
            raise RecipeError(f"--resume: {study_dir!r} holds no study "
                              f"({STUDY_DB}) to continue.")
        os.makedirs(study_dir, exist_ok=True)
        storage_url = f"sqlite:///{os.path.abspath(db_path)}"
    storage = _storage(storage_url, local)
    name = config.name
    try:
        existing = storage.get_study_id_from_name(name)
    except KeyError:
        existing = None
    if resume and existing is None:
        raise RecipeError(f"--resume: no study {name!r} in {storage_url!r}.")
    study = optuna.create_study(storage=storage, study_name=name,
                                direction=direction, load_if_exists=True)
    recipe_hash = _study_hash(config)
    saved = study.user_attrs.get("recipe_hash")
    if saved is None:
        study.set_user_attr("recipe_hash", recipe_hash)
    elif saved != recipe_hash:
        raise RecipeError(
            f"the study {name!r} in {storage_url!r} was started with another "
            "recipe (or search space). Continue it with the same recipe and "
            "overrides, or start another study (--output-dir, or a new name).")
    if local and resume:
        _fail_running(study, storage)
    _requeue_cut_trials(study)
    return study


def _configure(study, config, n_trials):
    """The study's budget (kept for a resume without `--trials`), its
    seeded TPE sampler and its pruner; returns the budget."""
    import optuna

    if n_trials is None:
        n_trials = study.user_attrs.get("n_trials", config.search.trials)
    if n_trials < 1:
        raise RecipeError(f"--trials must be >= 1. Received: {n_trials}")
    study.set_user_attr("n_trials", n_trials)
    seed = config.search.seed if config.search.seed is not None else config.seed
    # A resumed study's sampler draws on from where the trials are.
    study.sampler = optuna.samplers.TPESampler(
        seed=seed + len(study.trials),
        n_startup_trials=max(2, min(10, n_trials // 3)))
    study.pruner = _pruner(config)
    return n_trials


def _pruner(config):
    import optuna

    search = config.search
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=search.startup_trials,
            n_warmup_steps=search.min_epochs)
    if search.pruner == "hyperband":
        epochs = sum(stage.epochs for stage in config.stages)
        return optuna.pruners.HyperbandPruner(
            min_resource=min(search.min_epochs, epochs), max_resource=epochs)
    return optuna.pruners.NopPruner()


def _fail_running(study, storage):
    """Marks the trials a killed process left RUNNING as FAIL (a study in
    its own directory has one process)."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            study_id, trial.number)
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)


def _requeue_cut_trials(study):
    """Queues once more, with the same values, each trial that was cut
    (FAIL without an error: killed, stale or interrupted)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        if (trial.state == TrialState.FAIL and "error" not in trial.user_attrs
                and trial.number not in retried):
            study.enqueue_trial(trial.params,
                                user_attrs={"retry_of": trial.number})


def _finished(study):
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED)))


class _AfterTrial:
    """After each trial: one line, `trials.csv`, cut trials queued again,
    and the stop once enough trials have finished."""

    def __init__(self, n_trials, study_dir, config, metric, verbose):
        self.n_trials, self.study_dir = n_trials, study_dir
        self.config, self.metric, self.verbose = config, metric, verbose

    def __call__(self, study, trial):
        if self.verbose:
            print(_trial_line(trial, self.metric), flush=True)
        write_trials_csv(study, self.study_dir, self.config, self.metric)
        _requeue_cut_trials(study)
        if _finished(study) >= self.n_trials:
            study.stop()


def _trial_line(trial, metric):
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


def tune(recipe, n_trials=None, *, output_dir=None, storage=None, resume=False,
         overrides=None, verbose=True):
    """Searches the recipe's `search:` space: one kft run per trial.

    Args:
        recipe: a packaged recipe name or a YAML path, with a `search:`
            section.
        n_trials: how many trials finish (COMPLETE or PRUNED) before the
            study ends, counting those of a resumed study (default: the
            number the study started with, else the recipe's
            `search.trials`).
        output_dir: the study directory (default `runs/tune-<name>`): the
            trials' run directories `trial_NNN/`, `study.db`, `trials.csv`,
            `best.yaml` and the plots.
        storage: a database URL (e.g. `postgresql://user@host/kft`) that
            several `kft tune` processes share; default: SQLite in the
            study directory.
        resume: continue the study (its finished trials are kept; a trial
            cut mid-way runs again).
        overrides: `--set` style overrides of the recipe.
        verbose: one line per trial.

    Returns:
        A dict: `study_dir`, `metric`, `direction`, `counts` (trials per
        state), `best` (`number`, `value`, `params`, `run_dir`, or `None`
        when no trial completed) and `files`.

    Example:

    ```python
    result = kft.tune("quickstart_search", n_trials=12)
    print(result["best"]["params"])   # also in runs/tune-.../best.yaml
    ```
    """
    import optuna

    config = load_recipe(recipe, overrides)
    if config.search is None:
        raise RecipeError(f"{recipe}: the recipe has no search: section (the "
                          "space to search; see `kft show quickstart_search`)")
    if n_trials is not None and n_trials < 1:
        raise RecipeError(f"--trials must be >= 1. Received: {n_trials}")
    metric, direction = objective_metric(config)
    study_dir = output_dir or os.path.join(config.output_dir or "runs",
                                           f"tune-{config.name}")
    # Optuna's line per trial repeats ours; TensorFlow's retracing notes
    # come from building a model per trial in one process.
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tf_logger = logging.getLogger("tensorflow")
    tf_level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        study = _open_study(config, study_dir, storage, resume, direction)
        n_trials = _configure(study, config, n_trials)
        after = _AfterTrial(n_trials, study_dir, config, metric, verbose)
        timeout = config.search.timeout_minutes
        try:
            if _finished(study) < n_trials:
                study.optimize(
                    _objective(config, study_dir, metric),
                    timeout=None if timeout is None else 60 * timeout,
                    callbacks=[after], gc_after_trial=True)
        finally:
            files = write_results(study, study_dir, config, metric)
    finally:
        optuna.logging.set_verbosity(previous)
        tf_logger.setLevel(tf_level)
    return _summary(study, study_dir, metric, direction, files)


def _summary(study, study_dir, metric, direction, files):
    counts = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    best = _best_trial(study)
    return {
        "study_dir": study_dir, "metric": metric, "direction": direction,
        "counts": counts, "files": files,
        "best": None if best is None else {
            "number": best.number, "value": best.value, "params": best.params,
            "run_dir": best.user_attrs.get("run_dir")},
    }


def _best_trial(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False,
                                        states=(TrialState.COMPLETE,))
            if t.value is not None and not math.isnan(t.value)]
    if not done:
        return None
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(done, key=lambda t: t.value)


# === Results ===

def write_results(study, study_dir, config, metric):
    """`trials.csv`, `best.yaml` (when a trial completed) and the plots;
    returns the names written."""
    files = [write_trials_csv(study, study_dir, config, metric)]
    best = _best_trial(study)
    if best is not None:
        files.append(_write_best(best, study, study_dir, config, metric))
    files.extend(_write_plots(study, study_dir, config))
    return files


def write_trials_csv(study, study_dir, config, metric):
    """One row per trial: number, state, the metric, each parameter,
    epochs reported, seconds, what it retried, its error, its run."""
    keys = list(config.search.space)
    fields = ["number", "state", metric, *keys, "epochs", "seconds",
              "retry_of", "error", "run_dir"]
    path = os.path.join(study_dir, TRIALS_CSV)
    with open(path + ".tmp", "w", newline="") as f:
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
                "run_dir": trial.user_attrs.get("run_dir", ""),
            })
    os.replace(path + ".tmp", path)
    return TRIALS_CSV


def _write_best(best, study, study_dir, config, metric):
    """The recipe with the best trial's values, ready for `kft run`."""
    recipe = trial_recipe(trial_base(config), best.params)
    path = os.path.join(study_dir, BEST_YAML)
    finished = _finished(study)
    header = (f"# kft run {path}\n"
              f"# The best of {finished} finished trial(s) of the search over "
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
    columns = [c for c in fields if c not in ("error", "run_dir")]
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
