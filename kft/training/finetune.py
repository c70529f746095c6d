"""`fine_tune`: run training stages (head, then unfrozen blocks, ...).

Each stage says what trains, with which optimizer and learning rate, for
how many epochs. `fine_tune` first resolves the stages (or a named
policy) and the resume point into a `TrainingPlan`; then, for each
planned stage, `prepare_stage` sets the trainable flags, the loss, the
optimizer and the callbacks and compiles (Keras fixes the trainable
variables when `fit` builds its train function), and `fit_stage` runs
`model.fit`, continuing the epoch count so that the histories line up.
"""

import contextlib
import dataclasses
import time

import keras

from kft._keras_internals import distribute_strategy
from kft.backbones.anatomy import count_params
from kft.backbones.anatomy import describe
from kft.backbones.freezing import set_trainable
from kft.losses.causal_lm import causal_lm_loss_and_metrics
from kft.models.heads import head_kind
from kft.models.heads import loss_and_metrics
from kft.models.heads import outputs_logits
from kft.training.callbacks import GradualUnfreezing
from kft.training.callbacks import lr_find
from kft.training.stage_optimizers import make_optimizer
from kft.training.stage_optimizers import steps_per_epoch
from kft.training.stages import EarlyStoppingConfig
from kft.training.stages import LRFindConfig
from kft.training.stages import Stage
from kft.training.stages import as_stage
from kft.training.stages import policy_stages

__all__ = ["PlannedStage", "Stage", "TrainingPlan", "compile_stage", "fine_tune",
           "fit_stage", "make_optimizer", "plan_training", "prepare_stage"]


@dataclasses.dataclass(frozen=True)
class PlannedStage:
    """One stage of a `TrainingPlan`.

    Attributes:
        index: position among all the stages (0-based).
        count: the number of stages in the plan.
        stage: the validated `Stage`.
        resume_start: for a stage interrupted mid-way, the epoch it had
            started at (it continues with the model as it is); else None.
    """

    index: int
    count: int
    stage: Stage
    resume_start: int | None = None


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """The stages still to run, and the epochs already done before them."""

    stages: tuple
    epochs_done: int = 0


def plan_training(stages=None, *, policy=None, epochs=None, freeze_epochs=1,
                  every=1, learning_rate=1e-3, resume_from=None):
    """Resolves stages (or a named policy) and a resume point into a plan.

    Args:
        stages: `Stage`s or dicts of their fields.
        policy, epochs, freeze_epochs, every, learning_rate: a named
            policy instead of `stages` (see `kft.stages.policy_stages`).
        resume_from: `(stage_index, stage_start_epoch, epochs_done)` of an
            interrupted run.

    Returns:
        A `TrainingPlan`.
    """
    if policy is not None:
        if stages:
            raise ValueError("Pass either stages=[...] or policy=..., not both.")
        stages = policy_stages(policy, epochs, freeze_epochs, every, learning_rate)
    if not stages:
        raise ValueError("stages is empty: give at least one stage.")
    stages = [as_stage(s, i) for i, s in enumerate(stages)]
    first, stage_start, epochs_done = 0, 0, 0
    if resume_from is not None:
        first, stage_start, epochs_done = (int(v) for v in resume_from)
    planned = tuple(
        PlannedStage(index, len(stages), stage,
                     stage_start if index == first and epochs_done > stage_start
                     else None)
        for index, stage in enumerate(stages) if index >= first)
    return TrainingPlan(planned, epochs_done)


@dataclasses.dataclass
class _Session:
    """What every stage of one `fine_tune` call shares."""

    model: keras.Model
    train_data: object
    val_data: object
    callbacks: list
    verbose: object
    scope: object
    recompile_on_resume: bool = False

    def say(self, message):
        if self.verbose != 0:
            print(message)


@dataclasses.dataclass
class PreparedStage:
    """A stage ready to fit: compiled model, callbacks, what trains."""

    planned: PlannedStage
    stage: Stage
    start_epoch: int
    callbacks: list
    trainable_params: int
    total_params: int
    lr_found: float | None = None


def _strategy_scope(model, strategy):
    """A context factory: the strategy's scope, or nothing."""
    built_under = distribute_strategy(model)
    if strategy is not None and built_under is not strategy:
        raise ValueError(
            "fine_tune(strategy=...): the model was not built under this "
            "strategy. Build it inside `with strategy.scope():` (kft recipes "
            "do this for `distribution:`).")
    strategy = strategy or built_under
    return strategy.scope if strategy is not None else contextlib.nullcontext


