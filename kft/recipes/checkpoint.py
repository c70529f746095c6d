"""Per-epoch run state: history rows, atomic checkpoints, resume.

After every epoch the run directory gets the epoch's row in
`history.csv`, the model (weights, optimizer state, trainable flags) in
`checkpoints/`, and `checkpoints/state.json` saying which stage and epoch
that checkpoint ends. Files are written to a temporary name and renamed,
so a crash never leaves a half-written "latest" checkpoint.
"""

import csv
import glob
import json
import math
import os
import time

import keras

__all__ = ["RunCheckpoint", "read_history", "read_state", "write_history"]

STATE = "state.json"


def _atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_history(path):
    """Rows of a run's `history.csv` (numbers as floats, epoch as int)."""
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
                    out[key] = float(value)
            rows.append(out)
    return rows


def write_history(path, rows):
    """Writes rows (dicts) with `stage, epoch` first, atomically."""
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


def _count(weights):
    return int(sum(math.prod(w.shape) for w in weights))


class RunCheckpoint(keras.callbacks.Callback):
    """Writes history rows and checkpoints of a recipe run after each epoch.

    `kft.fine_tune` tells it the stage through `on_stage_begin`.
    """

    def __init__(self, run_dir, save_checkpoints=True):
        super().__init__()
        self.run_dir = run_dir
        self.history_path = os.path.join(run_dir, "history.csv")
        self.checkpoint_dir = os.path.join(run_dir, "checkpoints")
        self.save_checkpoints = save_checkpoints
        self.stage_index, self.stage_name, self.stage_start = 0, "", 0
        os.makedirs(self.checkpoint_dir, exist_ok=True)

    def on_stage_begin(self, index, name, start_epoch):
        self.stage_index, self.stage_name = index, name
        self.stage_start = start_epoch

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
        row["trainable_params"] = _count(self.model.trainable_weights)
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
        name = f"stage{stage}-epoch{epochs_done:04d}.keras"
        path = os.path.join(self.checkpoint_dir, name)
        self.model.save(path + ".tmp.keras")
        os.replace(path + ".tmp.keras", path)
        return name

    def _save_state(self, name, stage, stage_start, epochs_done):
        if name is None:
            return
        state = {"stage": stage, "stage_start": stage_start,
                 "epochs_done": epochs_done, "checkpoint": name}
        _atomic_write(os.path.join(self.checkpoint_dir, STATE),
                      json.dumps(state, indent=2))
        for old in glob.glob(os.path.join(self.checkpoint_dir, "*.keras")):
            if os.path.basename(old) != name:
                os.remove(old)
