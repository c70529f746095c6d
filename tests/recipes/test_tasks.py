"""The task registry: a kind of run added from outside kft (a toy
regression task, defined in this test) goes through `kft run`, `kft eval`,
`kft export` and `kft compare` without any change to kft's code."""

import json
import os
import sys
import textwrap

import pytest

from kft.cli import main
from kft.recipes import RecipeError
from kft.recipes import Task
from kft.recipes import load_recipe
from kft.recipes import register_task
from kft.recipes import registered_tasks
from kft.recipes import unregister_task
from kft.recipes.tasks import get_task
from kft.recipes.tasks import task_for

TOY_MODULE = '''
"""A toy kind of run: linear regression on four features."""

import keras
import numpy as np
import tensorflow as tf

import kft
from kft.recipes import Task

WEIGHTS = np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")


class ToyRegression(Task):
    name = "toy_regression"
    default_methods = ("full",)

    def input_shape(self, config):
        return (4,)

    def build_data(self, config, input_shape, smoke):
        rng = np.random.default_rng(config.seed)
        x = rng.normal(size=(64, 4)).astype("float32")
        y = x @ WEIGHTS
        batch = config.data.batch_size
        train = tf.data.Dataset.from_tensor_slices((x[:48], y[:48])).batch(batch)
        val = tf.data.Dataset.from_tensor_slices((x[48:], y[48:])).batch(batch)
        return kft.data.DataBundle(train, val, [], (4,))

    def loss_and_metrics(self, config, model):
        return "mse", ["mae"]

    def build_model(self, config, bundle, input_shape, load_weights):
        inputs = keras.Input((4,), name="features")
        outputs = keras.layers.Dense(1, name="head_output")(inputs)
        return keras.Model(inputs, outputs, name="toy")
'''

RECIPE = """\
# kft run toy
name: toy
task: toy_regression
model: {backbone: mobilenet_v2}
data: {source: numpy, path: unused.npz, batch_size: 16}
stages:
  - {name: fit, epochs: 10, trainable: all, learning_rate: 0.2}
"""


def install_toy_plugin(tmp_path, monkeypatch):
    """The toy task installed as a package would install it: a module and
    a `kft.tasks` entry point, on this process's path and its children's."""
    plugins = tmp_path / "plugins"
    (plugins / "kft_toy_task-0.1.dist-info").mkdir(parents=True)
    (plugins / "kft_toy_task.py").write_text(TOY_MODULE)
    (plugins / "kft_toy_task-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kft-toy-task\nVersion: 0.1\n")
    (plugins / "kft_toy_task-0.1.dist-info" / "entry_points.txt").write_text(
        "[kft.tasks]\ntoy_regression = kft_toy_task:ToyRegression\n")
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(plugins), *filter(None, [os.environ.get("PYTHONPATH")])]))


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """A toy-task recipe, with the toy task installed (`install_toy_plugin`)."""
    install_toy_plugin(tmp_path, monkeypatch)
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(RECIPE)
    yield str(recipe)
    unregister_task("toy_regression")
    sys.modules.pop("kft_toy_task", None)


def test_the_built_in_tasks_claim_recipes_by_their_model_section():
    assert registered_tasks()[:7] == [
        "causal_lm_rl", "causal_lm_sft", "audio_classification",
        "text_classification", "object_detection", "semantic_segmentation",
        "image_classification"]
    assert task_for(load_recipe("detect_fashion_lite0")).name == "object_detection"
    assert task_for(load_recipe("segment_fashion_lite0")).name == \
        "semantic_segmentation"
    assert task_for(load_recipe("quickstart")).name == "image_classification"
    assert task_for(load_recipe("fortunes_minilm_lora")).name == \
        "text_classification"
    assert task_for(load_recipe("sft_smollm2_lora")).name == "causal_lm_sft"
    assert task_for(load_recipe("speech_commands_whisper_tiny")).name == \
        "audio_classification"


def test_an_unknown_task_exits_2_naming_the_key(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(RECIPE.replace("toy_regression", "image_clasification"))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "task: unknown task 'image_clasification'" in err
    assert "Did you mean 'image_classification'?" in err


def test_register_task_refuses_bad_and_duplicate_names():
    class Nameless(Task):
        pass

    class Image(Task):
        name = "image_classification"

    with pytest.raises(ValueError, match="identifier"):
        register_task(Nameless())
    with pytest.raises(ValueError, match="registered already"):
        register_task(Image())
    with pytest.raises(ValueError, match="Task instance"):
        register_task("image_classification")
    with pytest.raises(RecipeError, match="task: unknown task 'nope'"):
        get_task("nope")


def test_a_toy_task_runs_evaluates_exports_and_compares(toy_plugin, tmp_path,
                                                        capsys):
    assert main(["validate", toy_plugin]) == 0
    run_dir = str(tmp_path / "run")
    assert main(["run", toy_plugin, "--quiet", "--output-dir", run_dir]) == 0
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    history = [line.split(",") for line in
               open(os.path.join(run_dir, "history.csv")).read().split()]
    losses = [float(row[history[0].index("loss")]) for row in history[1:]]
    assert losses[-1] < losses[0] / 4  # it learned the regression
    val_loss = metrics["final"]["val"]["loss"]
    assert "confusion_matrix" not in metrics["final"]["val"]

    assert main(["eval", run_dir]) == 0
    evaluation = json.load(open(os.path.join(run_dir, "eval.json")))
    assert evaluation["loss"] == pytest.approx(val_loss, rel=1e-4)

    assert main(["export", run_dir]) == 0
    import keras

    exported = keras.saving.load_model(os.path.join(run_dir, "export",
                                                    "model.keras"))
    assert exported.name == "toy"

    # kft compare runs each method in its own process: the entry point
    # makes the task known there too. "prompt" does not apply here.
    out = str(tmp_path / "cmp")
    assert main(["compare", toy_plugin, "--methods", "full,prompt",
                 "--output-dir", out]) == 0
    report = json.load(open(os.path.join(out, "compare.json")))
    runs = {r["method"]: r for r in report["runs"]}
    assert runs["full"]["status"] == "ok", runs["full"]
    assert runs["prompt"]["status"] == "skipped"


def test_a_task_registered_in_process_needs_no_entry_point(tmp_path):
    namespace = {}
    exec(textwrap.dedent(TOY_MODULE), namespace)  # the test's own source
    task = namespace["ToyRegression"]()
    task.name = "toy_inline"
    register_task(task)
    try:
        recipe = tmp_path / "inline.yaml"
        recipe.write_text(RECIPE.replace("toy_regression", "toy_inline")
                          .replace("epochs: 10", "epochs: 1"))
        out = str(tmp_path / "run")
        assert main(["run", str(recipe), "--quiet", "--output-dir", out]) == 0
        assert os.path.isfile(os.path.join(out, "model.keras"))
    finally:
        unregister_task("toy_inline")
