"""history.csv: the learning-rate columns a RunCheckpoint writes."""

import csv
import math

import keras
import numpy as np
import pytest
from conftest import make_images
from conftest import tiny_classifier

import kft
from kft.recipes.checkpoint import RunCheckpoint
from kft.recipes.checkpoint import learning_rates
from kft.recipes.checkpoint import read_history
from kft.recipes.checkpoint import write_history

STEPS = 4  # per epoch: 16 images, batches of 4


def _train(tmp_path, stages):
    x, y = make_images(16, classes=2)
    data = kft.data.from_numpy(x, y, batch_size=4, shuffle=False)
    kft.fine_tune(tiny_classifier(2), data.train, stages=stages, verbose=0,
                  callbacks=[RunCheckpoint(str(tmp_path), save_checkpoints=False)])
    path = tmp_path / "history.csv"
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    return header, read_history(str(path))


def _cosine(peak, step, total, floor=0.0):
    alpha = floor / peak
    return peak * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * step / total))
                   + alpha)


def test_learning_rate_column_follows_a_cosine_schedule(tmp_path):
    header, rows = _train(tmp_path, [
        {"name": "head", "epochs": 2, "learning_rate": 1e-3,
         "schedule": "cosine", "min_learning_rate": 1e-4}])
    assert "learning_rate" in header
    rates = [row["learning_rate"] for row in rows]
    # The rate at each epoch's end: the schedule at the steps taken.
    np.testing.assert_allclose(
        rates, [_cosine(1e-3, STEPS, 2 * STEPS, 1e-4),
                _cosine(1e-3, 2 * STEPS, 2 * STEPS, 1e-4)], rtol=1e-5)
    assert rates[0] > rates[1]
    np.testing.assert_allclose(rates[1], 1e-4, rtol=1e-5)


def test_one_learning_rate_column_per_group(tmp_path):
    header, rows = _train(tmp_path, [
        {"name": "head", "epochs": 1, "learning_rate": 1e-3},
        {"name": "groups", "epochs": 2, "trainable": "head",
         "learning_rate": {"head": 1e-3, "default": 1e-5},
         "schedule": "cosine"}])
    assert {"learning_rate/head", "learning_rate/default"} <= set(header)
    head, first, second = rows
    # A stage with one rate has no group columns.
    assert head["learning_rate"] == pytest.approx(1e-3)
    assert not any(key.startswith("learning_rate/") for key in head)
    for row, step in ((first, STEPS), (second, 2 * STEPS)):
        expected = {"head": _cosine(1e-3, step, 2 * STEPS),
                    "default": _cosine(1e-5, step, 2 * STEPS)}
        # The default group has no trainable variable ("trainable: head"),
        # so its own step counter stays at 0: the column still follows
        # the stage's steps.
        for group, rate in expected.items():
            assert row[f"learning_rate/{group}"] == pytest.approx(
                rate, rel=1e-5, abs=1e-12)
        assert row["learning_rate"] == pytest.approx(expected["head"],
                                                     rel=1e-5, abs=1e-12)
    assert first["learning_rate/head"] == pytest.approx(5e-4, rel=1e-5)
    assert first["learning_rate/default"] == pytest.approx(5e-6, rel=1e-5)

    # Resume rewrites history.csv from read_history's rows: nothing changes,
    # though the rows have different columns.
    path = str(tmp_path / "history.csv")
    with open(path) as f:
        before = f.read()
    write_history(path, read_history(path))
    with open(path) as f:
        assert f.read() == before


def test_learning_rates_of_any_keras_optimizer():
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, 10, 0.5)
    sgd = keras.optimizers.SGD(schedule)
    sgd.iterations.assign(10)
    assert learning_rates(sgd) == {"learning_rate": pytest.approx(0.5)}
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.25))
    assert learning_rates(scaled) == {"learning_rate": 0.25}
    # A MultiOptimizer not built by kft: groups named by their regex.
    groups = keras.optimizers.OptimizerMap(keras.optimizers.SGD(0.1))
    groups["encoder/.*"] = keras.optimizers.SGD(0.01)
    rates = learning_rates(keras.optimizers.MultiOptimizer(groups))
    assert rates == {
        "learning_rate": pytest.approx(0.1),
        "learning_rate/encoder/.*": pytest.approx(0.01),
        "learning_rate/default": pytest.approx(0.1),
    }
