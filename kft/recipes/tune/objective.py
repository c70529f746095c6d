"""One trial of `kft tune`: a normal kft run of the recipe with the
trial's values, and the Keras callback that reports the metric per epoch
and stops a trial the pruner gives up on."""

import os

from kft.recipes.errors import RecipeError
from kft.recipes.loader import trial_base
from kft.recipes.search import trial_recipe

__all__ = ["make_objective", "objective_metric"]

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


def make_objective(config, study_dir, metric):
    """The function Optuna calls per trial: one kft run of the recipe with
    the trial's values, in `study_dir/trial_NNN/`. A trial that fails
    records its error; a trial cut by Ctrl-C is queued again by this
    process, one cut by a kill by whoever resumes or finds it stale."""
    import keras
    import optuna

    from kft.recipes.runner import run_recipe
    from kft.recipes.tune.study import queue_retry
    from kft.recipes.tune.study import worker_name
    from kft.training.callbacks import NonFiniteLoss

    base = trial_base(config)
    # A cut trial is run again from its start: no per-epoch checkpoints.
    base["callbacks"]["checkpoints"] = False

    def objective(trial):
        params = {key: _suggest(trial, key, distribution)
                  for key, distribution in config.search.space.items()}
        run_dir = os.path.join(study_dir, f"trial_{trial.number:03d}")
        trial.set_user_attr("run_dir", run_dir)
        trial.set_user_attr("worker", worker_name())
        try:
            trial_config = _trial_config(base, params, _reporter(trial, metric))
            _, metrics = run_recipe(trial_config, run_dir, verbose=0,
                                    overwrite=True)
            return _final_value(metrics, metric, trial)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            queue_retry(trial.study, trial)
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

