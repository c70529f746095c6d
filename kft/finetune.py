"""`fine_tune`: run training stages (head, then unfrozen blocks, ...).

Each stage says what trains, with which optimizer and learning rate, for
how many epochs. Between stages kft sets the trainable flags and compiles
again (Keras fixes the trainable variables when `fit` builds its train
function), continuing the epoch count so that the histories line up.
"""

import math
import time
from typing import Any
from typing import Literal

import keras
import pydantic
from pydantic import ConfigDict
from pydantic import Field

from kft.freezing import set_trainable
from kft.heads import head_kind
from kft.heads import loss_and_metrics
from kft.heads import outputs_logits
from kft.optimizers import OPTIMIZER_CLASSES

__all__ = ["OPTIMIZERS", "Stage", "fine_tune", "make_optimizer", "policy_stages"]

# The optimizer names stages accept (one table, shared with kft.optimizers).
OPTIMIZERS = OPTIMIZER_CLASSES


class _Strict(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


TRAINABLE_CHOICES = (
    "'head', 'all', 'none', 'keep', {last_n_blocks: k (int >= 0 or 'all')} or "
    "{layers: regex}"
)


def _check_trainable(value):
    if value in ("head", "all", "none", "keep"):
        return value
    if isinstance(value, dict) and len(value) == 1:
        (key, arg), = value.items()
        if key == "last_n_blocks" and (
            arg == "all" or (isinstance(arg, int) and not isinstance(arg, bool)
                             and arg >= 0)
        ):
            return {key: arg}
        if key == "layers" and isinstance(arg, str) and arg:
            return {key: arg}
    raise ValueError(f"must be {TRAINABLE_CHOICES}")


class EarlyStoppingConfig(_Strict):
    """`keras.callbacks.EarlyStopping` settings for one stage."""

    monitor: str = "val_loss"
    patience: int = Field(default=3, ge=0)
    min_delta: float = Field(default=0.0, ge=0)
    restore_best_weights: bool = True


class UnfreezeConfig(_Strict):
    """Gradual unfreezing during a stage (`kft.callbacks.GradualUnfreezing`).

    Epochs count from the start of the stage.
    """

    schedule: dict[int, int | Literal["all"]] | None = None
    every: int | None = Field(default=None, ge=1)
    bn: Literal["frozen", "train"] | None = None
    warmup_steps: int = Field(default=0, ge=0)

    @pydantic.model_validator(mode="after")
    def _one_of(self):
        if (self.schedule is None) == (self.every is None):
            raise ValueError("give either schedule: {epoch: n_blocks} or every: k")
        return self


class LRFindConfig(_Strict):
    """An LR range test before the stage (`kft.lr_find`)."""

    start_lr: float = Field(default=1e-7, gt=0)
    end_lr: float = Field(default=10.0, gt=0)
    num_steps: int = Field(default=100, ge=3)


class Stage(_Strict):
    """One training stage.

    Args:
        name: shown in logs and the run report.
        epochs: epochs in this stage.
        trainable: `"head"` (backbone frozen), `"all"`, `"none"`,
            `"keep"` (as LoRA or prompt tuning left it),
            `{"last_n_blocks": k}` or `{"layers": regex}` (head + those).
        learning_rate: peak learning rate; or per-group rates (see
            `kft.optimizers.discriminative`): a dict of rules such as
            `{"head": 1e-3, "backbone": 1e-5}` (key `"default"` for
            unmatched variables, else the smallest rate), or a
            `(low, high)` range spread over the blocks.
        layer_decay: layer-wise LR decay: the head at `learning_rate`,
            each block below at `layer_decay` times the one above.
        optimizer: a name from `kft.finetune.OPTIMIZERS` or a Keras
            optimizer instance (a fresh one per stage: Keras optimizers
            refuse variables they were not built with).
        weight_decay: weight decay for the named optimizer.
        schedule: `"constant"` or `"cosine"` (decays to
            `min_learning_rate` by the end of the stage).
        warmup_epochs: linear warmup from 0 to `learning_rate` (may be
            fractional).
        early_stopping: `True` or an `EarlyStoppingConfig` dict.
        unfreeze: gradual unfreezing inside the stage, e.g.
            `{"every": 1}` or `{"schedule": {0: 1, 2: 3}}` (epochs from the
            stage start; see `kft.callbacks.GradualUnfreezing`).
        lr_find: run `kft.lr_find` first and train at its suggestion
            (groups scaled together); `True` or `{start_lr, end_lr,
            num_steps}`.
        steps_per_epoch: steps per epoch when the data has no length.
        gradient_accumulation_steps: apply the summed gradients of this
            many batches at once (a larger effective batch).
        callbacks: extra Keras callbacks for this stage.
        loss, metrics: override what the head kind implies.
    """

    name: str = "stage"
    epochs: int = Field(ge=1)
    trainable: Any = "head"
    learning_rate: float | tuple[float, float] | dict[int | str, float] = 1e-3
    layer_decay: float | None = Field(default=None, gt=0, le=1)
    optimizer: str | keras.optimizers.Optimizer = "adam"
    weight_decay: float | None = Field(default=None, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: float = Field(default=0.0, ge=0)
    min_learning_rate: float = Field(default=0.0, ge=0)
    early_stopping: bool | EarlyStoppingConfig = False
    unfreeze: UnfreezeConfig | None = None
    lr_find: bool | LRFindConfig = False
    steps_per_epoch: int | None = Field(default=None, ge=1)
    gradient_accumulation_steps: int | None = Field(default=None, ge=2)
    callbacks: list[Any] = []
    loss: Any = None
    metrics: Any = None

    _trainable = pydantic.field_validator("trainable")(
        classmethod(lambda cls, value: _check_trainable(value))
    )

    @pydantic.field_validator("learning_rate")
    @classmethod
    def _positive_rates(cls, value):
        if isinstance(value, float) and value <= 0:
            raise ValueError("must be > 0")
        if isinstance(value, tuple) and not 0 < value[0] <= value[1]:
            raise ValueError("a range must be [low, high] with 0 < low <= high")
        if isinstance(value, dict) and (
            not value or any(v < 0 for v in value.values())
        ):
            raise ValueError("per-group rates must be a non-empty map of rates >= 0")
        return value

    @pydantic.model_validator(mode="after")
    def _decay_needs_one_rate(self):
        if self.layer_decay is not None and not isinstance(self.learning_rate, float):
            raise ValueError(
                "layer_decay takes one learning_rate (the head's), not groups")
        return self

    @pydantic.field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value):
        if isinstance(value, str) and value.lower() not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {value!r}; allowed: {sorted(OPTIMIZERS)}"
            )
        return value.lower() if isinstance(value, str) else value


