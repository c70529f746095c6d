import csv
import json
import os

import keras
import numpy as np
import pytest
import yaml
from conftest import make_images

from kft.recipes import RecipeError
from kft.recipes import list_recipes
from kft.recipes import load_recipe
from kft.recipes.loader import apply_overrides
from kft.recipes.runner import run_recipe


def _recipe(tmp_path, **changes):
    recipe = {
        "name": "tiny",
        "model": {"backbone": "mobilenet_v2", "input_shape": [32, 32, 3],
                  "backbone_kwargs": {"alpha": 0.35}, "head": {"dropout": 0.1}},
        "data": {"source": "numpy", "path": str(tmp_path / "data.npz"),
                 "batch_size": 8, "validation_split": 0.25},
        "stages": [{"name": "head", "epochs": 1},
                   {"name": "top", "epochs": 1,
                    "trainable": {"last_n_blocks": 2}, "learning_rate": 1e-4}],
    }
    for key, value in changes.items():
        recipe[key] = value
    x, y = make_images(24, classes=3)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=y,
             class_names=np.array(["a", "b", "c"]))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("name", list_recipes())
def test_every_packaged_recipe_validates_and_opens_with_its_command(name):
    config = load_recipe(name)
    assert config.name == name
    from kft.recipes.loader import resolve_recipe_path

    first = open(resolve_recipe_path(name)).readline()
    # A recipe with a search space opens with the search that runs it.
    command = "tune" if config.search is not None else "run"
    assert first.startswith(f"# kft {command} {name}")


def test_overrides_set_nested_and_list_values():
    raw = {"stages": [{"epochs": 1}, {"epochs": 2}], "data": {"batch_size": 8}}
    out = apply_overrides(raw, ["stages.1.epochs=5", "data.batch_size=16",
                                "model.head.hidden=[8, 4]"])
    assert out["stages"][1]["epochs"] == 5 and out["data"]["batch_size"] == 16
    assert out["model"]["head"]["hidden"] == [8, 4]
    assert raw["stages"][1]["epochs"] == 2  # the input is not modified
    with pytest.raises(RecipeError, match="stages.7"):
        apply_overrides(raw, ["stages.7.epochs=1"])
    with pytest.raises(RecipeError, match="key.path=value"):
        apply_overrides(raw, ["stages"])


