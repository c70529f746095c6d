"""What a training stage says: `Stage` and its parts, as plain data.

One definition of each rule, shared by `kft.fine_tune` (Python) and the
recipes (YAML), and free of Keras so that `kft validate` checks a recipe
without starting TensorFlow: what may train (`parse_trainable`), gradual
unfreezing schedules (`UnfreezeConfig`), the named policies
(`policy_stages`) and the optimizer names (`OPTIMIZERS`).
"""

import sys
from typing import Any
from typing import Literal

import pydantic
from pydantic import Field

from kft.backbones.trainable import TRAINABLE_CHOICES
from kft.backbones.trainable import parse_trainable
from kft.utils.validation import Strict
from kft.utils.validation import format_validation_error

__all__ = [
    "OPTIMIZERS",
    "POLICIES",
    "EarlyStoppingConfig",
    "LRFindConfig",
    "Stage",
    "UnfreezeConfig",
    "as_stage",
    "parse_trainable",
    "policy_stages",
    "validate",
]

# Optimizer names a stage accepts -> the `keras.optimizers` class.
OPTIMIZERS = {
    "adam": "Adam",
    "adamw": "AdamW",
    "sgd": "SGD",
    "rmsprop": "RMSprop",
    "nadam": "Nadam",
    "adamax": "Adamax",
    "adagrad": "Adagrad",
    "lion": "Lion",
    "lamb": "Lamb",
}
POLICIES = ("gradual",)


def validate(model_class, values, prefix="", title=None):
    """`model_class.model_validate(values)`, or a `ValueError` whose lines
    name each bad key, its value and what is allowed."""
    if isinstance(values, model_class):
        return values
    try:
        return model_class.model_validate(values)
    except pydantic.ValidationError as error:
        raise ValueError(format_validation_error(
            error, prefix=prefix, model=model_class,
            title=title or f"Invalid {model_class.__name__}")) from None


class EarlyStoppingConfig(Strict):
    """`keras.callbacks.EarlyStopping` settings for one stage."""

    monitor: str = "val_loss"
    patience: int = Field(default=3, ge=0)
    min_delta: float = Field(default=0.0, ge=0)
    restore_best_weights: bool = True


class UnfreezeConfig(Strict):
    """Gradual unfreezing (`kft.callbacks.GradualUnfreezing`): from epoch
    `e` of `schedule` on, the top `n` blocks train (`"all"` for all); or
    one more block `every` k epochs. Epochs count from the stage start."""

    schedule: dict[int, Any] | None = None
    every: int | None = Field(default=None, ge=1)
    bn: Literal["frozen", "train"] | None = None
    warmup_steps: int = Field(default=0, ge=0)

    @pydantic.field_validator("schedule")
    @classmethod
    def _blocks(cls, schedule):
        if schedule is not None and not schedule:
            raise ValueError("schedule must be a non-empty map {epoch: n_blocks}")
        for epoch, blocks in (schedule or {}).items():
            if epoch < 0:
                raise ValueError(f"schedule epochs must be >= 0, not {epoch}")
            if blocks != "all" and (not isinstance(blocks, int)
                                    or isinstance(blocks, bool) or blocks < 0):
                raise ValueError("schedule values must be a number of blocks "
                                 f">= 0 or 'all', not {epoch}: {blocks!r}")
        return schedule

    @pydantic.model_validator(mode="after")
    def _one_of(self):
        if (self.schedule is None) == (self.every is None):
            raise ValueError("give either schedule: {epoch: n_blocks} or every: "
                             "k, not both")
        return self


class LRFindConfig(Strict):
    """An LR range test before the stage (`kft.lr_find`)."""

    start_lr: float = Field(default=1e-7, gt=0)
    end_lr: float = Field(default=10.0, gt=0)
    num_steps: int = Field(default=100, ge=3)


def _is_keras_optimizer(value):
    # A Python user passing an optimizer object has Keras imported already;
    # recipes only ever give names, so validation never imports Keras.
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(value, keras.optimizers.Optimizer)


class Stage(Strict):
    """One training stage.

    Attributes:
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
        lora_lr_ratio: LoRA+ (`kft.optimizers.loraplus`): the LoRA `B`
            matrices at this many times `learning_rate`, everything else
            (`A`, a head, DoRA magnitudes) at `learning_rate`; the
            schedule drives both. Recipes set it from `lora.lr_ratio`.
        optimizer: a name from `kft.stages.OPTIMIZERS` or a Keras
            optimizer instance (a fresh one per stage: Keras optimizers
            refuse variables they were not built with).
        weight_decay: weight decay for the named optimizer.
        schedule: `"constant"` or `"cosine"` (decays to
            `min_learning_rate` by the end of the stage).
        warmup_epochs: linear warmup from 0 to `learning_rate` (may be
            fractional).
        early_stopping: `True` or an `EarlyStoppingConfig` dict.
        unfreeze: gradual unfreezing inside the stage, e.g.
            `{"every": 1}` or `{"schedule": {0: 1, 2: 3}}`.
        lr_find: run `kft.lr_find` first and train at its suggestion
            (groups scaled together); `True` or `{start_lr, end_lr,
            num_steps}`.
        steps_per_epoch: steps per epoch when the data has no length.
        gradient_accumulation_steps: apply the summed gradients of this
            many batches at once (a larger effective batch).
        callbacks: extra Keras callbacks for this stage.
        loss, metrics: override what the model's head implies.
    """

    name: str = "stage"
    epochs: int = Field(ge=1)
    trainable: Any = "head"
    learning_rate: float | tuple[float, float] | dict[int | str, float] = 1e-3
    layer_decay: float | None = Field(default=None, gt=0, le=1)
    lora_lr_ratio: float | None = Field(default=None, gt=0)
    optimizer: Any = "adam"
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

    @pydantic.field_validator("trainable")
    @classmethod
    def _trainable(cls, value):
        try:
            return parse_trainable(value)
        except ValueError:
            raise ValueError(f"must be {TRAINABLE_CHOICES}") from None

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
        if self.lora_lr_ratio is not None and not (
                self.layer_decay is None and isinstance(self.learning_rate, float)):
            raise ValueError(
                "lora_lr_ratio (LoRA+) takes one learning_rate (A's), not "
                "per-group rates or layer_decay")
        return self

    @pydantic.field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value):
        if isinstance(value, str) and value.lower() in OPTIMIZERS:
            return value.lower()
        if _is_keras_optimizer(value):
            return value
        raise ValueError(
            f"unknown optimizer {value!r}; allowed: {sorted(OPTIMIZERS)} or a "
            "keras.optimizers.Optimizer instance")


def as_stage(value, index):
    """A `Stage`, or a dict of its fields validated into one."""
    return validate(Stage, value, prefix=f"stages.{index}", title="Invalid stage")


def policy_stages(policy, epochs, freeze_epochs=1, every=1, learning_rate=1e-3):
    """The stages a named policy stands for.

    `"gradual"` (fastai / ULMFiT): the head alone for `freeze_epochs`, then
    `epochs` more epochs in which one more backbone block unfreezes every
    `every` epochs, all at `learning_rate`.
    """
    if policy not in POLICIES:
        raise ValueError(
            f"Unknown policy. Allowed: {', '.join(map(repr, POLICIES))}. "
            f"Received: {policy!r}")
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
