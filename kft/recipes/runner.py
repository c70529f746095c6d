"""The runner: recipe -> data + model -> stages -> run directory.

`RecipeRun` reads like the training script a user would write (as
torchtune's recipes do): `setup()` prepares the run directory, the data
and the model; `train()` runs `kft.fine_tune` stage by stage; `finalize()`
saves the model, the adapters, the plots and `metrics.json`. What a run
turns on for the whole process (the dtype policy, op determinism) it
turns off again when it ends, failed or not.
"""

import contextlib
import datetime
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import yaml

from kft._keras_internals import op_determinism
from kft._keras_internals import tracked_dataset
from kft.backbones.anatomy import count_params
from kft.backbones.freezing import format_trainable_summary
from kft.distribute.mesh import KERAS_DISTRIBUTIONS
from kft.distribute.mesh import keras_distribution
from kft.distribute.strategy import make_strategy
from kft.lora.base import lora_layers
from kft.lora.io import save_adapter
from kft.recipes.builders import augment_training_data
from kft.recipes.checkpoint import RunCheckpoint
from kft.recipes.checkpoint import read_history
from kft.recipes.checkpoint import read_state
from kft.recipes.checkpoint import write_history
from kft.recipes.errors import RecipeError
from kft.recipes.loader import config_hash
from kft.recipes.loader import resolved
from kft.recipes.resume import restore_model
from kft.recipes.tasks import task_for
from kft.training import report
from kft.training.callbacks import NonFiniteLoss
from kft.training.callbacks import StopOnNonFiniteLoss
from kft.training.finetune import compile_stage
from kft.training.finetune import fine_tune

__all__ = ["RecipeRun", "default_output_dir", "run_recipe", "smoke_config"]


def default_output_dir(config):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(config.output_dir or "runs", f"{config.name}-{stamp}")


def smoke_config(config):
    """The recipe shrunk to a wiring check: random weights (as its task
    says), two steps per stage (over two epochs, so unfreezing schedules
    fire), tiny batches."""
    config = task_for(config).smoke_config(config)
    stages = []
    for stage in config.stages:
        update = {"epochs": min(stage.epochs, 2), "steps_per_epoch": 1}
        if stage.lr_find:
            update["lr_find"] = {"start_lr": 1e-6, "end_lr": 1.0, "num_steps": 3}
        stages.append(stage.model_copy(update=update))
    # No generation: compiling a real LM's generate loop takes minutes on a
    # CPU (the tests check generation on tiny models).
    config = config.model_copy(update={"generate": None})
    data = config.data.model_copy(update={"batch_size": min(config.data.batch_size, 4)})
    return config.model_copy(update={"data": data, "stages": stages})


@contextlib.contextmanager
def process_settings(config):
    """The recipe's process-wide settings, restored on exit (even on error)."""
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(config.precision)
    try:
        keras.utils.set_random_seed(config.seed)
        # data_parallel / model_parallel (JAX): current while the model is
        # built, trained and evaluated; nothing for tf.distribute names.
        distribution = config.distribution
        with op_determinism(config.deterministic), keras_distribution(
                distribution.strategy, distribution.mesh,
                layout=(config.model.causal_lm
                        if distribution.strategy == "model_parallel" else None)):
            yield
    finally:
        keras.config.set_dtype_policy(previous_policy)


