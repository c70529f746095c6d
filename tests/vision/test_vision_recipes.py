"""Detection / segmentation recipes: schema, a run, kft eval, packaged."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from vision_fixtures import SIZE
from vision_fixtures import background_files
from vision_fixtures import tiny_encoder
from vision_fixtures import toy_garments

from kft.recipes import load_recipe
from kft.recipes.errors import RecipeError
from kft.vision import synthetic


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny keras-hub preset, and toy scenes as COCO JSON and PNG masks."""
    import keras_hub

    root = tmp_path_factory.mktemp("vision")
    preset = root / "preset"
    tiny_encoder().save_to_preset(str(preset))
    keras_hub.layers.ImageConverter(image_size=(SIZE, SIZE),
                                    scale=1 / 255).save_to_preset(str(preset))
    scenes = synthetic.fashion_scenes(
        8, image_size=SIZE, objects=(1, 2), scale=(0.45, 0.7),
        garments=toy_garments(), backgrounds=background_files(root))
    (root / "images").mkdir()
    (root / "masks").mkdir()
    images, annotations = [], []
    for i, image in enumerate(scenes["images"]):
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(scenes["masks"][i]).save(root / "masks" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": SIZE,
                       "width": SIZE})
        for box, label in zip(scenes["boxes"][i], scenes["labels"][i]):
            if label >= 0:
                y1, x1, y2, x2 = (float(v) for v in box)
                annotations.append({"id": len(annotations), "image_id": i,
                                    "category_id": int(label),
                                    "bbox": [x1, y1, x2 - x1, y2 - y1]})
    categories = [{"id": c, "name": f"class{c}"} for c in range(3)]
    (root / "coco.json").write_text(json.dumps({
        "images": images, "annotations": annotations, "categories": categories}))
    return root


def _recipe(folders, task, **changes):
    source = ({"source": "coco", "path": str(folders / "coco.json")}
              if task == "detect" else
              {"source": "mask_folder", "path": str(folders / "masks")})
    recipe = {
        "name": f"tiny_{task}",
        "model": {"preset": str(folders / "preset"), "image_size": [SIZE, SIZE]},
        "data": {**source, "data_dir": str(folders / "images"),
                 "batch_size": 4, "validation_split": 0.25},
        "vision": {"task": task, "levels": [3, 5], "head_conv_layers": 1,
                   "class_names": ["background", "a", "b", "c"],
                   "augment": {"horizontal_flip": True, "zoom_range": 0.1}},
        "stages": [{"name": "head", "epochs": 1, "learning_rate": 1e-2},
                   {"name": "top", "epochs": 1, "learning_rate": 1e-3,
                    "trainable": {"last_n_blocks": 2}}],
    }
    recipe.update(changes)
    return recipe


def _load(recipe, tmp_path):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(str(path))


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_a_recipe_trains_reports_and_evaluates(folders, tmp_path, task):
    from kft.recipes.runner import run_recipe
    from kft.recipes.tasks.base import task_for

    config = _load(_recipe(folders, task), tmp_path)
    assert task_for(config).name == {"detect": "object_detection",
                                     "segment": "semantic_segmentation"}[task]
    output, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    key = "val_map50" if task == "detect" else "val_mean_iou"
    assert key in history[0].split(",") and len(history) == 3
    final = metrics["final"]["val"]
    assert 0.0 <= final["map50" if task == "detect" else "mean_iou"] <= 1.0
    assert os.path.getsize(os.path.join(output, "plots", "predictions.png")) > 1000
    from kft.recipes.evaluate import evaluate_run

    evaluation = evaluate_run(output)  # kft eval: a fresh load of model.keras
    assert 0.0 <= evaluation["map" if task == "detect" else "mean_iou"] <= 1.0


@pytest.mark.parametrize("change,match", [
    ({"data": {"source": "builtin", "name": "fashion_mnist_holdout"}},
     "vision.task 'detect' trains on data.source"),
    ({"augmentation": {"horizontal_flip": True}}, "vision.augment"),
    ({"vision": {"task": "detect"}, "data": {"source": "voc", "path": "x",
                                             "data_dir": "y"}},
     "needs vision.class_names"),
    ({"vision": None}, "add a vision: section"),
])
def test_a_bad_vision_recipe_names_the_key(folders, tmp_path, change, match):
    recipe = _recipe(folders, "detect")
    for key, value in change.items():
        if value is None:
            recipe.pop(key)
        else:
            recipe[key] = value
    with pytest.raises(RecipeError, match=match):
        _load(recipe, tmp_path)


@pytest.mark.parametrize("name", ["detect_fashion_lite0", "segment_fashion_lite0"])
def test_the_packaged_recipes_validate(name):
    config = load_recipe(name)
    assert config.vision is not None and config.model.preset


def test_the_schema_names_what_the_library_takes():
    import dataclasses
    from typing import get_args

    from kft.recipes.schema import DataConfig
    from kft.recipes.vision_config import VISION_SOURCES
    from kft.recipes.vision_config import BoxAugmentationConfig
    from kft.vision import BoxAugmentation

    assert set(VISION_SOURCES) <= set(get_args(
        DataConfig.model_fields["source"].annotation))
    fields = {f.name for f in dataclasses.fields(BoxAugmentation) if f.init}
    assert set(BoxAugmentationConfig.model_fields) <= fields


@pytest.mark.parametrize("method", ["head", "full", "gradual", "discriminative",
                                    "lora"])
def test_kft_compare_methods_make_valid_vision_recipes(method):
    from kft.recipes.loader import resolved
    from kft.recipes.schema import RecipeConfig
    from kft.recipes.tasks.base import task_for

    config = load_recipe("detect_fashion_lite0")
    task = task_for(config)
    base = resolved(config)
    changes, reason = task.method_changes(method, 4, base)
    assert changes is not None, reason
    derived = RecipeConfig.model_validate({**base, **changes})
    assert task_for(derived) is task


def test_an_interrupted_detection_run_resumes_to_the_same_weights(
        folders, tmp_path, monkeypatch):
    import keras

    from kft.recipes import runner

    class Interrupted(Exception):
        pass

    class StopAfterFirstEpoch(runner.RunCheckpoint):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            raise Interrupted

    recipe = _recipe(folders, "detect", deterministic=True)
    # Keras' box-aware layers draw from their own seed generators inside
    # tf.data, which a checkpoint does not hold: with vision.augment the
    # resumed run's augmentation stream restarts (measured: weights differ).
    recipe["vision"]["augment"] = None
    recipe["data"]["validation_split"] = 0.0  # no per-epoch mAP: quicker
    config = _load(recipe, tmp_path)
    straight, _ = runner.run_recipe(config, str(tmp_path / "straight"), verbose=0)
    out = str(tmp_path / "resumed")
    monkeypatch.setattr(runner, "RunCheckpoint", StopAfterFirstEpoch)
    with pytest.raises(Interrupted):
        runner.run_recipe(config, out, verbose=0)
    monkeypatch.undo()
    out, _ = runner.run_recipe(config, out, verbose=0, resume=True)
    rows = open(os.path.join(out, "history.csv")).read().splitlines()
    assert [r.split(",")[0:2] for r in rows[1:]] == [["head", "1"], ["top", "2"]]
    expected = keras.saving.load_model(os.path.join(straight, "model.keras"))
    got = keras.saving.load_model(os.path.join(out, "model.keras"))
    for a, b in zip(expected.weights, got.weights):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5,
                                   err_msg=a.path)
