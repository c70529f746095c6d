"""Multi-worker training for real: two `kft run` processes on 127.0.0.1
under `distribution: multi_worker` (MultiWorkerMirroredStrategy, cluster
from TF_CONFIG) end with the weights of one process on the same global
batch; a worker SIGKILLed mid-epoch makes the other fail within seconds
(not hang), and both restarted with --resume finish with a complete
history."""

import csv
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import make_images

from kft.distribute.strategy import collective_timeout
from kft.recipes.checkpoint import read_state

# A worker: `kft run` (it makes the strategy before any tensor exists, as
# TensorFlow requires). KILL_AT: SIGKILL this worker
# after that many training steps (counted across stages), writing the time
# to KILL_STAMP first; STEP_STAMP: write the time of the first training
# step.
WORKER = """
import os, signal, sys, time
import keras
kill_at = int(os.environ.get("KILL_AT", "0"))
original = keras.callbacks.CallbackList.on_train_batch_end
steps = [0]
def stamp(name):
    with open(os.environ[name], "w") as f:
        f.write(repr(time.time()))
def on_train_batch_end(self, batch, logs=None):
    original(self, batch, logs)
    steps[0] += 1
    if steps[0] == 1 and os.environ.get("STEP_STAMP"):
        stamp("STEP_STAMP")
    if steps[0] == kill_at:
        stamp("KILL_STAMP")
        os.kill(os.getpid(), signal.SIGKILL)
keras.callbacks.CallbackList.on_train_batch_end = on_train_batch_end
from kft.cli import main
sys.exit(main(sys.argv[1:]))
"""

STEPS_PER_EPOCH = 3  # 24 training images, global batch 8
WAIT = 300  # seconds any one phase may take before the test gives up
_single = {}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_worker")
    x, y = make_images(32, classes=2)
    np.savez(root / "data.npz", x_train=x, y_train=y)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "two_workers",
        "model": {"backbone": "mobilenet_v2", "weights": "fashion_mnist",
                  "input_shape": [32, 32, 3], "backbone_kwargs": {"alpha": 0.35},
                  "head": {"dropout": 0.0}},
        # batch_size is the global batch: 4 per worker.
        "data": {"source": "numpy", "path": str(root / "data.npz"),
                 "batch_size": 8, "validation_split": 0.25, "shuffle": False},
        "distribution": {"strategy": "multi_worker"},
        "deterministic": True,
        "stages": [
            {"name": "head", "epochs": 1, "learning_rate": 1e-3},
            {"name": "top", "epochs": 2, "trainable": {"last_n_blocks": 2},
             "learning_rate": 1e-4},
        ],
    }))
    return path


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Cluster:
    """Two worker processes on loopback; `stop()` kills what is left."""

    def __init__(self, recipe, root):
        self.recipe, self.root = recipe, root
        self.ports = _free_ports(2)
        self.procs, self.logs = [], []

    def out(self, index=0):
        """The run directory, the same for both workers (shared storage on
        a real cluster): the chief writes it, the other worker writes a
        scratch directory and reads the chief's checkpoint on --resume."""
        return self.root / "run"

    def start(self, *extra, env=None):
        self.procs = []
        cluster = {"worker": [f"127.0.0.1:{p}" for p in self.ports]}
        for index in range(2):
            worker_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                          **(env or {}).get(index, {}),
                          "TF_CONFIG": json.dumps({"cluster": cluster, "task": {
                              "type": "worker", "index": index}})}
            worker_env.pop("KFT_COLLECTIVE_TIMEOUT", None)  # the default: off
            log = open(self.root / f"worker{index}-{len(self.logs)}.log", "w")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", WORKER, "run", str(self.recipe), "--quiet",
                 "--output-dir", str(self.out(index)), *extra],
                env=worker_env, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, index, seconds=WAIT):
        try:
            return self.procs[index].wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {index} still running after {seconds} s:\n"
                        + self.log_tail(index))

    def log_tail(self, index):
        self.logs[-2 + index].flush()
        return open(self.logs[-2 + index].name).read()[-3000:]

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for log in self.logs:
            log.close()


