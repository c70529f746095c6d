"""Steps/s with 1 device vs MirroredStrategy over 2 logical CPU devices;
two local worker processes (MultiWorkerMirroredStrategy) vs one process;
seconds from a lost worker to training again.

The CPU is split into two logical devices (`kft.distribute.split_cpu`), so
the same cores do the work either way: this shows that distributed
training runs (and what its overhead is), not a speed-up. On a machine
with GPUs, `distribution: mirrored` uses them all.

MobileNetV2 (alpha 0.35, 96 px), every layer trainable, global batch 32,
per-group learning rates (a `MultiOptimizer`), median of epochs 2..N.

"two local workers vs one": the same recipe (MobileNetV2 alpha 0.35, 96
px, all layers, global batch 32, deterministic, unshuffled) run by `kft
run` in one process, then by two worker processes on 127.0.0.1 (TF_CONFIG,
`distribution: multi_worker`, 16 images per worker and step): seconds per
epoch and the largest weight difference. On one machine this is a
correctness and overhead figure (the gradient all-reduce goes over gRPC on
loopback, both processes share the cores), not a scaling claim.

"seconds from a lost worker to training again": worker 1 (or `--lose 0`,
the chief) is SIGKILLed mid-epoch 2; the other fails (TensorFlow's
coordination service misses the heartbeats, or the connection drops);
both are restarted with `--resume` on the same TF_CONFIG.

    python benchmarks/distributed.py [--steps 10] [--epochs 4] [--lose 1]
        [--only mirrored|workers|lost]
"""

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kft

DEVICES = kft.distribute.split_cpu(2)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from _timing import EpochTimer  # noqa: E402
from _timing import synthetic_images  # noqa: E402


def steps_per_second(strategy, data, steps, epochs):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = kft.build_classifier("mobilenet_v2", 4, input_shape=(96, 96, 3),
                                     alpha=0.35)
    timer = EpochTimer()
    kft.fine_tune(model, data, stages=[
        {"name": "all", "epochs": epochs, "trainable": "all",
         "learning_rate": {"head": 1e-3, "backbone": 1e-4},
         "steps_per_epoch": steps}],
        callbacks=[timer], verbose=0,
        strategy=strategy if strategy.num_replicas_in_sync > 1 else None)
    return steps / statistics.median(timer.times[1:])


# A worker: the strategy first (TensorFlow sets up collective ops once,
# before any tensor exists), then `kft run`. KILL_AT: SIGKILL itself after
# that many training steps, writing the time to KILL_STAMP first;
# STEP_STAMP: write the time of the first training step.
WORKER = """
import os, signal, sys, time
import keras
import kft
kft.distribute.make_strategy("multi_worker")
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


def write_recipe(root, name, distribution, steps, epochs):
    """MobileNetV2 (alpha 0.35, 96 px), all layers, global batch 32,
    `steps` batches per epoch of synthetic images, deterministic."""
    import numpy as np
    import yaml

    data = root / "data.npz"
    if not data.exists():
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, (32 * steps, 96, 96, 3)).astype("float32")
        np.savez(data, x_train=x, y_train=rng.integers(0, 4, len(x)))
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name,
        "model": {"backbone": "mobilenet_v2", "weights": None,
                  "input_shape": [96, 96, 3], "backbone_kwargs": {"alpha": 0.35},
                  "head": {"dropout": 0.0}},
        "data": {"source": "numpy", "path": str(data), "batch_size": 32,
                 "validation_split": 0.0, "shuffle": False},
        "distribution": distribution, "deterministic": True,
        "stages": [{"name": "all", "epochs": epochs, "trainable": "all",
                    "learning_rate": 1e-4}],
    }))
    return path


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(recipe, root, ports, *extra, env=None):
    """Two `kft run` worker processes on 127.0.0.1, run dirs root/worker<i>."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    procs = []
    for index in range(2):
        worker_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                      **(env or {}).get(index, {}),
                      "TF_CONFIG": json.dumps({"cluster": cluster, "task": {
                          "type": "worker", "index": index}})}
        log = open(root / f"worker{index}.log", "a")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, "run", str(recipe), "--quiet",
             "--output-dir", str(root / f"worker{index}"), *extra],
            env=worker_env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def wait_all(procs, timeout=600):
    deadline = time.time() + timeout
    codes = [proc.wait(timeout=max(1.0, deadline - time.time())) for proc in procs]
    return codes


def epoch_seconds(run_dir):
    """Median seconds per epoch and per step, leaving out epoch 1 (tracing)."""
    rows = list(csv.DictReader(open(run_dir / "history.csv")))
    later = rows[1:] or rows
    return (statistics.median(float(r["seconds"]) for r in later),
            statistics.median(float(r["step_seconds"]) for r in later))


