"""Per-epoch run state: history rows, atomic checkpoints, resume.

After every epoch the run directory gets the epoch's row in
`history.csv`, the model (weights, optimizer state, trainable flags) in
`checkpoints/` (`kft.recipes.resume`: weights, optimizer, random states,
trainable flags, early-stopping state), and `checkpoints/state.json`
saying which stage and epoch that checkpoint ends and where the training
data stood. Checkpoints are written under a temporary name and renamed,
so a crash never leaves a half-written "latest" checkpoint; a write that
fails (a full disk) keeps the last good one and says so.
"""

import csv
import json
import os
import shutil
import time
import warnings

import keras

from kft._keras_internals import optimizer_map
from kft._keras_internals import optimizer_rate
from kft.backbones.anatomy import count_params
from kft.recipes.resume import restore_callbacks
from kft.recipes.resume import restore_optimizer
from kft.recipes.resume import save_checkpoint

__all__ = ["RunCheckpoint", "learning_rates", "read_history", "read_state",
           "write_history"]

STATE = "state.json"


def _atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_history(path):
    """Rows of a run's `history.csv` (integers as int, other numbers as
    float).

    A column a row has no value in (a per-group `learning_rate/<group>`
    of another stage, say) is left out of that row's dict.
    """
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out = {}
            for key, value in row.items():
                if key == "stage":
                    out[key] = value
                elif key == "epoch":
                    out[key] = int(value)
                elif value not in ("", None):
                    # Counts (trainable_params) were written as integers:
                    # keep them so, so that a rewrite leaves the file as is.
                    out[key] = (int(value) if value.lstrip("-").isdigit()
                                else float(value))
            rows.append(out)
    return rows