class RecipeRun:
    """One run of a validated `RecipeConfig` (see `run_recipe`)."""

    def __init__(self, config, output_dir=None, verbose="auto", *, resume=False,
                 smoke=False, overwrite=False):
        if smoke:
            config = smoke_config(config)
            output_dir = output_dir or tempfile.mkdtemp(
                prefix=f"kft-smoke-{config.name}-")
        self.config = config
        self.task = task_for(config)
        self.output_dir = output_dir or default_output_dir(config)
        # Where this process writes: the run directory, or, for a
        # multi-worker run's non-chief workers, a scratch directory
        # (TensorFlow's convention: only the chief writes the run).
        self.write_dir = self.output_dir
        self.verbose, self.resume, self.smoke = verbose, resume, smoke
        self.overwrite = overwrite
        self.recipe_hash = config_hash(config)
        self.started = time.perf_counter()
        self.state = self.bundle = self.model = self.strategy = None
        self.samples, self.before = {}, None
        self.histories, self.timings = [], {}

    def path(self, *parts):
        return os.path.join(self.write_dir, *parts)

    def say(self, message):
        if self.verbose != 0:
            print(message)

    # === Setup ===

    def setup(self):
        # The strategy first: a multi-worker strategy must exist before any
        # tensor (TensorFlow configures collective ops once per process).
        distribution = self.config.distribution
        keras_engine = distribution.strategy in KERAS_DISTRIBUTIONS
        self.strategy = make_strategy(
            "none" if keras_engine else distribution.strategy, distribution.devices)
        if not self.strategy.extended.should_checkpoint:
            self.write_dir = tempfile.mkdtemp(prefix="kft-worker-")
        self._setup_output_dir()
        self._setup_data()
        self._setup_model()

    @property
    def is_chief(self):
        """Whether this process writes the run directory (always, except
        on a multi-worker run's non-chief workers)."""
        return self.write_dir == self.output_dir

    def _setup_output_dir(self):
        if self.resume:
            self._check_resumable()
        elif not self.is_chief:
            pass  # the chief checks and writes the run directory
        elif os.path.isdir(self.output_dir) and os.listdir(self.output_dir):
            if not self.overwrite:
                raise RecipeError(
                    f"Output directory {self.output_dir!r} exists and is not "
                    "empty. Pass --overwrite to replace it, --resume to "
                    "continue its run, or another --output-dir.")
            shutil.rmtree(self.output_dir)
        os.makedirs(self.path("plots"), exist_ok=True)
        if not self.resume:
            # The resolved config first: even a run that fails says what it was.
            written = {**resolved(self.config), "recipe_hash": self.recipe_hash}
            with open(self.path("config.yaml"), "w") as f:
                yaml.safe_dump(written, f, sort_keys=False)

    def _check_resumable(self):
        self.state = read_state(self.output_dir)
        if self.state is None:
            raise RecipeError(
                f"--resume: {self.output_dir!r} holds no checkpoint to resume "
                "from (checkpoints/state.json).")
        with open(os.path.join(self.output_dir, "config.yaml")) as f:
            saved = yaml.safe_load(f)
        if saved.get("recipe_hash") != self.recipe_hash:
            raise RecipeError(
                f"--resume: the recipe differs from the one the run in "
                f"{self.output_dir!r} started with (see its config.yaml). "
                "Resume with the same recipe and overrides.")
        if self.state["checkpoint"].endswith(".keras"):
            raise RecipeError(
                f"--resume: the checkpoint in {self.output_dir!r} was written "
                "by an earlier kft (a .keras file); start the run again.")
        if not self.is_chief:
            return  # every worker resumes from the chief's checkpoint
        # Epochs after the checkpoint are run again: drop their rows.
        write_history(self.path("history.csv"), [
            r for r in read_history(self.path("history.csv"))
            if r["epoch"] <= self.state["epochs_done"]])

    def _setup_data(self):
        config = self.config
        self.input_shape = self.task.input_shape(config)
        self.bundle = self.task.build_data(config, self.input_shape, self.smoke)
        if self.bundle is None:
            return  # the task builds it once the model is there
        if config.augmentation is not None:
            self.bundle.train = augment_training_data(
                self.bundle.train, config.augmentation, config.seed)
        self.data_ready()

    def _setup_model(self):
        # Built in the strategy's scope: variables are mirrored. A resumed
        # run is rebuilt from the recipe, then given the checkpoint's
        # weights, random states and trainable flags.
        fresh = self.state is None and not self.smoke
        with self.strategy.scope():
            self.model = self.task.build_model(self.config, self.bundle,
                                               self.input_shape,
                                               load_weights=fresh)
            if self.bundle is None:
                self.task.setup_after_model(self)
            if self.state is not None:
                restore_model(self.model, self.state["path"])
        if self.state is not None:
            self.say(f"Resuming {self.output_dir} after epoch "
                     f"{self.state['epochs_done']} (stage {self.state['stage'] + 1})")
        self.say(f"Run directory: {self.output_dir}")
        self.say(format_trainable_summary(self.model))

    def data_ready(self):
        """Called once the training data is built: tracks its iterators
        (exact resume) and times the data set-up."""
        self._track_data()
        self.timings["data_seconds"] = round(time.perf_counter() - self.started, 2)

    def _track_data(self):
        """Counts the training data's iterators, so that a resumed run sees
        the same shuffle order (one device only: a
        tf.distribute strategy makes its own iterators)."""
        import tensorflow as tf

        train = self.bundle.train
        if (isinstance(train, tf.data.Dataset)
                and self.config.distribution.strategy == "none"):
            self.bundle.train = tracked_dataset(train)

    # === Train ===

    def train(self):
        state, config = self.state, self.config
        resume_from = (None if state is None else
                       (state["stage"], state["stage_start"], state["epochs_done"]))
        if resume_from is not None and resume_from[0] >= len(config.stages):
            # Every stage had finished: compiled as the last one was, for
            # the evaluation.
            compile_stage(self.model, self.bundle.train, self._stages()[-1])
            return
        # The NaN guard first: a broken epoch never reaches the checkpoint.
        checkpoint = RunCheckpoint(self.write_dir, config.callbacks.checkpoints,
                                   data=self.bundle.train, resume=state)
        if state is not None:
            self._fast_forward_data(state, resume_from)
        callbacks = [StopOnNonFiniteLoss(), checkpoint]
        if config.callbacks.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(self.path("tensorboard")))
        distributed = config.distribution.strategy not in (
            "none", *KERAS_DISTRIBUTIONS)
        try:
            self.histories = fine_tune(
                self.model, self.bundle.train, self.bundle.val,
                stages=self._stages(), callbacks=callbacks, verbose=self.verbose,
                resume_from=resume_from, recompile_on_resume=True,
                strategy=self.strategy if distributed else None)
        except NonFiniteLoss as error:
            raise RuntimeError(self._non_finite_message(error)) from None

    def _stages(self):
        """The recipe's stages, with the task's loss and metrics where a
        stage names none (a recipe cannot: they are Python objects)."""
        compiled = self.task.loss_and_metrics(self.config, self.model)
        if compiled is None:
            return self.config.stages
        loss, metrics = compiled
        return [stage if stage.loss is not None else stage.model_copy(
            update={"loss": loss, "metrics": metrics})
            for stage in self.config.stages]

    def _fast_forward_data(self, state, resume_from):
        """Brings the training data to where the checkpoint left it: as
        many iterators made (each draws the next shuffle order). A stage
        that goes on with its `steps_per_epoch` stream takes that stream's
        iterator again, from the start of its pass."""
        position = state.get("data")
        train = self.bundle.train
        if position is None or not hasattr(train, "fast_forward"):
            return
        stage = self.config.stages[resume_from[0]]
        mid_stage = resume_from[2] > resume_from[1]
        if mid_stage and stage.steps_per_epoch is not None:
            # The stage goes on with the stream it drew from. Where that
            # stream had been cut mid-pass, Keras (which counts a pass's
            # batches itself) cannot be told about skipped batches: the
            # pass starts again, in the same order.
            if position["drawn"]:
                self.say(f"Resuming mid-pass: the interrupted pass of the data "
                         f"starts again ({position['drawn']} batches repeat).")
            train.fast_forward(position["iterators"] - 1)
        else:
            train.fast_forward(position["iterators"])

    def _non_finite_message(self, error):
        state = read_state(self.output_dir)
        if state is None or not state.get("path"):
            kept = "No epoch had finished, so there is no checkpoint."
        else:
            kept = (f"The last good checkpoint (after epoch "
                    f"{state['epochs_done']}) is kept: {state['path']}.")
        return f"{error}. {kept} history.csv holds the epochs before it."

    # === Finalize ===

    def finalize(self):
        """Saves the model (and adapter), plots, evaluates, as the run's
        task says; returns and writes `metrics.json`."""
        metrics = self.task.finalize(self)
        report.write_metrics(self.path("metrics.json"), metrics)
        return metrics

    def save_adapter(self):
        """Writes `adapter.npz` (the LoRA weights alone) and describes it."""
        path = save_adapter(self.model, self.path("adapter.npz"))
        return {"file": "adapter.npz", "bytes": os.path.getsize(path),
                "layers": len(lora_layers(self.model))}

    def metrics(self, rows, evaluation):
        """The `metrics.json` dict: `evaluation` as the final validation
        (or training) metrics, with the stages, timings and versions."""
        config, bundle = self.config, self.bundle
        train_keys = ("loss", "accuracy", "mae", "auc")
        return {
            "recipe": config.name, "recipe_hash": self.recipe_hash,
            "seed": config.seed, "smoke": self.smoke,
            "classes": bundle.class_names,
            "final": {
                "train": ({k: v for k, v in rows[-1].items() if k in train_keys}
                          if rows else {}),
                ("val" if bundle.val is not None else "train_eval"): evaluation,
            },
            "data": {"skipped_files": bundle.skipped_files},
            "distribution": {"strategy": config.distribution.strategy,
                             "replicas": int(getattr(
                                 keras.distribution.distribution(),
                                 "num_model_replicas", 0)
                                 or self.strategy.num_replicas_in_sync)},
            "stages": _stage_summaries(rows, self.histories, config),
            "params": {"total": count_params(self.model.weights),
                       "trainable": count_params(self.model.trainable_weights)},
            "timings": {
                "median_step_seconds": _median_step_seconds(rows),
                **self.timings,
                "train_seconds": round(sum(r.get("seconds", 0.0) for r in rows), 2),
                "total_seconds": round(time.perf_counter() - self.started, 2),
            },
            "versions": report.versions(),
        }


