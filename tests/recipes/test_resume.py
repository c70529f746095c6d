"""Exact resume: a run SIGKILLed at a random step and resumed ends with the
same weights as a run never interrupted (deterministic mode), for a text
classifier with LoRA, dropout, a cosine schedule and early stopping, and
for a causal LM with LoRA whose stages draw `steps_per_epoch` batches
from one data stream. Each run is its own process, as in real use."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from llm_fixtures import tiny_causal_lm
from llm_fixtures import write_hf_checkpoint
from test_recipes_text import _csv
from test_text import _tiny_preset

from kft.recipes.checkpoint import RunCheckpoint
from kft.recipes.checkpoint import read_state
from kft.recipes.resume import save_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))

# Runs `kft run` in this process after arranging a SIGKILL at global
# training step KILL_AT (counted across stages), if given.
RUNNER = """
import os, signal, sys
from kft.recipes import checkpoint
kill_at = int(os.environ.get("KILL_AT", "0"))
original = checkpoint.RunCheckpoint.on_train_batch_end
steps = [0]
def on_train_batch_end(self, batch, logs=None):
    original(self, batch, logs)
    steps[0] += 1
    if steps[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.RunCheckpoint.on_train_batch_end = on_train_batch_end
from kft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _kft_run(recipe, out, *extra, kill_at=None):
    env = {**os.environ, "KILL_AT": str(kill_at or 0), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, "run", recipe, "--quiet",
         "--output-dir", str(out), *extra],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    return result


def _interrupted_then_resumed(recipe, tmp_path, kill_at):
    whole = _kft_run(recipe, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _kft_run(recipe, tmp_path / "resumed", kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL landed
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    state = read_state(str(tmp_path / "resumed"))
    assert state is not None and state["data"]["iterators"] >= 1
    resumed = _kft_run(recipe, tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return tmp_path / "whole", tmp_path / "resumed", state


def _rows(run_dir):
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def _assert_same_arrays(a, b):
    with np.load(a) as left, np.load(b) as right:
        assert sorted(left.files) == sorted(right.files)
        for key in left.files:
            if left[key].dtype.kind in "US":  # layer names, targets
                np.testing.assert_array_equal(left[key], right[key], err_msg=key)
            else:
                np.testing.assert_allclose(left[key], right[key], rtol=0,
                                           atol=1e-6, err_msg=key)


@pytest.mark.slow
# Plain LoRA resumes through the same code: one variant keeps CI short.
@pytest.mark.parametrize("variant", [{"use_dora": True, "lr_ratio": 16}])
def test_text_lora_run_killed_at_a_random_step_resumes_to_the_same_weights(
        tmp_path, variant):
    # DoRA + LoRA+: the magnitudes and three optimizer groups resume too.
    recipe = {
        "name": "resume_text", "seed": 3, "deterministic": True,
        "model": {"text": _tiny_preset(tmp_path / "preset"), "sequence_length": 16},
        "data": {"source": "text_file", "path": _csv(tmp_path / "reviews.csv"),
                 "batch_size": 4, "validation_split": 0.25},
        "lora": {"rank": 2, "alpha": 4, **variant},
        # 18 training rows: 5 steps per epoch, 20 in all.
        "stages": [{"name": "train", "epochs": 4, "learning_rate": 1e-2,
                    "optimizer": "adamw", "schedule": "cosine",
                    "early_stopping": {"patience": 10}}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    kill_at = int(np.random.default_rng().integers(6, 20))  # after epoch 1
    whole, resumed, state = _interrupted_then_resumed(str(path), tmp_path, kill_at)
    assert state["epochs_done"] == (kill_at - 1) // 5
    assert [r["epoch"] for r in _rows(resumed)] == ["1", "2", "3", "4"]
    for key in ("loss", "val_loss", "learning_rate"):
        assert [r[key] for r in _rows(resumed)] == [r[key] for r in _rows(whole)], key
    _assert_same_arrays(whole / "adapter.npz", resumed / "adapter.npz")
    final = [json.load(open(d / "metrics.json"))["final"]["val"]["loss"]
             for d in (whole, resumed)]
    assert final[0] == pytest.approx(final[1], abs=1e-6)


@pytest.mark.slow
# QLoRA is LoRA on a quantized base: it covers the float-base path too.
@pytest.mark.parametrize("method", ["qlora_int4", "prompt"])
def test_causal_lm_run_resumes_mid_stream_to_the_same_weights(tmp_path, method):
    checkpoint = write_hf_checkpoint(tiny_causal_lm(sequence_length=32),
                                     tmp_path / "hf")
    records = [{"prompt": f"{a} {b}", "completion": f"{b} {a}"}
               for a in "abcd" for b in "abcd"]
    with open(tmp_path / "sft.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    recipe = {
        "name": "resume_sft", "seed": 1, "deterministic": True,
        "model": {"causal_lm": str(checkpoint), "sequence_length": 16},
        "data": {"source": "sft_file", "path": str(tmp_path / "sft.jsonl"),
                 "batch_size": 4, "validation_split": 0.25},
        # 12 rows, 3 batches a pass, `steps_per_epoch` 3: Keras keeps one
        # stream and draws a new shuffle for each pass.
        "stages": [{"name": "sft", "epochs": 4, "steps_per_epoch": 3,
                    "learning_rate": 1e-2, "schedule": "cosine"}],
    }
    if method == "prompt":  # the virtual tokens alone train
        recipe["prompt_tuning"] = {"num_virtual_tokens": 3}
    else:  # LoRA with dropout; QLoRA on an int4 base
        recipe["lora"] = {"targets": "all-linear", "rank": 2, "alpha": 4,
                          "dropout": 0.1}
        if method == "qlora_int4":
            recipe["model"]["quantize"] = "int4"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    kill_at = int(np.random.default_rng().integers(4, 12))
    whole, resumed, state = _interrupted_then_resumed(str(path), tmp_path, kill_at)
    assert state["epochs_done"] == (kill_at - 1) // 3
    assert [r["loss"] for r in _rows(resumed)] == [r["loss"] for r in _rows(whole)]
    stored = "prompt.npz" if method == "prompt" else "adapter.npz"
    _assert_same_arrays(whole / stored, resumed / stored)


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    x, y = np.ones((8, 3), "float32"), np.zeros((8, 2), "float32")
    calls = []

    def failing_after_first(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            with open(args[0], "wb") as f:
                f.write(b"partial")  # some bytes landed, then the disk filled
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    original = keras.Model.save_weights
    monkeypatch.setattr(keras.Model, "save_weights", failing_after_first)
    callback = RunCheckpoint(str(tmp_path))
    with pytest.warns(UserWarning, match=r"epoch 2 was not written .*No space "
                      r"left.*after epoch 1\) is kept"):
        model.fit(x, y, epochs=3, verbose=0, callbacks=[callback])
    state = read_state(str(tmp_path))
    assert state["epochs_done"] == 1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "stage0-epoch0001", "state.json"]  # no partial copies left behind
    # History has every epoch; a resume truncates it to the checkpoint.
    assert [r["epoch"] for r in _rows(tmp_path)] == ["1", "2", "3"]


def test_checkpoint_holds_optimizer_random_state_and_flags(tmp_path):
    import keras

    from kft.recipes.resume import restore_model
    from kft.recipes.resume import restore_optimizer

    def model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        hidden = keras.layers.Dropout(0.5)(keras.layers.Dense(3, name="a")(inputs))
        return keras.Model(inputs, keras.layers.Dense(2, name="b")(hidden))

    trained = model()
    trained.get_layer("a").trainable = False
    trained.compile(keras.optimizers.Adam(1e-2), "mse")
    trained.fit(np.ones((8, 4)), np.ones((8, 2)), epochs=2, verbose=0)
    save_checkpoint(trained, str(tmp_path / "ckpt"))

    fresh = model()
    restore_model(fresh, str(tmp_path / "ckpt"))
    assert not fresh.get_layer("a").trainable and fresh.get_layer("b").trainable
    for mine, theirs in zip(fresh.variables, trained.variables):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    fresh.compile(keras.optimizers.Adam(1e-2), "mse")
    assert restore_optimizer(fresh, str(tmp_path / "ckpt")) == len(
        trained.optimizer.variables)
    assert int(fresh.optimizer.iterations) == 2
    for mine, theirs in zip(fresh.optimizer.variables, trained.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    # The next step is the same step.
    for m in (trained, fresh):
        m.fit(np.ones((8, 4)), np.ones((8, 2)), epochs=1, verbose=0, shuffle=False)
    for mine, theirs in zip(fresh.weights, trained.weights):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), atol=1e-7)


def test_fast_forward_gives_the_shuffle_order_the_next_epoch_would_have():
    import tensorflow as tf

    from kft._keras_internals import tracked_dataset

    def data():
        return tracked_dataset(tf.data.Dataset.range(16).shuffle(
            16, seed=5, reshuffle_each_iteration=True).batch(4))

    whole = data()
    orders = [[b.numpy().tolist() for b in whole] for _ in range(4)]
    assert whole.iterators == 4 and len({str(o) for o in orders}) == 4
    resumed = data()
    resumed.fast_forward(2)  # two epochs were done
    assert [[b.numpy().tolist() for b in resumed]] == orders[2:3]
    # map / prefetch (a keras-hub preprocessor) keep the count.
    mapped = resumed.map(lambda x: x * 2).prefetch(1)
    assert [b.numpy().tolist() for b in mapped] == [
        [2 * v for v in batch] for batch in orders[3]]
    assert resumed.iterators == 4