def max_weight_difference(run_a, run_b):
    import numpy as np

    a = keras.saving.load_model(run_a / "model.keras").weights
    b = keras.saving.load_model(run_b / "model.keras").weights
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(a, b, strict=True))


def two_workers_vs_one(root, steps, epochs, lose=None):
    print("== two local workers vs one ==")
    one = write_recipe(root, "one", "none", steps, epochs)
    result = subprocess.run(
        [sys.executable, "-m", "kft.cli", "run", str(one), "--quiet",
         "--output-dir", str(root / "one")],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"one process failed:\n{result.stderr[-3000:]}")
    two = write_recipe(root, "two", {"strategy": "multi_worker"}, steps, epochs)
    procs = start_workers(two, root, free_ports(2))
    try:
        if wait_all(procs) != [0, 0]:
            raise SystemExit(f"two workers failed: see {root}/worker*.log")
    finally:
        for proc in procs:
            proc.kill()
    single, workers = epoch_seconds(root / "one"), epoch_seconds(root / "worker0")
    difference = max_weight_difference(root / "one", root / "worker0")
    print(f"1 process: {single[0]:.2f} s/epoch ({single[1] * 1000:.0f} ms/step); "
          f"2 worker processes: {workers[0]:.2f} s/epoch "
          f"({workers[1] * 1000:.0f} ms/step), ratio {workers[0] / single[0]:.2f}; "
          f"{steps} steps of global batch 32 per epoch, median of epochs "
          f"2..{epochs}; largest weight difference after {epochs} epochs: "
          f"{difference:.1e} (the same cores either way)")


def lost_worker(root, steps, epochs, lose):
    print("== seconds from a lost worker to training again ==")
    recipe = write_recipe(root, "lost", {"strategy": "multi_worker"}, steps,
                          max(epochs, 3))
    ports, kill_stamp = free_ports(2), root / "killed"
    step_stamp, survivor = root / "step_again", 1 - lose
    procs = start_workers(recipe, root, ports, env={lose: {
        "KILL_AT": str(steps + steps // 2 + 1), "KILL_STAMP": str(kill_stamp)}})
    try:
        procs[lose].wait(timeout=600)
        killed = float(kill_stamp.read_text())
        code = procs[survivor].wait(timeout=600)
        failed = time.time() - killed
        restarted = time.time()
        procs = start_workers(recipe, root, ports, "--resume", env={
            0: {"STEP_STAMP": str(step_stamp)}})
        if wait_all(procs) != [0, 0]:
            raise SystemExit(f"the resumed workers failed: see {root}/worker*.log")
    finally:
        for proc in procs:
            proc.kill()
    again = float(step_stamp.read_text())
    rows = list(csv.DictReader(open(root / "worker0" / "history.csv")))
    complete = [int(r["epoch"]) for r in rows] == list(range(1, max(epochs, 3) + 1))
    print(f"worker {lose} SIGKILLed mid-epoch 2: worker {survivor} failed "
          f"(exit {code}) {failed:.1f} s later; both restarted with --resume: "
          f"training again {again - killed:.1f} s after the kill "
          f"({again - restarted:.1f} s of it from the restart to the first "
          f"step); history complete: {complete}")


def mirrored_vs_one_device(steps, epochs):
    print("== MirroredStrategy on 2 logical CPU devices vs 1 device ==")
    data = synthetic_images(4, 96, classes=4)
    one = steps_per_second(tf.distribute.get_strategy(), data, steps, epochs)
    two = steps_per_second(tf.distribute.MirroredStrategy(DEVICES), data,
                           steps, epochs)
    print(f"1 device: {one:.2f} steps/s; MirroredStrategy on 2 logical CPU "
          f"devices: {two:.2f} steps/s; ratio 2/1 = {two / one:.2f} "
          "(the same 2 cores either way)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lose", type=int, choices=(0, 1), default=1,
                        help="the worker to SIGKILL (0: the chief)")
    parser.add_argument("--only", choices=("mirrored", "workers", "lost"))
    args = parser.parse_args()
    if args.only in (None, "mirrored"):
        mirrored_vs_one_device(args.steps, args.epochs)
    with tempfile.TemporaryDirectory(prefix="kft-bench-workers-") as tmp:
        for section, run in (("workers", two_workers_vs_one),
                             ("lost", lost_worker)):
            if args.only in (None, section):
                root = Path(tmp) / section
                root.mkdir()
                run(root, args.steps, args.epochs, args.lose)


if __name__ == "__main__":
    main()
