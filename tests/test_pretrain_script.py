"""The script that builds the packaged quickstart backbone (needs Fashion-MNIST)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import kft
from kft.data.builtin import FASHION_MNIST_DIRS

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts",
                      "pretrain_quickstart_backbone.py")


@pytest.mark.large
@pytest.mark.skipif(
    not any(os.path.isdir(d) for d in FASHION_MNIST_DIRS),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_pretrain_script_writes_loadable_weights_and_holdout(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, "--epochs", "1", "--limit", "512",
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    weights = tmp_path / "mobilenet_v2_035_fashion_mnist.weights.h5"
    model = kft.build_classifier("mobilenet_v2", 4, weights=str(weights),
                                 input_shape=(32, 32, 3), alpha=0.35)
    assert model.predict(np.zeros((1, 32, 32, 3)), verbose=0).shape == (1, 4)
    with np.load(tmp_path / "fashion_mnist_holdout.npz") as holdout:
        assert holdout["x_train"].shape == (800, 28, 28)
        assert holdout["x_val"].shape == (400, 28, 28)
        assert list(holdout["class_names"]) == ["Shirt", "Sneaker", "Bag",
                                                "Ankle boot"]
