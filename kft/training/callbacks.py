"""Training callbacks: gradual unfreezing inside one `fit`, and an LR finder.

Keras fixes a model's trainable variables when `fit` builds its train
function, and an optimizer refuses variables it was not built with, so a
callback that sets `layer.trainable = True` during `fit` silently does
nothing. `GradualUnfreezing` makes the change real: it unfreezes the
blocks, rebuilds the optimizer for the new variables while keeping the
state of those that were already training (Adam moments, iteration
count, learning rate), and has `fit` trace a new train step.
"""

import contextlib
import math
import warnings

import keras
import numpy as np

from kft._keras_internals import WEIGHT_DECAY_ATTRIBUTES
from kft._keras_internals import distribute_strategy
from kft._keras_internals import mark_trainable_state_compiled
from kft._keras_internals import own_trainable_variables
from kft.backbones.anatomy import backbone_blocks_of
from kft.backbones.anatomy import count_params
from kft.backbones.anatomy import find_backbone
from kft.backbones.freezing import batch_norm_policy
from kft.backbones.freezing import leaves
from kft.backbones.freezing import unfreeze
from kft.training.stages import UnfreezeConfig
from kft.training.stages import validate

__all__ = ["GradualUnfreezing", "LRFinder", "LRFinderResult", "NonFiniteLoss",
           "StopOnNonFiniteLoss", "lr_find", "rebuild_optimizer"]


def _children(optimizer):
    if isinstance(optimizer, keras.optimizers.MultiOptimizer):
        return list(optimizer.optimizers)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return [optimizer.inner_optimizer]
    return []


# Not in get_config(): weight-decay exclusions and kft's group labels.
_OPTIMIZER_ATTRIBUTES = (*WEIGHT_DECAY_ATTRIBUTES, "kft_groups")


def _copy_state(old, new):
    inner_old = {id(v) for child in _children(old) for v in child.variables}
    inner_new = {id(v) for child in _children(new) for v in child.variables}
    values = {v.name: v for v in old.variables if id(v) not in inner_old}
    for variable in new.variables:
        if id(variable) in inner_new:
            continue
        source = values.get(variable.name)
        if source is not None and tuple(source.shape) == tuple(variable.shape):
            variable.assign(source)
    for attribute in _OPTIMIZER_ATTRIBUTES:
        if hasattr(old, attribute):
            setattr(new, attribute, getattr(old, attribute))
    for old_child, new_child in zip(_children(old), _children(new)):
        _copy_state(old_child, new_child)


def rebuild_optimizer(optimizer, variables):
    """A copy of `optimizer` built for `variables`, with the state kept.

    Slot variables (moments, accumulators), iteration counts and learning
    rate variables of the variables the optimizer already knew are copied
    over; new variables start with fresh slots. Works for any Keras
    optimizer, `MultiOptimizer` (new variables land in their group) and
    `LossScaleOptimizer`.
    """
    new = optimizer.__class__.from_config(optimizer.get_config())
    new.build(variables)
    if optimizer.built:
        _copy_state(optimizer, new)
    return new


def _retrace(model):
    """Makes `fit` use the current trainable variables from its next step."""
    optimizer = model.optimizer
    if optimizer is not None and optimizer.built:
        strategy = distribute_strategy(model)
        # Under a tf.distribute strategy the new slots must be mirrored.
        with strategy.scope() if strategy else contextlib.nullcontext():
            model.optimizer = rebuild_optimizer(optimizer,
                                                model.trainable_variables)
    model.make_train_function(force=True)
    # The flags changed deliberately and are now compiled in.
    mark_trainable_state_compiled(model)