def _steps_per_epoch(data, stage):
    if stage.steps_per_epoch:
        return stage.steps_per_epoch
    cardinality = getattr(data, "cardinality", None)
    if cardinality is not None:
        n = int(cardinality())
        if n > 0:
            return n
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return math.ceil(len(data[0]) / 32)
    return None


def _rate_schedule(peak, stage, steps_per_epoch):
    """A peak rate -> the stage's schedule around it (or the number)."""
    if peak == 0 or (stage.schedule == "constant" and not stage.warmup_epochs):
        return peak
    if not steps_per_epoch:
        raise ValueError(
            f"Stage {stage.name!r}: a learning-rate schedule needs the "
            "number of steps per epoch, and the data has no known "
            "length. Set steps_per_epoch in the stage."
        )
    total = steps_per_epoch * stage.epochs
    warmup = min(int(round(stage.warmup_epochs * steps_per_epoch)), total - 1)
    if stage.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else peak,
            decay_steps=max(total - warmup, 1),
            alpha=min(stage.min_learning_rate / peak, 1.0),
            warmup_target=peak if warmup else None,
            warmup_steps=warmup,
        )
    # alpha=1: after the warmup the rate stays at warmup_target.
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=1,
        alpha=1.0,
        warmup_target=peak,
        warmup_steps=warmup,
    )