def write_history(path, rows):
    """Writes rows (dicts) with `stage, epoch` first, atomically.

    The columns are every key of any row, in the order they first appear;
    a row without a column (stages with different learning-rate groups)
    leaves that cell empty.
    """
    keys = ["stage", "epoch"]
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_state(run_dir):
    """The checkpoint state of a run directory, or None."""
    path = os.path.join(run_dir, "checkpoints", STATE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        state = json.load(f)
    checkpoint = os.path.join(run_dir, "checkpoints", state["checkpoint"])
    if not os.path.exists(checkpoint):
        return None
    state["path"] = checkpoint
    return state


def _rate_at(optimizer, step):
    """One optimizer's learning rate at `step`, as a float."""
    rate = optimizer_rate(optimizer)
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        value = rate(step)
    else:
        value = optimizer.learning_rate  # a variable, number or callable
    # 7 significant digits: what a float32 rate holds, without the
    # float32 -> float64 noise (0.0010000000474974513).
    return float(f"{float(keras.ops.convert_to_numpy(value)):.7g}")


def _group_labels(optimizer):
    """`{id(inner optimizer): label}` for a `MultiOptimizer`'s groups.

    kft's per-group optimizers (`kft.optimizers`) label their groups
    (`kft_groups`: the rule, block or layer name); another `OptimizerMap`
    group is labelled by its regex, and unmatched variables by `default`.
    """
    groups = optimizer_map(optimizer)
    if not isinstance(groups, keras.optimizers.OptimizerMap):
        return {}  # a selector function: groups are numbered
    # `regex in groups` is always true: an OptimizerMap falls back to its
    # default optimizer instead of raising KeyError. Compare the keys.
    regexes = list(groups)
    labels = {}
    for label, regex in getattr(optimizer, "kft_groups", []):
        if regex in regexes:
            labels.setdefault(id(groups[regex]), str(label))
    for regex in regexes:
        labels.setdefault(id(groups[regex]), regex)
    labels.setdefault(id(groups.default_optimizer), "default")
    return labels


def learning_rates(optimizer):
    """The learning rates an optimizer trains at now, by history column.

    Schedules are evaluated at the optimizer's iteration count (the steps
    taken). A plain optimizer gives `{"learning_rate": rate}`; a
    `keras.optimizers.MultiOptimizer` (`kft.optimizers`) gives one
    `learning_rate/<group>` column per group plus `learning_rate`, the
    largest of them (for kft's optimizers, the rate `ReduceLROnPlateau`
    reads and scales). A
    `LossScaleOptimizer` (mixed precision) reports its inner optimizer.

    Args:
        optimizer: a Keras optimizer, e.g. `model.optimizer`.

    Returns:
        A dict of column name -> float.

    Example:

    >>> learning_rates(keras.optimizers.SGD(0.5))
    {'learning_rate': 0.5}
    """
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    step = optimizer.iterations
    if not isinstance(optimizer, keras.optimizers.MultiOptimizer):
        return {"learning_rate": _rate_at(optimizer, step)}
    labels = _group_labels(optimizer)
    groups = {}
    for index, inner in enumerate(optimizer.optimizers):
        label = labels.get(id(inner), f"group_{index}")
        column, suffix = f"learning_rate/{label}", 2
        while column in groups:  # two groups under one label
            column, suffix = f"learning_rate/{label}#{suffix}", suffix + 1
        # Every group at the MultiOptimizer's step: a group whose
        # variables are all frozen never steps its own counter.
        groups[column] = _rate_at(inner, step)
    return {"learning_rate": max(groups.values(), default=0.0), **groups}


class RunCheckpoint(keras.callbacks.Callback):
    """Writes history rows and checkpoints of a recipe run after each epoch.

    `kft.fine_tune` tells it the stage through `on_stage_begin` and hands
    it the stage's callbacks (`set_stage_callbacks`), whose state the
    checkpoint keeps.

    Args:
        run_dir: the run directory.
        save_checkpoints: write `checkpoints/` (history rows are always
            written).
        data: the training data, when it is a `tracked_dataset`: its
            position goes into `state.json`.
        resume: the `read_state` of the checkpoint a resumed run starts
            from: the optimizer and callback states are restored when its
            first `fit` begins.
    """

    def __init__(self, run_dir, save_checkpoints=True, data=None, resume=None):
        super().__init__()
        self.run_dir = run_dir
        self.history_path = os.path.join(run_dir, "history.csv")
        self.checkpoint_dir = os.path.join(run_dir, "checkpoints")
        self.save_checkpoints = save_checkpoints
        self.stage_index, self.stage_name, self.stage_start = 0, "", 0
        self.data = data if hasattr(data, "fast_forward") else None
        self.resume = resume
        self.stage_callbacks = []
        os.makedirs(self.checkpoint_dir, exist_ok=True)

    def on_stage_begin(self, index, name, start_epoch):
        self.stage_index, self.stage_name = index, name
        self.stage_start = start_epoch

    def set_stage_callbacks(self, callbacks):
        """The stage's callbacks (`EarlyStopping`'s state is checkpointed)."""
        self.stage_callbacks = [c for c in callbacks if c is not self]

    def on_train_begin(self, logs=None):
        resume, self.resume = self.resume, None
        if resume is not None and resume["epochs_done"] > resume["stage_start"]:
            # Mid-stage: the stage was compiled afresh, as it was first.
            restore_optimizer(self.model, resume["path"])
            restore_callbacks(self.stage_callbacks, resume["path"])

    def on_train_batch_end(self, batch, logs=None):
        if self.data is not None:
            self.data.drawn += 1

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()
        self._train_seconds = None

    def on_test_begin(self, logs=None):
        # Validation starts: the epoch's training steps are done (no batch
        # hooks, so the training loop keeps its pace).
        if getattr(self, "_train_seconds", 0) is None:
            self._train_seconds = time.perf_counter() - self._started

    def on_epoch_end(self, epoch, logs=None):
        row = {"stage": self.stage_name, "epoch": epoch + 1}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        if self.model.optimizer is not None:
            row.update(learning_rates(self.model.optimizer))
        row["trainable_params"] = count_params(self.model.trainable_weights)
        seconds = time.perf_counter() - self._started
        row["seconds"] = round(seconds, 3)
        steps = (self.params or {}).get("steps")
        if steps:
            train_seconds = self._train_seconds or seconds
            row["step_seconds"] = round(train_seconds / steps, 5)
        # Order matters for a crash at any point: the model file, then the
        # history row, then the state that points at both. A resume
        # truncates history.csv to the state's epoch.
        name = self._save_model(self.stage_index, epoch + 1)
        rows = [r for r in read_history(self.history_path)
                if r["epoch"] <= epoch]
        write_history(self.history_path, rows + [row])
        self._save_state(name, self.stage_index, self.stage_start, epoch + 1)

    def on_train_end(self, logs=None):
        # The stage is over (possibly early, with restored best weights):
        # the next stage starts from this model.
        done = max([r["epoch"] for r in read_history(self.history_path)] or [0])
        name = self._save_model(self.stage_index + 1, done)
        self._save_state(name, self.stage_index + 1, done, done)

    def _save_model(self, stage, epochs_done):
        if not self.save_checkpoints:
            return None
        name = f"stage{stage}-epoch{epochs_done:04d}"
        try:
            save_checkpoint(self.model, os.path.join(self.checkpoint_dir, name),
                            self.stage_callbacks)
        except OSError as error:  # a full disk, a quota, a vanished mount
            state = read_state(self.run_dir)
            kept = ("no earlier checkpoint exists" if state is None else
                    f"the last good checkpoint (after epoch "
                    f"{state['epochs_done']}) is kept: {state['path']}")
            warnings.warn(f"kft: the checkpoint after epoch {epochs_done} was "
                          f"not written ({error}); {kept}. Training goes on.",
                          stacklevel=2)
            return None
        return name

    def _save_state(self, name, stage, stage_start, epochs_done):
        if name is None:
            return
        state = {"stage": stage, "stage_start": stage_start,
                 "epochs_done": epochs_done, "checkpoint": name}
        if self.data is not None:
            state["data"] = {"iterators": self.data.iterators,
                             "drawn": self.data.drawn}
        _atomic_write(os.path.join(self.checkpoint_dir, STATE),
                      json.dumps(state, indent=2))
        for old in os.listdir(self.checkpoint_dir):
            if old not in (name, STATE):
                path = os.path.join(self.checkpoint_dir, old)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