def _run_single(recipe, root):
    """The same recipe in one process (this one), no strategy."""
    if "weights" not in _single:
        from kft.cli import main

        out = root / "single"
        assert main(["run", str(recipe), "--quiet", "--output-dir", str(out),
                     "--set", "distribution=none"]) == 0
        _single["weights"] = _weights(out)
        _single["history"] = _history(out)
    return _single


def _weights(run_dir):
    import keras

    model = keras.saving.load_model(run_dir / "model.keras")
    return [np.asarray(w) for w in model.weights]


def _history(run_dir):
    return list(csv.DictReader(open(run_dir / "history.csv")))


def _max_difference(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_two_workers_match_one_process(recipe, tmp_path):
    cluster = Cluster(recipe, tmp_path)
    try:
        cluster.start()
        single = _run_single(recipe, recipe.parent)  # while the workers train
        for index in range(2):
            assert cluster.wait(index) == 0, cluster.log_tail(index)
    finally:
        cluster.stop()
    for out in (cluster.out(),):
        metrics = json.load(open(out / "metrics.json"))
        assert metrics["distribution"] == {"strategy": "multi_worker",
                                           "replicas": 2}
        # The same global batches as one process: the same weights, and
        # the same losses epoch by epoch.
        assert _max_difference(_weights(out), single["weights"]) < 1e-5
        rows = _history(out)
        assert [r["epoch"] for r in rows] == ["1", "2", "3"]
        np.testing.assert_allclose(
            [float(r["val_loss"]) for r in rows],
            [float(r["val_loss"]) for r in single["history"]], rtol=1e-5)


@pytest.mark.slow
def test_a_lost_worker_fails_its_peer_and_both_resume(recipe, tmp_path):
    cluster = Cluster(recipe, tmp_path)
    kill_stamp = tmp_path / "killed"
    step_stamp = tmp_path / "step_again"
    chief = cluster.out()
    try:
        # Worker 1 is SIGKILLed after the second step of epoch 2: the chief
        # has checkpointed epoch 1.
        kill_at = STEPS_PER_EPOCH + 2
        cluster.start(env={1: {"KILL_AT": str(kill_at),
                               "KILL_STAMP": str(kill_stamp)}})
        assert cluster.wait(1) == -9, cluster.log_tail(1)
        killed = float(kill_stamp.read_text())
        # Its peer fails within seconds (TensorFlow's coordination service
        # misses the lost worker's heartbeats), rather than hang.
        assert cluster.wait(0, seconds=120) == 1, cluster.log_tail(0)
        detected = time.time() - killed
        assert "run failed" in cluster.log_tail(0)
        assert not (chief / "metrics.json").exists()
        assert read_state(str(chief))["epochs_done"] == 1
        # Only the chief wrote: no other worker's files in the run directory.
        assert sorted(os.listdir(chief)) == ["checkpoints", "config.yaml",
                                             "history.csv", "plots"]

        cluster.start("--resume", env={0: {"STEP_STAMP": str(step_stamp)}})
        for index in range(2):
            assert cluster.wait(index) == 0, cluster.log_tail(index)
        again = float(step_stamp.read_text()) - killed
    finally:
        cluster.stop()
    print(f"\nlost worker: its peer failed {detected:.1f} s after the kill; "
          f"training ran again {again:.1f} s after the kill (restart included)")
    for out in (chief,):
        rows = _history(out)
        assert [r["epoch"] for r in rows] == ["1", "2", "3"]  # none lost or doubled
        assert [r["stage"] for r in rows] == ["head", "top", "top"]
    assert json.load(open(chief / "metrics.json"))["distribution"]["replicas"] == 2
    single = _run_single(recipe, recipe.parent)
    assert _max_difference(_weights(chief), single["weights"]) < 1e-5


def test_collective_timeout_is_off_unless_set(monkeypatch):
    monkeypatch.delenv("KFT_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() is None
    for value, seconds in (("0", None), ("", None), ("30", 30.0), ("2.5", 2.5)):
        monkeypatch.setenv("KFT_COLLECTIVE_TIMEOUT", value)
        assert collective_timeout() == seconds
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("KFT_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ValueError, match="KFT_COLLECTIVE_TIMEOUT"):
            collective_timeout()