def _labels_one_hot(data):
    spec = getattr(data, "element_spec", None)
    if spec is not None and isinstance(spec, tuple) and len(spec) >= 2:
        shape = spec[1].shape
        return shape.rank == 2 and (shape[-1] or 0) > 1
    if isinstance(data, (tuple, list)) and len(data) == 2:
        y = data[1]
        return getattr(y, "ndim", 1) == 2 and y.shape[-1] > 1
    return False


def _compiled_from_checkpoint(model):
    """Whether a loaded model came back with its training compile (keras-hub
    tasks come back compiled with their own defaults instead)."""
    return (getattr(model, "compiled", False)
            and not type(model).__module__.startswith("keras_hub"))


def _loss_and_metrics(session, stage):
    if stage.loss is not None:
        return stage.loss, stage.metrics
    if getattr(session.model, "computes_own_loss", False):
        # e.g. kft.preference.PreferenceCausalLM: its loss and metrics are
        # its own (compile(loss="auto")).
        return "auto", None
    if describe(session.model).task == "causal_lm":
        # SFT batches weight completion tokens only: the loss is averaged
        # over weighted tokens, the token accuracy weighted the same way.
        return causal_lm_loss_and_metrics()
    loss, metrics = loss_and_metrics(
        head_kind(session.model), _labels_one_hot(session.train_data),
        from_logits=outputs_logits(session.model))
    return loss, metrics if stage.metrics is None else stage.metrics


def _compile(session, stage, resuming):
    """Compiles the stage's optimizer and loss; returns the lr_find rate."""
    found = None
    loss, metrics = _loss_and_metrics(session, stage)
    steps = steps_per_epoch(session.train_data, stage)
    with session.scope():
        if stage.lr_find and not resuming:
            stage, found = _find_rate(session, stage, loss, metrics)
        # Metrics see the sample weights where batches carry them (SFT).
        metric_key = ("weighted_metrics"
                      if describe(session.model).task == "causal_lm" else "metrics")
        session.model.compile(optimizer=make_optimizer(stage, steps, session.model),
                              loss=loss, **{metric_key: metrics})
    return stage, found


def compile_stage(model, train_data, stage):
    """Compiles `model` as `fine_tune` compiles `stage` (its loss, metrics
    and optimizer), e.g. to evaluate a model rebuilt after its last stage.
    """
    session = _Session(model, train_data, None, [], 0,
                       _strategy_scope(model, None))
    _compile(session, as_stage(stage, 0), resuming=True)


def _stage_callbacks(session, stage, start_epoch):
    """kft's own stage callbacks first, so that the caller's (a run
    checkpoint, say) see the result of early stopping's restore."""
    result = list(stage.callbacks)
    loud = 1 if session.verbose != 0 else 0
    if stage.unfreeze is not None:
        config = stage.unfreeze
        result.append(GradualUnfreezing(
            config.schedule, every=config.every, bn=config.bn,
            warmup_steps=config.warmup_steps, start_epoch=start_epoch,
            verbose=loud))
    if stage.early_stopping:
        config = stage.early_stopping
        if config is True:
            config = EarlyStoppingConfig()
        monitor = config.monitor
        if session.val_data is None and monitor.startswith("val_"):
            monitor = monitor[len("val_"):]
        result.append(keras.callbacks.EarlyStopping(
            monitor=monitor, patience=config.patience,
            min_delta=config.min_delta,
            restore_best_weights=config.restore_best_weights, verbose=loud))
    return result + list(session.callbacks)


def prepare_stage(session, planned, start_epoch):
    """Sets what trains, compiles and gathers the callbacks of one stage.

    A stage resumed mid-way keeps the model's flags and, when the model
    came compiled from its checkpoint (and `recompile_on_resume` is off),
    its optimizer state.
    """
    for callback in session.callbacks:
        if hasattr(callback, "on_stage_begin"):
            callback.on_stage_begin(planned.index, planned.stage.name, start_epoch)
    resuming = planned.resume_start is not None
    stage, found = planned.stage, None
    if not resuming:
        set_trainable(session.model, stage.trainable)
    if (not resuming or session.recompile_on_resume
            or not _compiled_from_checkpoint(session.model)):
        stage, found = _compile(session, stage, resuming)
    callbacks = _stage_callbacks(session, stage, start_epoch)
    for callback in session.callbacks:
        if hasattr(callback, "set_stage_callbacks"):
            callback.set_stage_callbacks(callbacks)
    return PreparedStage(
        planned=planned, stage=stage, start_epoch=start_epoch,
        callbacks=callbacks,
        trainable_params=count_params(session.model.trainable_weights),
        total_params=count_params(session.model.weights), lr_found=found)