def make_optimizer(stage, steps_per_epoch=None, model=None):
    """Builds the optimizer (with its LR schedule) for a `Stage`.

    A number as `learning_rate` gives one optimizer; a dict of rules or a
    `(low, high)` range gives per-group rates, and `layer_decay` layer-wise
    decay (`kft.optimizers`), each group with the stage's schedule.
    """
    from kft import optimizers

    if isinstance(stage.optimizer, keras.optimizers.Optimizer):
        return stage.optimizer
    kwargs = {}
    if stage.weight_decay is not None:
        kwargs["weight_decay"] = stage.weight_decay
    if stage.gradient_accumulation_steps:
        kwargs["gradient_accumulation_steps"] = stage.gradient_accumulation_steps
    rate = stage.learning_rate
    if stage.layer_decay is not None or not isinstance(rate, float):
        if model is None:
            raise ValueError(
                f"Stage {stage.name!r}: per-group learning rates need the model."
            )
    if stage.layer_decay is not None:
        return optimizers.layerwise_lr_decay(
            model, _rate_schedule(rate, stage, steps_per_epoch),
            stage.layer_decay, optimizer=stage.optimizer, **kwargs)
    if isinstance(rate, tuple):
        rate = optimizers.lr_range_rules(model, *rate)
    if isinstance(rate, dict):
        rules = dict(rate)
        default = rules.pop("default", min(rules.values()))
        return optimizers.discriminative(
            model,
            {k: _rate_schedule(v, stage, steps_per_epoch) for k, v in rules.items()},
            optimizer=stage.optimizer,
            default_lr=_rate_schedule(default, stage, steps_per_epoch),
            **kwargs,
        )
    return OPTIMIZERS[stage.optimizer](
        learning_rate=_rate_schedule(rate, stage, steps_per_epoch), **kwargs)


def _describe_rate(stage):
    rate = stage.learning_rate
    if stage.layer_decay is not None:
        return f"lr={rate:g} x {stage.layer_decay:g}^depth"
    if isinstance(rate, tuple):
        return f"lr={rate[0]:g}..{rate[1]:g} over blocks"
    if isinstance(rate, dict):
        return "lr=" + ", ".join(f"{k}: {v:g}" for k, v in rate.items())
    return f"lr={rate:g}"


def _labels_one_hot(data):
    spec = getattr(data, "element_spec", None)
    if spec is not None and isinstance(spec, tuple) and len(spec) >= 2:
        shape = spec[1].shape
        return shape.rank == 2 and (shape[-1] or 0) > 1
    if isinstance(data, (tuple, list)) and len(data) == 2:
        y = data[1]
        return getattr(y, "ndim", 1) == 2 and y.shape[-1] > 1
    return False


def _as_stage(value, index):
    if isinstance(value, Stage):
        return value
    try:
        return Stage.model_validate(value)
    except pydantic.ValidationError as error:
        from kft.recipes.errors import format_validation_error

        raise ValueError(
            format_validation_error(error, prefix=f"stages.{index}")
        ) from None


def model_strategy(model):
    """The `tf.distribute` strategy a model was built under, or None."""
    return getattr(model, "_distribute_strategy", None)


def _strategy_scope(model, strategy):
    """A context factory: the strategy's scope, or nothing."""
    import contextlib

    built_under = model_strategy(model)
    if strategy is not None and built_under is not strategy:
        raise ValueError(
            "fine_tune(strategy=...): the model was not built under this "
            "strategy. Build it inside `with strategy.scope():` (kft recipes "
            "do this for `distribution:`).")
    strategy = strategy or built_under
    return strategy.scope if strategy is not None else contextlib.nullcontext


def _compiled_from_checkpoint(model):
    """Whether a loaded model came back with its training compile (keras-hub
    tasks come back compiled with their own defaults instead)."""
    return (getattr(model, "compiled", False)
            and not type(model).__module__.startswith("keras_hub"))


