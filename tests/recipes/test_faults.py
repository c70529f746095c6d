"""Faults and bad data: each with a real fault, and what the user sees.

A process killed mid-training resuming is in test_cli.py
(`test_a_killed_run_resumes_with_complete_history`: SIGKILL, then
--resume).
"""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import yaml
from conftest import make_images

import kft
from kft.cli import main
from kft.recipes import load_recipe
from kft.recipes.runner import run_recipe


def _npz_recipe(tmp_path, stages, x=None, y=None, **top):
    if x is None:
        x, y = make_images(24, classes=3)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=y)
    recipe = {
        "name": "faulty",
        "model": {"backbone": "mobilenet_v2", "input_shape": [32, 32, 3],
                  "backbone_kwargs": {"alpha": 0.35}},
        "data": {"source": "numpy", "path": str(tmp_path / "data.npz"),
                 "batch_size": 8, "validation_split": 0.25},
        "stages": stages, **top,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
        tmp_path, capsys):
    recipe = _npz_recipe(tmp_path, [
        {"name": "good", "epochs": 1, "learning_rate": 1e-3},
        # Plain SGD at 1e38 on every weight: the float32 logits overflow.
        {"name": "diverge", "epochs": 2, "trainable": "all",
         "learning_rate": 1e38, "optimizer": "sgd"}])
    out = tmp_path / "run"
    assert main(["run", recipe, "--quiet", "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "the training loss became" in err and "epoch 2, batch" in err
    assert "last good checkpoint (after epoch 1)" in err
    checkpoints = [f for f in os.listdir(out / "checkpoints")
                   if f.startswith("stage")]
    assert checkpoints == ["stage1-epoch0001"]  # stage "good" done
    import h5py

    weights = out / "checkpoints" / checkpoints[0] / "model.weights.h5"
    with h5py.File(weights, "r") as f:
        arrays = []
        f.visititems(lambda name, item: arrays.append(item[()])
                     if isinstance(item, h5py.Dataset) else None)
    assert arrays and all(np.isfinite(a).all() for a in arrays
                          if a.dtype.kind == "f")
    rows = open(out / "history.csv").read().splitlines()
    assert len(rows) == 2  # header + the good epoch
    assert not (out / "model.keras").exists()


def test_nan_in_the_input_data_is_caught_at_the_first_batch(tmp_path, capsys):
    x, y = make_images(24, classes=3)
    x[:] = np.nan
    recipe = _npz_recipe(tmp_path, [{"name": "head", "epochs": 1}], x, y)
    assert main(["run", recipe, "--quiet", "--output-dir",
                 str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "loss became nan at epoch 1, batch 1" in err
    assert "no checkpoint" in err


def test_half_written_checkpoint_from_a_crash_is_ignored_on_resume(tmp_path):
    recipe = _npz_recipe(tmp_path, [{"name": "head", "epochs": 2}])
    out = str(tmp_path / "run")
    config = load_recipe(recipe)
    run_recipe(config, out, verbose=0)
    # A crash during the next save leaves a truncated temporary directory
    # and the state still pointing at the complete checkpoint.
    state = json.load(open(os.path.join(out, "checkpoints", "state.json")))
    junk = os.path.join(out, "checkpoints", "stage1-epoch0003.tmp")
    os.makedirs(junk)
    with open(os.path.join(junk, "model.weights.h5"), "wb") as f:
        f.write(b"\x89HDF truncated")
    from kft.recipes.checkpoint import read_state

    assert read_state(out)["checkpoint"] == state["checkpoint"]
    # The resume loads the complete one and finishes (nothing left to run).
    _, metrics = run_recipe(config, out, verbose=0, resume=True)
    assert [s["epochs"] for s in metrics["stages"]] == [2]


def _write_jpeg(path, size, gray=False, seed=0):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (*size, 1 if gray else 3), dtype=np.uint8)
    data = tf.io.encode_png(image) if path.endswith(".png") else \
        tf.io.encode_jpeg(image)
    with open(path, "wb") as f:
        f.write(data.numpy())


def _folder_with_bad_files(root):
    for name in ("cat", "dog"):
        os.makedirs(root / name)
        for i in range(4):
            # Mixed sizes; some grayscale PNGs.
            ext = "png" if i % 2 else "jpg"
            _write_jpeg(str(root / name / f"{i}.{ext}"), (20 + 7 * i, 30),
                        gray=(i == 1), seed=i)
    good = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "dog" / "notes.jpg").write_text("not an image at all")
    return [str(root / "cat" / "truncated.jpg"), str(root / "dog" / "notes.jpg")]


def test_corrupt_images_are_skipped_with_paths_or_refused(tmp_path):
    bad = _folder_with_bad_files(tmp_path / "images")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = kft.data.from_image_folder(str(tmp_path / "images"),
                                            image_size=(32, 32), batch_size=4,
                                            validation_split=0.25)
    assert sorted(bundle.skipped_files) == sorted(bad)
    assert any("Skipped 2 unreadable" in str(w.message) for w in caught)
    images, labels = [], []
    for x, y in bundle.train.concatenate(bundle.val):
        images.append(x.numpy())
        labels.extend(y.numpy().tolist())
    images = np.concatenate(images)
    # Every readable file: resized to 32x32, grayscale made RGB.
    assert images.shape == (8, 32, 32, 3) and sorted(labels) == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="(?s)2 unreadable image file.*truncated.jpg"):
        kft.data.from_image_folder(str(tmp_path / "images"), on_bad_file="error")


def test_recipe_on_a_folder_with_corrupt_files_reports_them(tmp_path):
    bad = _folder_with_bad_files(tmp_path / "images")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "folder", "model": {"backbone": "mobilenet_v2",
                                    "input_shape": [32, 32, 3],
                                    "backbone_kwargs": {"alpha": 0.35}},
        "data": {"source": "image_folder", "path": str(tmp_path / "images"),
                 "batch_size": 4, "validation_split": 0.25},
        "stages": [{"name": "head", "epochs": 1}]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, metrics = run_recipe(load_recipe(str(path)), str(tmp_path / "run"),
                                verbose=0)
    assert sorted(metrics["data"]["skipped_files"]) == sorted(bad)


@pytest.mark.parametrize("x_shape,y,needle", [
    ((6, 32, 32, 3), [0, 1, 2, 0, 1, 5], "out of range|5"),
    ((6, 32, 32, 3), [0, 1, 0, 1], "length|same number"),
    ((0, 32, 32, 3), [], "empty|no examples"),
    ((7, 32, 32, 3), [0, 0, 0, 1, 1, 1, 2], "single example"),
])
def test_bad_labels_are_clear_errors_before_training(x_shape, y, needle):
    x = np.zeros(x_shape, "float32")
    with pytest.raises(ValueError, match=needle):
        kft.data.from_numpy(x, np.asarray(y), num_classes=3,
                            validation_split=0.3)


def test_custom_objects_reload_with_safe_mode_in_a_fresh_process(tmp_path):
    from kft import lora
    from kft.augment import ImageAugmentation

    # An image model with augmentation inside and a discriminative optimizer.
    inputs = keras.Input((32, 32, 3))
    features = ImageAugmentation(rotation_range=10, horizontal_flip=True,
                                 brightness_range=[0.8, 1.2],
                                 channel_shift_range=5.0).layer()(inputs)
    base = kft.build_classifier("mobilenet_v2", 2, input_shape=(32, 32, 3),
                                alpha=0.35)
    image_model = keras.Model(inputs, base(features))
    image_model.compile(optimizer=kft.optimizers.discriminative(
        image_model, {"head_output": 1e-3}, default_lr=1e-4),
        loss="sparse_categorical_crossentropy")
    image_model.fit(*make_images(8, classes=2), epochs=1, verbose=0)
    image_model.save(tmp_path / "image.keras")
    # A text model with LoRA inside a keras-hub backbone, and a prompt-tuned one.
    from test_text import _tiny_preset

    preset = _tiny_preset(tmp_path / "preset")
    text_model = kft.build_text_classifier(preset, 2, sequence_length=8)
    lora.apply_lora(text_model, rank=2, trainable=("logits",))
    text_model.save(tmp_path / "lora.keras")
    prompted = kft.build_text_classifier(preset, 2, sequence_length=8,
                                         prompt_tuning=2)
    prompted.save(tmp_path / "prompt.keras")
    script = (
        "import sys, keras, kft\n"
        "for p in sys.argv[1:]:\n"
        "    m = keras.saving.load_model(p, safe_mode=True)\n"
        "    name = p.rsplit('/', 1)[-1]\n"
        "    print(name, type(m).__name__, len(kft.lora.lora_layers(m)))\n")
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "image.keras"),
         str(tmp_path / "lora.keras"), str(tmp_path / "prompt.keras")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    assert "lora.keras BertTextClassifier 4" in lines
    assert "prompt.keras BertTextClassifier 0" in lines


def test_same_seed_same_metrics(tmp_path):
    recipe = _npz_recipe(tmp_path, [{"name": "head", "epochs": 2},
                                    {"name": "top", "epochs": 1,
                                     "trainable": {"last_n_blocks": 2},
                                     "learning_rate": 1e-4}],
                         deterministic=True)
    histories = []
    for run in ("a", "b"):
        run_recipe(load_recipe(recipe), str(tmp_path / run), verbose=0)
        rows = [r.split(",") for r in
                open(tmp_path / run / "history.csv").read().splitlines()]
        header = rows[0]
        keep = [i for i, k in enumerate(header)
                if k not in ("seconds", "step_seconds")]
        histories.append([[row[i] for i in keep] for row in rows])
    assert histories[0] == histories[1]
