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

A study survives its process (`kft.recipes.tune.study`): finished
trials stay in the storage; a trial cut by a kill or Ctrl-C is run again,
with the same values, as a new trial (`retry_of`); a trial that failed
with an error is not. Several workers share a study on a database URL.
The study ends when COMPLETE + PRUNED trials reach the requested number;
FAIL trials do not count. The modules: `objective` (one trial),
`study` (storage, workers, retries, the count), `results` (`trials.csv`,
`best.yaml`, plots, `--show`).
"""

import logging
import os

from kft.recipes.errors import RecipeError
from kft.recipes.loader import load_recipe
from kft.recipes.tune.objective import make_objective
from kft.recipes.tune.objective import objective_metric
from kft.recipes.tune.results import best_trial
from kft.recipes.tune.results import show
from kft.recipes.tune.results import trial_line
from kft.recipes.tune.results import write_results
from kft.recipes.tune.results import write_trials_csv
from kft.recipes.tune.study import HEARTBEAT_SECONDS
from kft.recipes.tune.study import configure
from kft.recipes.tune.study import open_study
from kft.recipes.tune.study import should_stop

__all__ = ["objective_metric", "show", "tune"]


class _AfterTrial:
    """After each trial: one line, `trials.csv`, and the stop once enough
    trials have finished (`should_stop`)."""

    def __init__(self, n_trials, study_dir, config, metric, verbose, heartbeat):
        self.n_trials, self.study_dir = n_trials, study_dir
        self.config, self.metric, self.verbose = config, metric, verbose
        self.heartbeat = heartbeat

    def __call__(self, study, trial):
        if self.verbose:
            print(trial_line(trial, self.metric), flush=True)
        write_trials_csv(study, self.study_dir, self.config, self.metric)
        if should_stop(study, self.n_trials, self.heartbeat):
            study.stop()


def tune(recipe, n_trials=None, *, output_dir=None, storage=None, resume=False,
         overrides=None, verbose=True, heartbeat=HEARTBEAT_SECONDS):
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
            several `kft tune` processes share, each with its own
            `output_dir` or one shared directory; default: SQLite in the
            study directory.
        resume: continue the study (its finished trials are kept; a trial
            cut mid-way runs again).
        overrides: `--set` style overrides of the recipe.
        verbose: one line per trial.
        heartbeat: with `storage`, seconds between a worker's signs of
            life; a trial whose worker missed three is failed and run
            again by another worker.

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
        study = open_study(config, study_dir, storage, resume, direction,
                           heartbeat)
        shared = storage is not None
        n_trials = configure(study, config, n_trials, shared)
        wait = heartbeat if shared else None
        after = _AfterTrial(n_trials, study_dir, config, metric, verbose, wait)
        timeout = config.search.timeout_minutes
        try:
            if not should_stop(study, n_trials, wait):
                study.optimize(
                    make_objective(config, study_dir, metric),
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
    best = best_trial(study)
    return {
        "study_dir": study_dir, "metric": metric, "direction": direction,
        "counts": counts, "files": files,
        "best": None if best is None else {
            "number": best.number, "value": best.value, "params": best.params,
            "run_dir": best.user_attrs.get("run_dir")},
    }