def run_recipe(config, output_dir=None, verbose="auto", *, resume=False,
               smoke=False, overwrite=False):
    """Runs a validated `RecipeConfig` and writes its run directory.

    Args:
        config: a `RecipeConfig`.
        output_dir: the run directory (default `runs/<name>-<time>`).
        verbose: Keras verbosity; 0 is silent.
        resume: continue the interrupted run in `output_dir` from its last
            checkpoint (same recipe required).
        smoke: check the wiring in seconds: random weights, synthetic
            data of the recipe's shapes, two steps per stage.
        overwrite: replace an existing non-empty `output_dir`.

    Returns:
        `(output_dir, metrics)` where `metrics` is what `metrics.json` holds.
    """
    run = RecipeRun(config, output_dir, verbose, resume=resume, smoke=smoke,
                    overwrite=overwrite)
    try:
        with process_settings(run.config):
            run.setup()
            run.train()
            metrics = run.finalize()
    finally:
        if not run.is_chief:  # a non-chief worker's scratch directory
            shutil.rmtree(run.write_dir, ignore_errors=True)
    return run.output_dir, metrics


def _median_step_seconds(rows):
    """Median seconds per training step, leaving out each stage's first
    epoch (it traces the train step) where the stage has more."""
    times = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        stage_rows = [r for r in rows if r["stage"] == stage and "step_seconds" in r]
        times.extend(r["step_seconds"] for r in stage_rows[1:] or stage_rows)
    return round(float(np.median(times)), 5) if times else None


def _stage_summaries(rows, histories, config):
    summaries = []
    for stage in config.stages:
        stage_rows = [r for r in rows if r["stage"] == stage.name]
        if not stage_rows:
            continue
        last = stage_rows[-1]
        history = next((h for h in histories if h.stage == stage.name), None)
        summaries.append({
            "name": stage.name,
            "epochs": len(stage_rows),
            "seconds": round(sum(r.get("seconds", 0.0) for r in stage_rows), 2),
            "trainable_params": int(last.get("trainable_params", 0)),
            "lr_found": getattr(history, "lr_found", None),
            "final": {k: v for k, v in last.items()
                      if k not in ("stage", "epoch", "seconds", "trainable_params",
                                   "step_seconds")
                      and not k.startswith("learning_rate")},
        })
    return summaries