class GradualUnfreezing(keras.callbacks.Callback):
    """Unfreezes backbone blocks, top first, at scheduled epochs of one `fit`.

    Args:
        schedule: `{epoch: n}`: from `epoch` (0-based, as Keras counts) on,
            the top `n` backbone blocks train (`"all"` for all of them).
            Blocks only ever unfreeze.
        backbone: name of the nested backbone model.
        every: instead of `schedule`, one more block every `every` epochs
            (fastai's gradual unfreezing): epoch `k * every` trains `k`
            blocks.
        bn: `"frozen"` keeps the backbone's BatchNorm layers frozen (in
            inference mode), `"train"` unfreezes them with their block;
            defaults to the model's `bn` policy.
        warmup_steps: after each unfreeze, ramp the learning rate from 0
            back to its value over this many steps (all groups together
            for a `kft.optimizers` optimizer; needs constant rates).
        start_epoch: schedule epochs count from this epoch of `fit` (used
            by `kft.fine_tune` stages that start after epoch 0).
        verbose: 1 logs one line per change.

    Works on the TensorFlow backend with any Keras optimizer, including
    `keras.optimizers.MultiOptimizer`. On other backends it raises an
    error at the start of `fit`; use `kft.fine_tune` stages there.

    Example:

    ```python
    model = kft.build_classifier("mobilenet_v2", 5, weights="imagenet")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    unfreezing = kft.callbacks.GradualUnfreezing({2: 1, 4: 3, 6: "all"})
    unfreezing.plan(model, epochs=8)
    model.fit(train, validation_data=val, epochs=8, callbacks=[unfreezing])
    ```
    """

    def __init__(self, schedule=None, backbone="backbone", *, every=None,
                 bn=None, warmup_steps=0, start_epoch=0, verbose=1):
        super().__init__()
        if schedule is not None and not isinstance(schedule, dict):
            raise ValueError("schedule must be a non-empty dict {epoch: "
                             f"n_blocks}}. Received: schedule={schedule!r}")
        # One definition of a valid schedule: the one stages use.
        validate(UnfreezeConfig, {"schedule": schedule, "every": every, "bn": bn,
                                  "warmup_steps": warmup_steps},
                 title="Invalid GradualUnfreezing arguments")
        self.schedule = dict(schedule) if schedule is not None else None
        self.backbone = backbone
        self.every = every
        self.bn = bn
        self.warmup_steps = int(warmup_steps)
        self.start_epoch = int(start_epoch)
        self.verbose = verbose
        self.events = []
        self._unfrozen = None
        self._warmup = None

    # --- the schedule ---

    def blocks_at(self, epoch, num_blocks):
        """Number of top blocks trainable at `epoch`."""
        epoch = epoch - self.start_epoch
        if epoch < 0:
            return 0
        if self.every is not None:
            return min(epoch // self.every, num_blocks)
        current = 0
        for start in sorted(self.schedule):
            if start <= epoch:
                value = self.schedule[start]
                current = num_blocks if value == "all" else min(value, num_blocks)
        return current

    def _blocks(self, model):
        try:
            return backbone_blocks_of(model, self.backbone)
        except ValueError as error:
            raise ValueError(f"GradualUnfreezing: {error}") from None

    def _batch_norm(self, model):
        policy = self.bn or batch_norm_policy(model, self.backbone)
        return policy == "train"

    def plan(self, model, epochs):
        """Returns (and prints) the schedule: one row per epoch.

        Each row: `epoch`, `blocks` (number trainable), `unfrozen` (names
        of the blocks added that epoch), `trainable_params`, `share`.
        """
        blocks = self._blocks(model)
        batch_norm = self._batch_norm(model)
        base = find_backbone(model, self.backbone)
        # What trains outside the backbone (the head) keeps training.
        outside = (count_params(model.trainable_weights)
                   - count_params(base.trainable_weights))
        total = count_params(model.weights)

        def block_params(layers):
            # Leaves: a transformer layer holds its weights in sublayers.
            return count_params(
                w for layer in layers for leaf in leaves(layer)
                if batch_norm or not isinstance(leaf, keras.layers.BatchNormalization)
                for w in own_trainable_variables(leaf)
            )

        rows, previous = [], 0
        for epoch in range(self.start_epoch, self.start_epoch + epochs):
            n = self.blocks_at(epoch, len(blocks))
            opened = blocks[len(blocks) - n:] if n else []
            params = outside + sum(block_params(ls) for _, ls in opened)
            rows.append({
                "epoch": epoch,
                "blocks": n,
                "unfrozen": [name for name, _ in blocks[len(blocks) - n:
                                                        len(blocks) - previous]]
                if n > previous else [],
                "trainable_params": params,
                "share": params / total if total else 0.0,
            })
            previous = n
        print(f"{'epoch':>5}  {'blocks':>6}  {'trainable':>12}  {'share':>6}  unfrozen")
        for r in rows:
            print(f"{r['epoch']:>5}  {r['blocks']:>6}  {r['trainable_params']:>12,}  "
                  f"{100 * r['share']:>5.1f}%  {', '.join(r['unfrozen'])}")
        return rows

    # --- Keras hooks ---

    def on_train_begin(self, logs=None):
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(
                "GradualUnfreezing changes the trainable variables inside "
                "a running fit(), which kft supports on the TensorFlow "
                f"backend only (this is {keras.backend.backend()!r}). Use "
                "kft.fine_tune with one stage per unfreezing step instead."
            )
        self._all_blocks = self._blocks(self.model)
        if self._unfrozen is None:
            self._unfrozen = 0

    def on_epoch_begin(self, epoch, logs=None):
        target = self.blocks_at(epoch, len(self._all_blocks))
        if target <= self._unfrozen:
            return
        names = [name for name, _ in
                 self._all_blocks[len(self._all_blocks) - target:
                                  len(self._all_blocks) - self._unfrozen]]
        unfreeze(self.model, last_n_blocks=target, backbone=self.backbone,
                 batch_norm=self._batch_norm(self.model))
        _retrace(self.model)
        self._unfrozen = target
        trainable, total = count_params(self.model.trainable_weights), count_params(
            self.model.weights)
        event = {"epoch": epoch, "blocks": target, "unfrozen": names,
                 "trainable_params": trainable, "total_params": total}
        self.events.append(event)
        if self.verbose:
            print(f"\nGradualUnfreezing: epoch {epoch + 1}: unfroze "
                  f"{', '.join(names)} ({target} of {len(self._all_blocks)} "
                  f"blocks); trainable {trainable:,} of {total:,} parameters "
                  f"({100 * trainable / max(total, 1):.1f}%)")
        if self.warmup_steps:
            self._start_warmup()

    def _start_warmup(self):
        optimizer = self.model.optimizer
        try:
            target = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        except (AttributeError, TypeError):
            warnings.warn("GradualUnfreezing: no warmup, the learning rate is "
                          "a schedule or cannot be read.", stacklevel=2)
            return
        self._warmup = [0, target]

    def on_train_batch_begin(self, batch, logs=None):
        if self._warmup is None:
            return
        step, target = self._warmup
        step += 1
        self.model.optimizer.learning_rate = target * min(1.0, step / self.warmup_steps)
        self._warmup = None if step >= self.warmup_steps else [step, target]


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss (`StopOnNonFiniteLoss`)."""

    def __init__(self, message, epoch, batch, loss):
        super().__init__(message)
        self.epoch, self.batch, self.loss = epoch, batch, loss


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops `fit` at the first NaN or infinite loss, by raising.

    Unlike `keras.callbacks.TerminateOnNaN`, which lets the epoch end (and
    so lets checkpoint callbacks save the broken weights), this raises
    `NonFiniteLoss` from the batch: callbacks after it in the list never
    see the bad epoch end. Put it before checkpointing callbacks.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(loss)
        if not math.isfinite(loss):
            epoch = getattr(self, "_epoch", 0) + 1
            raise NonFiniteLoss(
                f"the training loss became {loss} at epoch {epoch}, batch "
                f"{batch + 1}: training stopped (lower the learning rate, "
                "check the data for NaN or extreme values, or use float32)",
                epoch, batch + 1, loss)


class LRFinderResult:
    """The curve of an LR range test and its suggestions.

    Attributes:
        learning_rates, losses: the tested rates and smoothed losses.
        steepest: the rate where the loss falls fastest (per log-rate).
        minimum: the rate at the lowest loss, divided by 10 (fastai).
        suggestion: `steepest` (the rate to use).
    """

    def __init__(self, learning_rates, losses):
        self.learning_rates = np.asarray(learning_rates, dtype="float64")
        self.losses = np.asarray(losses, dtype="float64")
        n = len(self.losses)
        if n < 3:
            raise RuntimeError(
                f"The LR range test stopped after {n} steps: too few to "
                "suggest a rate. Lower start_lr or give more data."
            )
        logs = np.log10(self.learning_rates)
        # Skip the first and last 10%: the start is flat, the end diverges.
        lo, hi = max(1, n // 10), max(2, n - n // 10)
        slopes = np.gradient(self.losses, logs)
        self.steepest = float(self.learning_rates[lo + int(np.argmin(slopes[lo:hi]))])
        self.minimum = float(self.learning_rates[int(np.argmin(self.losses))] / 10)
        self.minimum = max(self.minimum, float(self.learning_rates[0]))
        self.suggestion = self.steepest

    def plot(self, path):
        """Saves loss against learning rate (log scale), suggestion marked."""
        from kft.training.report import figure

        fig = figure(figsize=(6, 4))
        ax = fig.subplots()
        ax.plot(self.learning_rates, self.losses)
        ax.axvline(self.suggestion, color="red", linestyle="--",
                   label=f"suggestion {self.suggestion:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss (smoothed)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)


class LRFinder(keras.callbacks.Callback):
    """Exponential learning-rate range test (Smith 2015, fastai's lr_find).

    Sets the learning rate before each batch, from `start_lr` to `end_lr`
    over `num_steps` steps, records the smoothed loss, and stops training
    when the loss exceeds `stop_factor` times the best one. It changes the
    weights: use `kft.lr_find`, which restores them.
    """

    def __init__(self, start_lr=1e-7, end_lr=10.0, num_steps=100,
                 stop_factor=4.0, beta=0.98):
        super().__init__()
        if not 0 < start_lr < end_lr:
            raise ValueError(
                "Need 0 < start_lr < end_lr. Received: "
                f"start_lr={start_lr}, end_lr={end_lr}")
        if num_steps < 3:
            raise ValueError(f"num_steps must be >= 3. Received: {num_steps}")
        self.start_lr, self.end_lr = float(start_lr), float(end_lr)
        self.num_steps = int(num_steps)
        self.stop_factor = float(stop_factor)
        self.beta = float(beta)

    def on_train_begin(self, logs=None):
        self.learning_rates, self.losses = [], []
        self._step, self._average, self._best = 0, 0.0, math.inf

    def _rate(self, step):
        return self.start_lr * (self.end_lr / self.start_lr) ** (
            step / (self.num_steps - 1))

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate = self._rate(self._step)

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", math.nan))
        self._average = self.beta * self._average + (1 - self.beta) * loss
        smoothed = self._average / (1 - self.beta ** (self._step + 1))
        if not math.isfinite(smoothed) or (
                self._step > 0 and smoothed > self.stop_factor * self._best):
            self.model.stop_training = True
            return
        self.learning_rates.append(self._rate(self._step))
        self.losses.append(smoothed)
        self._best = min(self._best, smoothed)
        self._step += 1
        if self._step >= self.num_steps:
            self.model.stop_training = True


def lr_find(model, data, start_lr=1e-7, end_lr=10.0, num_steps=100,
            stop_factor=4.0, plot_path=None):
    """Runs an LR range test and puts the model back as it was.

    The model must be compiled. Weights, optimizer state (moments,
    iterations) and learning rates are restored afterwards, exactly. With a
    `kft.optimizers` optimizer all groups are scaled together, keeping
    their ratios, and the result is the head's (largest) rate.

    Args:
        model: a compiled Keras model.
        data: a `tf.data.Dataset` of `(x, y)` batches (repeated as needed).
        start_lr: the start of the range, tested exponentially.
        end_lr: the end of the range.
        num_steps: steps of the test (fewer when the loss diverges).
        stop_factor: stop when the loss exceeds this times its best.
        plot_path: where to save the plot, if given.

    Returns:
        An `LRFinderResult`; `.suggestion` is the rate to use.
    """
    optimizer = model.optimizer
    if optimizer is None:
        raise ValueError("lr_find needs a compiled model (model.compile(...)).")
    try:
        original_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        optimizer.learning_rate = original_rate
    except (AttributeError, TypeError):
        raise ValueError(
            "lr_find sets the learning rate step by step, so the optimizer "
            "needs constant learning rates, not schedules."
        ) from None
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    weights = [np.array(v) for v in model.variables]
    state = [np.array(v) for v in optimizer.variables]
    finder = LRFinder(start_lr, end_lr, num_steps, stop_factor)
    try:
        model.fit(data.repeat(), epochs=1, steps_per_epoch=num_steps,
                  callbacks=[finder], verbose=0)
    finally:
        for variable, value in zip(model.variables, weights):
            variable.assign(value)
        for variable, value in zip(optimizer.variables, state):
            variable.assign(value)
        optimizer.learning_rate = original_rate
    result = LRFinderResult(finder.learning_rates, finder.losses)
    if plot_path:
        result.plot(plot_path)
    return result
