"""Timing helpers shared by the benchmarks."""

import time

import keras


class EpochTimer(keras.callbacks.Callback):
    """Wall time of every epoch, in `self.times`."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step, in `self.times`."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def count_traces(model):
    """Counts Python calls of train_step: in graph mode, one per trace.

    Returns a one-item list that holds the count as training goes on.
    """
    count = [0]
    train_step = model.train_step

    def counted(data):
        count[0] += 1
        return train_step(data)

    model.train_step = counted
    return count


def synthetic_images(steps, size=96, classes=4, batch_size=32):
    """A cached, repeating dataset of `steps` batches of random images."""
    import numpy as np

    import kft

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch_size * steps, size, size, 3)).astype("float32")
    y = rng.integers(0, classes, len(x))
    data = kft.data.from_numpy(x, y, batch_size=batch_size, shuffle=False).train
    return data.cache().repeat()
