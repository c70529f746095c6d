"""The JAX backend: a subset of kft (fine_tune with per-group rates,
augmentation, LoRA) runs there, and TensorFlow-only features say so."""

import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_subset_passes_on_the_jax_backend():
    pytest.importorskip("jax", reason="jax not installed (test extra: jax[cpu])")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p",
         "no:cacheprovider",
         os.path.join(HERE, "jax_subset.py")],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # Every test of the subset ran (none skipped, whatever their number).
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed in .*", summary), result.stdout[-2000:]
