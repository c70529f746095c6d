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