def _trainable_counts(model):
    def count(weights):
        return int(sum(math.prod(w.shape) for w in weights))

    return count(model.trainable_weights), count(model.weights)


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
    strategy=None,
):
    """Trains a model in stages, recompiling between them.

    Args:
        model: a model from `kft.build_classifier` (any Keras model works
            when each stage gives `loss` and uses `"all"`/`"none"` or
            `{"layers": ...}`).
        train_data: a batched `tf.data.Dataset` of `(x, y)`, or a tuple
            `(x, y)` of arrays.
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
        strategy: a `tf.distribute` strategy (`MirroredStrategy`,
            `MultiWorkerMirroredStrategy`, `TPUStrategy`) the model was
            built under (`with strategy.scope(): model = ...`). Optimizers
            (per-group ones included) and metrics are created in its scope;
            batches of the data are global batches, split across replicas,
            and learning rates are used as given. Default: the strategy
            the model was built under, if any.

    Callbacks with an `on_stage_begin(index, name, start_epoch)` method
    are told when each stage starts.

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
    if policy is not None:
        stages = policy_stages(policy, stages, epochs, freeze_epochs, every,
                                learning_rate)
    if not stages:
        raise ValueError("stages is empty: give at least one stage.")
    stages = [_as_stage(s, i) for i, s in enumerate(stages)]
    scope = _strategy_scope(model, strategy)
    x, y = train_data, None
    if isinstance(train_data, (tuple, list)) and len(train_data) == 2:
        x, y = train_data
    one_hot = _labels_one_hot(train_data)
    say = print if verbose != 0 else (lambda *a, **k: None)

    histories = []
    epochs_done = 0
    first, stage_start, resumed = 0, 0, False
    if resume_from is not None:
        first, stage_start, epochs_done = (int(v) for v in resume_from)
        resumed = epochs_done > stage_start
    for number, stage in enumerate(stages, start=1):
        if number - 1 < first:
            continue
        if not (resumed and number - 1 == first):
            stage_start = epochs_done
        for callback in callbacks or []:
            if hasattr(callback, "on_stage_begin"):
                callback.on_stage_begin(number - 1, stage.name, stage_start)
        found = None
        resuming = resumed and number - 1 == first
        if resuming:
            # Mid-stage resume: the model comes compiled from its checkpoint
            # (keras-hub tasks do not restore their compile config: those
            # are compiled again below, with fresh optimizer state).
            say(f"Resuming stage {number}/{len(stages)} '{stage.name}' at "
                f"epoch {epochs_done + 1}")
        else:
            set_trainable(model, stage.trainable)
        trainable, total = _trainable_counts(model)
        if not resuming or not _compiled_from_checkpoint(model):
            loss, metrics = stage.loss, stage.metrics
            if loss is None:
                kind_loss, kind_metrics = loss_and_metrics(
                    head_kind(model), one_hot, from_logits=outputs_logits(model))
                loss = kind_loss
                metrics = kind_metrics if metrics is None else metrics
            steps = _steps_per_epoch(train_data, stage)
            with scope():
                if stage.lr_find and not resuming:
                    stage, found = _find_rate(model, stage, train_data, loss,
                                              metrics, say)
                model.compile(
                    optimizer=make_optimizer(stage, steps, model),
                    loss=loss,
                    metrics=metrics,
                )
        # kft's own stage callbacks first, so that the caller's (a run
        # checkpoint, say) see the result of early stopping's restore.
        stage_callbacks = list(stage.callbacks)
        if stage.unfreeze is not None:
            from kft.callbacks import GradualUnfreezing

            config = stage.unfreeze
            stage_callbacks.append(GradualUnfreezing(
                config.schedule, every=config.every, bn=config.bn,
                warmup_steps=config.warmup_steps, start_epoch=stage_start,
                verbose=1 if verbose != 0 else 0,
            ))
        if stage.early_stopping:
            config = stage.early_stopping
            if config is True:
                config = EarlyStoppingConfig()
            monitor = config.monitor
            if val_data is None and monitor.startswith("val_"):
                monitor = monitor[len("val_"):]
            stage_callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor=monitor,
                    patience=config.patience,
                    min_delta=config.min_delta,
                    restore_best_weights=config.restore_best_weights,
                    verbose=1 if verbose != 0 else 0,
                )
            )
        stage_callbacks.extend(callbacks or [])
        optimizer_name = (stage.optimizer if isinstance(stage.optimizer, str)
                          else type(stage.optimizer).__name__)
        say(
            f"Stage {number}/{len(stages)} '{stage.name}': {stage.epochs} "
            f"epoch(s), {optimizer_name} "
            f"{_describe_rate(stage)} ({stage.schedule}), trainable "
            f"{trainable:,} of {total:,} parameters "
            f"({100.0 * trainable / max(total, 1):.1f}%)"
        )
        start = time.perf_counter()
        history = model.fit(
            x,
            y,
            validation_data=val_data,
            epochs=stage_start + stage.epochs,
            initial_epoch=epochs_done,
            steps_per_epoch=stage.steps_per_epoch,
            # A tf.data pipeline shuffles itself; arrays are shuffled by fit.
            shuffle=y is not None,
            callbacks=stage_callbacks,
            verbose=verbose,
        )
        history.stage = stage.name
        history.seconds = time.perf_counter() - start
        history.trainable_params = trainable
        history.lr_found = found
        histories.append(history)
        epochs_done += len(history.epoch)
        say(_stage_result(stage, history))
    return histories


def policy_stages(policy, stages, epochs, freeze_epochs, every, learning_rate):
    """The stages a named policy stands for (see `fine_tune`)."""
    if policy != "gradual":
        raise ValueError(f"Unknown policy. Allowed: 'gradual'. Received: {policy!r}")
    if stages:
        raise ValueError("Pass either stages=[...] or policy=..., not both.")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(
            f"policy='gradual' needs epochs >= 1 (the epochs after the head "
            f"stage). Received: epochs={epochs!r}")
    result = []
    if freeze_epochs:
        result.append({"name": "head", "epochs": freeze_epochs,
                       "trainable": "head", "learning_rate": learning_rate})
    result.append({"name": "gradual", "epochs": epochs, "trainable": "head",
                   "learning_rate": learning_rate,
                   "unfreeze": {"every": every}})
    return result


def _find_rate(model, stage, train_data, loss, metrics, say):
    """Runs lr_find with the stage's groups; returns the re-rated stage."""
    from kft.callbacks import lr_find

    config = stage.lr_find
    if not isinstance(config, LRFindConfig):
        config = LRFindConfig()
    constant = stage.model_copy(update={"schedule": "constant", "warmup_epochs": 0.0})
    model.compile(optimizer=make_optimizer(constant, None, model), loss=loss,
                  metrics=metrics)
    data = train_data
    if isinstance(train_data, (tuple, list)):
        import tensorflow as tf

        data = tf.data.Dataset.from_tensor_slices(tuple(train_data)).batch(32)
    result = lr_find(model, data, config.start_lr, config.end_lr, config.num_steps)
    rate = stage.learning_rate
    if isinstance(rate, float):
        new_rate = result.suggestion
    elif isinstance(rate, tuple):
        new_rate = (rate[0] * result.suggestion / rate[1], result.suggestion)
    else:
        top = max(rate.values())
        new_rate = {k: v * result.suggestion / top for k, v in rate.items()}
    say(f"Stage '{stage.name}': lr_find suggests {result.suggestion:.3g} "
        f"(steepest descent; loss minimum/10 at {result.minimum:.3g})")
    return stage.model_copy(update={"learning_rate": new_rate}), result.suggestion


def _stage_result(stage, history):
    parts = [f"Stage '{stage.name}' done in {history.seconds:.1f} s"]
    for key in ("val_accuracy", "val_loss", "accuracy", "loss"):
        values = history.history.get(key)
        if values:
            best = max(values) if "accuracy" in key else min(values)
            parts.append(f"{key} {values[-1]:.4f} (best {best:.4f})")
            break
    return ": ".join(parts[:1]) + (": " + parts[1] if len(parts) > 1 else "")