def fit_stage(session, prepared, initial_epoch):
    """Runs `model.fit` for a prepared stage; returns its `History` with
    `.stage`, `.seconds`, `.trainable_params` and `.lr_found`."""
    stage = prepared.stage
    session.say(_stage_line(prepared))
    x, y = session.train_data, None
    if isinstance(x, (tuple, list)) and len(x) == 2:
        x, y = x
    start = time.perf_counter()
    history = session.model.fit(
        x, y, validation_data=session.val_data,
        epochs=prepared.start_epoch + stage.epochs, initial_epoch=initial_epoch,
        steps_per_epoch=stage.steps_per_epoch,
        # A tf.data pipeline shuffles itself; arrays are shuffled by fit.
        shuffle=y is not None, callbacks=prepared.callbacks,
        verbose=session.verbose)
    history.stage = stage.name
    history.seconds = time.perf_counter() - start
    history.trainable_params = prepared.trainable_params
    history.lr_found = prepared.lr_found
    session.say(_stage_result(stage, history))
    return history


def fine_tune(
    model,
    train_data,
    val_data=None,
    *,
    stages=None,
    callbacks=None,
    verbose="auto",
    policy=None,
    epochs=None,
    freeze_epochs=1,
    every=1,
    learning_rate=1e-3,
    resume_from=None,
    recompile_on_resume=False,
    strategy=None,
):
    """Trains a model in stages, recompiling between them.

    Args:
        model: a model from `kft.build_classifier` or
            `kft.build_text_classifier` (any Keras model works when each
            stage gives `loss` and uses `"all"`/`"none"` or
            `{"layers": ...}`). A keras-hub `CausalLM` (from
            `kft.build_causal_lm`) trains inside `kft.sft.SFTCausalLM`,
            which shares its weights (its own `fit` would run its
            preprocessor on tokenised batches again): `model.generate`
            then uses what it learned.
        train_data: a batched `tf.data.Dataset` of `(x, y)`, or a tuple
            `(x, y)` of arrays (for a causal LM, `kft.data.sft_dataset`'s
            `(x, y, sample_weight)` batches).
        val_data: the same for validation, or `None`.
        stages: a list of `Stage`s or dicts of their fields, e.g.
            `{"name": "head", "epochs": 5, "trainable": "head",
            "learning_rate": 1e-3}`.
        callbacks: Keras callbacks for every stage.
        verbose: passed to `fit`; `0` also silences kft's stage lines.
        policy: instead of `stages`, `"gradual"` (fastai / ULMFiT style):
            the head alone for `freeze_epochs`, then `epochs` more epochs
            in which one more backbone block unfreezes every `every`
            epochs, all at `learning_rate`.
        resume_from: `(stage_index, stage_start_epoch, epochs_done)` to
            continue an interrupted run: earlier stages are skipped, and a
            stage interrupted mid-way continues with the model as it is
            (compiled, with its optimizer state, e.g. from a checkpoint).
        recompile_on_resume: compile the interrupted stage afresh anyway
            (its optimizer state is restored by a callback: kft recipes'
            `RunCheckpoint`).
        strategy: a `tf.distribute` strategy the model was built under
            (`with strategy.scope(): model = ...`). Optimizers (per-group
            ones included) and metrics are created in its scope; batches
            are global batches, split across replicas, and learning rates
            are used as given. Default: the model's own strategy, if any.

    Callbacks with an `on_stage_begin(index, name, start_epoch)` method
    are told when each stage starts; those with a
    `set_stage_callbacks(callbacks)` method get the stage's full callback
    list (early stopping, unfreezing: a checkpoint keeps their state).

    Returns:
        A list with the `keras.callbacks.History` of each stage; each has
        `.stage` (its name) and `.seconds` (wall time of its `fit`).

    Example:

    ```python
    model = kft.build_classifier("mobilenet_v2", 5, weights="imagenet")
    kft.fine_tune(model, train, val, stages=[
        {"name": "head", "epochs": 5, "trainable": "head",
         "learning_rate": 1e-3},
        {"name": "top", "epochs": 5, "trainable": {"last_n_blocks": 3},
         "learning_rate": 1e-5},
    ])
    ```
    """
    plan = plan_training(stages, policy=policy, epochs=epochs,
                         freeze_epochs=freeze_epochs, every=every,
                         learning_rate=learning_rate, resume_from=resume_from)
    scope = _strategy_scope(model, strategy)
    with scope():
        model = _trainable_model(model)
    session = _Session(model, train_data, val_data, list(callbacks or []),
                       verbose, scope, recompile_on_resume)
    histories, epochs_done = [], plan.epochs_done
    for planned in plan.stages:
        resuming = planned.resume_start is not None
        start_epoch = planned.resume_start if resuming else epochs_done
        if resuming:
            session.say(f"Resuming stage {planned.index + 1}/{planned.count} "
                        f"'{planned.stage.name}' at epoch {epochs_done + 1}")
        prepared = prepare_stage(session, planned, start_epoch)
        history = fit_stage(session, prepared, initial_epoch=epochs_done)
        epochs_done += len(history.epoch)
        histories.append(history)
    return histories


