"""Multi-device training: MirroredStrategy over 2 logical CPU devices
matches single-device training on the same global batch."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import make_images

import kft

SCRIPT = """
import sys
import kft
devices = kft.distribute.split_cpu(2)
from kft.cli import main
code = 0
for recipe, out in zip(sys.argv[1::2], sys.argv[2::2]):
    code |= main(["run", recipe, "--quiet", "--output-dir", out])
sys.exit(code)
"""


def _recipe(tmp_path, name, distribution):
    x, y = make_images(32, classes=2)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=y)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name,
        "model": {"backbone": "mobilenet_v2", "weights": "fashion_mnist",
                  "input_shape": [32, 32, 3], "backbone_kwargs": {"alpha": 0.35},
                  "head": {"dropout": 0.0}},
        "data": {"source": "numpy", "path": str(tmp_path / "data.npz"),
                 "batch_size": 8, "validation_split": 0.25,
                 # The distributed iterator consumes an extra pass of a
                 # reshuffling dataset: same examples, other order.
                 "shuffle": False},
        "distribution": distribution,
        "callbacks": {"checkpoints": False},
        "stages": [
            {"name": "head", "epochs": 1, "learning_rate": 1e-3},
            # Per-group rates and unfreezing inside fit, under the strategy.
            {"name": "gradual", "epochs": 2, "trainable": "head",
             "learning_rate": {"head": 1e-3, "backbone": 1e-4},
             "unfreeze": {"every": 1}},
        ],
    }))
    return str(path)


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_matches_one_device(tmp_path):
    one = _recipe(tmp_path, "one", "none")
    two = _recipe(tmp_path, "two", {"strategy": "mirrored",
                                    "devices": ["/cpu:0", "/cpu:1"]})
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, one, str(tmp_path / "one"), two,
         str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = {n: json.load(open(tmp_path / n / "metrics.json"))
               for n in ("one", "two")}
    assert metrics["two"]["distribution"] == {"strategy": "mirrored", "replicas": 2}
    assert metrics["one"]["distribution"]["replicas"] == 1
    import keras

    weights = {n: keras.saving.load_model(tmp_path / n / "model.keras").weights
               for n in ("one", "two")}
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(weights["one"], weights["two"]))
    assert diff < 1e-5
    history = {n: open(tmp_path / n / "history.csv").read().splitlines()
               for n in ("one", "two")}
    assert len(history["one"]) == len(history["two"]) == 4


def test_strategy_errors_are_clear():

    with pytest.raises(ValueError, match="Allowed"):
        kft.distribute.make_strategy("horovod")
    with pytest.raises(ValueError, match="mirrored"):
        kft.distribute.make_strategy("multi_worker", devices=["/cpu:0"])
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    model = kft.build_classifier("mobilenet_v2", 2, input_shape=(32, 32, 3),
                                 alpha=0.35)  # built outside the scope
    x, y = make_images(8, classes=2)
    with pytest.raises(ValueError, match="strategy.scope"):
        kft.fine_tune(model, (x, y), stages=[{"epochs": 1}], strategy=strategy,
                      verbose=0)