@pytest.mark.parametrize("change,needle", [
    ({"stages": [{"epochs": 1, "lerning_rate": 0.1}]},
     "stages.0.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
    ({"model": {"backbone": "resnet9000"}}, "model.backbone: unknown backbone"),
    ({"stages": []}, "at least one stage"),
    ({"data": {"source": "ftp"}}, "data.source"),
    ({"data": {"source": "tfds"}}, "needs data.name"),
    ({"stages": [{"epochs": "many"}]}, "stages.0.epochs"),
    ({"stages": [{"epochs": 1, "callbacks": []}]}, "Python API"),
    ({"model": {"backbone": "vgg16", "head": {"kind": "ordinal"}}},
     "kind='ordinal'"),
])
def test_invalid_recipes_name_the_key(tmp_path, change, needle):
    path = _recipe(tmp_path, **change)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert needle in str(info.value)


@pytest.mark.parametrize("override,needle,wrong", [
    # shuffle is a data: key, seed a top-level one: neither is offered
    # for a typo in another section.
    ("model.shuffle=true", "model.shuffle: unknown key; allowed: audio, backbone",
     "did you mean"),
    ("stages.0.seeds=1", "stages.0.seeds: unknown key; allowed: callbacks",
     "'seed'"),
    ("data.batch_sise=8", "data.batch_sise: unknown key (did you mean "
     "'batch_size'?)", "allowed"),
])
def test_did_you_mean_offers_only_keys_of_the_same_section(override, needle,
                                                           wrong):
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", [override])
    assert needle in str(info.value)
    assert wrong not in str(info.value)


def test_unknown_recipe_lists_packaged_ones():
    with pytest.raises(RecipeError, match="quickstart"):
        load_recipe("no_such_recipe")


def test_run_writes_a_complete_run_directory(tmp_path):
    config = load_recipe(_recipe(tmp_path))
    out = str(tmp_path / "run")
    run_dir, metrics = run_recipe(config, out, verbose=0)
    assert run_dir == out
    for name in ("config.yaml", "history.csv", "metrics.json", "model.keras",
                 "plots/curves.png", "plots/confusion_matrix.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    rows = list(csv.DictReader(open(os.path.join(out, "history.csv"))))
    assert [(r["stage"], r["epoch"]) for r in rows] == [("head", "1"), ("top", "2")]
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["classes"] == ["a", "b", "c"]
    assert [s["name"] for s in saved["stages"]] == ["head", "top"]
    assert 0.0 <= saved["final"]["val"]["accuracy"] <= 1.0
    assert np.sum(saved["final"]["val"]["confusion_matrix"]) == 6
    assert saved["versions"]["keras"] == keras.__version__
    resolved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert resolved["stages"][1]["trainable"] == {"last_n_blocks": 2}
    assert resolved["stages"][0]["learning_rate"] == 1e-3  # defaults filled in
    model = keras.saving.load_model(os.path.join(out, "model.keras"))
    assert model.predict(np.zeros((1, 32, 32, 3)), verbose=0).shape == (1, 3)


def test_run_image_folder_source(tmp_path):
    from PIL import Image

    for i, c in enumerate(["x", "y"]):
        os.makedirs(tmp_path / "imgs" / c)
        for j in range(4):
            Image.fromarray(np.full((36, 36, 3), 60 * i + j, "uint8")).save(
                tmp_path / "imgs" / c / f"{j}.png")
    path = _recipe(tmp_path, data={"source": "image_folder",
                                   "path": str(tmp_path / "imgs"),
                                   "batch_size": 4, "validation_split": 0.25},
                   stages=[{"epochs": 1}])
    _, metrics = run_recipe(load_recipe(path), str(tmp_path / "run"), verbose=0)
    assert metrics["classes"] == ["x", "y"]


def test_recipe_stages_take_group_rates_and_layer_decay(tmp_path):
    path = _recipe(tmp_path, stages=[
        {"epochs": 1, "trainable": "all",
         "learning_rate": {"head": 1e-3, "backbone": 1e-5}},
        {"epochs": 1, "trainable": "all", "learning_rate": 1e-3,
         "layer_decay": 0.75, "optimizer": "adamw", "weight_decay": 0.05},
        {"epochs": 1, "trainable": "all", "learning_rate": [1e-5, 1e-3]},
    ])
    config = load_recipe(path)
    assert config.stages[0].learning_rate == {"head": 1e-3, "backbone": 1e-5}
    assert config.stages[1].layer_decay == 0.75
    assert config.stages[2].learning_rate == (1e-5, 1e-3)
    _, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    assert [s["epochs"] for s in metrics["stages"]] == [1, 1, 1]


@pytest.mark.parametrize("stage,needle", [
    ({"epochs": 1, "unfreeze": {"every": 1, "schedule": {0: 1}}},
     "either schedule"),
    ({"epochs": 1, "unfreeze": {"evry": 1}}, "did you mean 'every'"),
    ({"epochs": 1, "unfreeze": {"schedule": {0: "most"}}}, "stages.0.unfreeze"),
    ({"epochs": 1, "lr_find": {"num_steps": 1}}, "stages.0.lr_find.num_steps"),
])
def test_unfreeze_and_lr_find_keys_are_validated(tmp_path, stage, needle):
    with pytest.raises(RecipeError) as info:
        load_recipe(_recipe(tmp_path, stages=[stage]))
    assert needle in str(info.value)


def test_policy_is_shorthand_for_stages(tmp_path):
    path = _recipe(tmp_path, stages=[])
    raw = yaml.safe_load(open(path))
    raw.pop("stages")
    raw["policy"] = {"name": "gradual", "epochs": 3, "every": 1,
                     "learning_rate": [1e-5, 1e-3]}
    open(path, "w").write(yaml.safe_dump(raw))
    config = load_recipe(path)
    assert [s.name for s in config.stages] == ["head", "gradual"]
    assert config.stages[1].unfreeze.every == 1
    assert config.stages[1].learning_rate == (1e-5, 1e-3)
    with pytest.raises(RecipeError, match="policy.epochs"):
        load_recipe(path, ["policy.epochs=0"])
    with pytest.raises(RecipeError, match="not both"):
        load_recipe(path, ["stages=[{epochs: 1}]"])
    raw.pop("policy")
    open(path, "w").write(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match="at least one stage"):
        load_recipe(path)


def test_gradient_accumulation_in_a_stage(tmp_path):
    from kft.training.stage_optimizers import make_optimizer
    from kft.training.stages import Stage

    optimizer = make_optimizer(Stage(epochs=1, gradient_accumulation_steps=4))
    assert optimizer.gradient_accumulation_steps == 4
    config = load_recipe(_recipe(tmp_path), ["stages.1.gradient_accumulation_steps=2"])
    assert config.stages[1].gradient_accumulation_steps == 2


def test_recipe_augmentation_section(tmp_path):
    path = _recipe(tmp_path, augmentation={"horizontal_flip": True,
                                           "rotation_range": 10,
                                           "brightness_range": [0.9, 1.1]},
                   stages=[{"epochs": 1}])
    config = load_recipe(path)
    assert config.augmentation.rotation_range == 10
    _, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    assert metrics["stages"][0]["epochs"] == 1
    with pytest.raises(RecipeError, match="augmentation.roation_range"):
        load_recipe(path, ["augmentation.roation_range=5"])
    with pytest.raises(RecipeError, match="augmentation.fill_mode"):
        load_recipe(path, ["augmentation.fill_mode=mirror"])