def _trainable_model(model):
    """A keras-hub `CausalLM` inside `kft.sft.SFTCausalLM` (same weights);
    any other model as it is."""
    if not type(model).__module__.startswith("keras_hub"):
        return model  # kft's own models, SFTCausalLM included
    if describe(model).task != "causal_lm":
        return model
    from kft.sft.model import SFTCausalLM

    return SFTCausalLM(model)


def _find_rate(session, stage, loss, metrics):
    """Runs lr_find with the stage's groups; returns the re-rated stage."""
    model, data = session.model, session.train_data
    config = stage.lr_find
    if not isinstance(config, LRFindConfig):
        config = LRFindConfig()
    constant = stage.model_copy(update={"schedule": "constant", "warmup_epochs": 0.0})
    model.compile(optimizer=make_optimizer(constant, None, model), loss=loss,
                  metrics=metrics)
    if isinstance(data, (tuple, list)):
        import tensorflow as tf

        data = tf.data.Dataset.from_tensor_slices(tuple(data)).batch(32)
    result = lr_find(model, data, config.start_lr, config.end_lr, config.num_steps)
    rate = stage.learning_rate
    if isinstance(rate, float):
        new_rate = result.suggestion
    elif isinstance(rate, tuple):
        new_rate = (rate[0] * result.suggestion / rate[1], result.suggestion)
    else:
        top = max(rate.values())
        new_rate = {k: v * result.suggestion / top for k, v in rate.items()}
    session.say(f"Stage '{stage.name}': lr_find suggests {result.suggestion:.3g} "
                f"(steepest descent; loss minimum/10 at {result.minimum:.3g})")
    return stage.model_copy(update={"learning_rate": new_rate}), result.suggestion


def _describe_rate(stage):
    rate = stage.learning_rate
    if stage.layer_decay is not None:
        return f"lr={rate:g} x {stage.layer_decay:g}^depth"
    if isinstance(rate, tuple):
        return f"lr={rate[0]:g}..{rate[1]:g} over blocks"
    if isinstance(rate, dict):
        return "lr=" + ", ".join(f"{k}: {v:g}" for k, v in rate.items())
    return f"lr={rate:g}"


def _stage_line(prepared):
    stage, planned = prepared.stage, prepared.planned
    optimizer = (stage.optimizer if isinstance(stage.optimizer, str)
                 else type(stage.optimizer).__name__)
    share = 100.0 * prepared.trainable_params / max(prepared.total_params, 1)
    return (f"Stage {planned.index + 1}/{planned.count} '{stage.name}': "
            f"{stage.epochs} epoch(s), {optimizer} {_describe_rate(stage)} "
            f"({stage.schedule}), trainable {prepared.trainable_params:,} of "
            f"{prepared.total_params:,} parameters ({share:.1f}%)")


def _stage_result(stage, history):
    line = f"Stage '{stage.name}' done in {history.seconds:.1f} s"
    for key in ("val_accuracy", "val_loss", "accuracy", "loss"):
        values = history.history.get(key)
        if values:
            best = max(values) if "accuracy" in key else min(values)
            return f"{line}: {key} {values[-1]:.4f} (best {best:.4f})"
    return line
