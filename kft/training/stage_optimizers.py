"""The optimizer a `Stage` describes: one rate or per-group rates, with
the stage's warmup and cosine schedule around each."""

import math

import keras

from kft.training import optimizers

__all__ = ["make_optimizer", "rate_schedule", "steps_per_epoch"]


def steps_per_epoch(data, stage):
    """Training steps in one epoch of `data` (None when unknown)."""
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


def rate_schedule(peak, stage, steps):
    """A peak rate -> the stage's schedule around it (or the number)."""
    if peak == 0 or (stage.schedule == "constant" and not stage.warmup_epochs):
        return peak
    if not steps:
        raise ValueError(
            f"Stage {stage.name!r}: a learning-rate schedule needs the "
            "number of steps per epoch, and the data has no known "
            "length. Set steps_per_epoch in the stage."
        )
    total = steps * stage.epochs
    warmup = min(int(round(stage.warmup_epochs * steps)), total - 1)
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
        initial_learning_rate=0.0, decay_steps=1, alpha=1.0,
        warmup_target=peak, warmup_steps=warmup,
    )


def make_optimizer(stage, steps=None, model=None):
    """Builds the optimizer (with its LR schedule) for a `Stage`.

    A number as `learning_rate` gives one optimizer; a dict of rules or a
    `(low, high)` range gives per-group rates, `layer_decay` layer-wise
    decay and `lora_lr_ratio` LoRA+ (`kft.optimizers`), each group with
    the stage's schedule.

    Args:
        stage: a `kft.Stage`.
        steps: training steps per epoch (for schedules).
        model: the model (for per-group rates).
    """
    if not isinstance(stage.optimizer, str):
        return stage.optimizer
    kwargs = {}
    if stage.weight_decay is not None:
        kwargs["weight_decay"] = stage.weight_decay
    if stage.gradient_accumulation_steps:
        kwargs["gradient_accumulation_steps"] = stage.gradient_accumulation_steps
    rate = stage.learning_rate
    grouped = (stage.layer_decay is not None or not isinstance(rate, float)
               or stage.lora_lr_ratio is not None)
    if grouped and model is None:
        raise ValueError(
            f"Stage {stage.name!r}: per-group learning rates need the model.")
    if stage.lora_lr_ratio is not None:
        return optimizers.loraplus(
            model, rate_schedule(rate, stage, steps), stage.lora_lr_ratio,
            optimizer=stage.optimizer, **kwargs)
    if stage.layer_decay is not None:
        return optimizers.layerwise_lr_decay(
            model, rate_schedule(rate, stage, steps), stage.layer_decay,
            optimizer=stage.optimizer, **kwargs)
    if isinstance(rate, tuple):
        rate = optimizers.lr_range_rules(model, *rate)
    if isinstance(rate, dict):
        rules = dict(rate)
        default = rules.pop("default", min(rules.values()))
        return optimizers.discriminative(
            model,
            {k: rate_schedule(v, stage, steps) for k, v in rules.items()},
            optimizer=stage.optimizer,
            default_lr=rate_schedule(default, stage, steps), **kwargs)
    return optimizers.OPTIMIZER_CLASSES[stage.optimizer](
        learning_rate=rate_schedule(rate, stage, steps), **kwargs)
