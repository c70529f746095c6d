"""Text recipes: keras-hub text classifiers with LoRA or prompt tuning."""

import json
import os

import keras
import numpy as np
import pytest
import yaml
from test_text import _tiny_preset

from kft.recipes import RecipeError
from kft.recipes import load_recipe
from kft.recipes.runner import run_recipe

WORDS = {0: ["good", "great", "movie"], 1: ["bad", "awful", "film"]}


def _csv(path, n=24):
    rng = np.random.default_rng(0)
    lines = ["text,label"]
    for i in range(n):
        label = i % 2
        words = " ".join(rng.choice(WORDS[label], 4))
        lines.append(f"{words},{['neg', 'pos'][label]}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _recipe(tmp_path, **changes):
    recipe = {
        "name": "text_tiny",
        "model": {"text": _tiny_preset(tmp_path / "preset"), "sequence_length": 16},
        "data": {"source": "text_file", "path": _csv(tmp_path / "reviews.csv"),
                 "batch_size": 4, "validation_split": 0.25},
        "stages": [{"name": "train", "epochs": 2, "learning_rate": 1e-2}],
    }
    recipe.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_lora_recipe_trains_adapters_and_writes_adapter_and_model(tmp_path):
    config = load_recipe(_recipe(tmp_path, lora={"rank": 2, "alpha": 4}))
    assert config.stages[0].trainable == "keep"
    out, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    assert metrics["classes"] == ["neg", "pos"]
    assert metrics["adapter"]["layers"] == 4
    assert os.path.getsize(os.path.join(out, "adapter.npz")) == \
        metrics["adapter"]["bytes"]
    # Trainable: adapters and the logits only.
    assert metrics["stages"][0]["trainable_params"] == 4 * 2 * (8 + 8) + 8 * 2 + 2
    assert "confusion_matrix" in metrics["final"]["val"]
    model = keras.saving.load_model(os.path.join(out, "model.keras"))
    from kft.lora.base import lora_layers

    assert len(lora_layers(model)) == 4
    assert any(np.abs(np.asarray(layer.lora_b)).max() > 0
               for layer in lora_layers(model))


def test_lora_variants_recipe_trains_b_at_lr_ratio_times_the_rate(tmp_path):
    """`lora: {use_dora, init: pissa, lr_ratio: 16}`: every stage carries
    LoRA+, and the B matrices train at 16x A's rate through the schedule
    (history's per-group rate columns), DoRA and PiSSA included."""
    from kft.lora.base import lora_layers
    from kft.recipes.checkpoint import read_history

    config = load_recipe(_recipe(
        tmp_path, lora={"rank": 2, "use_dora": True, "init": "pissa",
                        "lr_ratio": 16},
        stages=[{"name": "train", "epochs": 2, "learning_rate": 1e-3,
                 "optimizer": "sgd", "schedule": "cosine", "warmup_epochs": 1,
                 "min_learning_rate": 1e-4}]))
    assert config.stages[0].lora_lr_ratio == 16
    out, _ = run_recipe(config, str(tmp_path / "run"), verbose=0)
    rows = read_history(os.path.join(out, "history.csv"))
    assert len(rows) == 2
    for row in rows:
        a, b = row["learning_rate/lora_a"], row["learning_rate/lora_b"]
        assert a > 0 and b == pytest.approx(16 * a, rel=1e-6)
        assert row["learning_rate/default"] == pytest.approx(a, rel=1e-6)
    assert rows[0]["learning_rate/lora_a"] != rows[1]["learning_rate/lora_a"]
    model = keras.saving.load_model(os.path.join(out, "model.keras"))
    layers = lora_layers(model)
    assert layers and all(layer.use_dora and layer.init == "pissa"
                          for layer in layers)

    with pytest.raises(RecipeError, match="lora.lr_ratio"):
        load_recipe(_recipe(tmp_path, lora={"lr_ratio": 16}, stages=[
            {"name": "train", "epochs": 1, "learning_rate": 1e-4,
             "layer_decay": 0.8}]))


def test_stage_lora_lr_ratio_updates_b_by_ratio_with_sgd():
    """`Stage(lora_lr_ratio=16)` -> LoRA+: one SGD step moves each B by 16x
    the rate times its gradient, A and the head by the rate."""
    import tensorflow as tf

    from kft.lora.base import lora_layers
    from kft.lora.model import apply_lora
    from kft.training.stage_optimizers import make_optimizer
    from kft.training.stages import Stage

    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4, name="query")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
    apply_lora(model, targets="query", rank=2, trainable=("head",))
    layer = lora_layers(model)[0]
    layer.lora_b.assign(np.full(layer.lora_b.shape, 0.5, "float32"))
    stage = Stage(epochs=1, trainable="keep", learning_rate=0.01,
                  optimizer="sgd", lora_lr_ratio=16)
    optimizer = make_optimizer(stage, steps=1, model=model)
    variables = model.trainable_variables
    before = [np.array(v) for v in variables]
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x) ** 2)
    grads = tape.gradient(loss, variables)
    optimizer.apply(grads, variables)
    for variable, old, grad in zip(variables, before, grads):
        rate = 0.16 if variable.path.endswith("lora_b") else 0.01
        np.testing.assert_allclose(np.asarray(variable),
                                   old - rate * np.asarray(grad), atol=1e-6)
    with pytest.raises(ValueError, match="lora_lr_ratio"):
        Stage(epochs=1, learning_rate={"head": 1e-3}, lora_lr_ratio=16)


def test_prompt_tuning_recipe_trains_only_the_prompt_and_head(tmp_path):
    config = load_recipe(_recipe(
        tmp_path, prompt_tuning={"num_virtual_tokens": 3, "init_text": "good"}))
    out, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    assert metrics["stages"][0]["trainable_params"] == 3 * 8 + 8 * 2 + 2
    assert "adapter" not in metrics
    model = keras.saving.load_model(os.path.join(out, "model.keras"))
    assert model.backbone.get_layer("prompt_tuning").num_virtual_tokens == 3


def test_interrupted_lora_run_resumes_mid_stage(tmp_path, monkeypatch):
    from kft.recipes import runner

    class Interrupted(Exception):
        pass

    class StopAfterFirstEpoch(runner.RunCheckpoint):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            raise Interrupted

    config = load_recipe(_recipe(tmp_path, lora={"rank": 2}, stages=[
        {"name": "train", "epochs": 3, "learning_rate": 1e-2}]))
    out = str(tmp_path / "run")
    monkeypatch.setattr(runner, "RunCheckpoint", StopAfterFirstEpoch)
    with pytest.raises(Interrupted):
        run_recipe(config, out, verbose=0)
    monkeypatch.undo()
    out, metrics = run_recipe(config, out, verbose=0, resume=True)
    rows = open(os.path.join(out, "history.csv")).read().splitlines()
    assert [r.split(",")[0:2] for r in rows[1:]] == [
        ["train", "1"], ["train", "2"], ["train", "3"]]
    # Still only adapters and logits train after the reload.
    assert metrics["stages"][0]["trainable_params"] == 4 * 2 * (8 + 8) + 8 * 2 + 2
    assert json.load(open(os.path.join(out, "metrics.json")))["adapter"]


def test_head_and_full_text_recipes(tmp_path):
    config = load_recipe(_recipe(tmp_path, stages=[
        {"name": "head", "epochs": 1, "trainable": "head"},
        {"name": "full", "epochs": 2, "trainable": "all", "learning_rate": 1e-3}]))
    out, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    head, full = metrics["stages"]
    assert head["trainable_params"] == 8 * 2 + 2
    assert full["trainable_params"] > 20 * head["trainable_params"]
    history = open(os.path.join(out, "history.csv")).read().splitlines()
    assert len(history) == 1 + 3


@pytest.mark.parametrize("change,needle", [
    ({"lora": {"rank": 0}}, "lora.rank"),
    ({"lora": {"targets": ["nothing_like_this"]}}, "lora.targets"),
    ({"augmentation": {"horizontal_flip": True}}, "augmentation"),
    ({"lora": {}, "prompt_tuning": {}}, "not both"),
    ({"model": {"text": "x", "backbone": "vgg16"}}, "exactly one"),
    ({"model": {"text": "x", "head": {"dropout": 0.1}}}, "image models"),
    ({"data": {"source": "numpy", "path": "x.npz"}}, "text data source"),
])
def test_bad_text_recipes_name_the_key(tmp_path, change, needle):
    path = _recipe(tmp_path, **change)
    with pytest.raises(RecipeError, match=needle):
        config = load_recipe(path)
        run_recipe(config, str(tmp_path / "run"), verbose=0)


def test_text_data_on_a_cnn_and_prompts_on_a_cnn_are_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "x", "model": {"backbone": "vgg16"},
        "data": {"source": "fortunes"}, "stages": [{"epochs": 1}]}))
    with pytest.raises(RecipeError, match="model.text"):
        load_recipe(str(path))
    image = {"name": "x", "model": {"backbone": "vgg16"},
             "data": {"source": "builtin", "name": "fashion_mnist_holdout"},
             "stages": [{"epochs": 1}]}
    path.write_text(yaml.safe_dump({**image, "prompt_tuning": {}}))
    with pytest.raises(RecipeError, match="text models"):
        load_recipe(str(path))
    # LoRA on a CNN: its 1x1 convolutions, the head trains beside them.
    path.write_text(yaml.safe_dump({**image, "lora": {"rank": 4}}))
    lora = load_recipe(str(path)).lora
    assert lora.targets == ["query", "value", "pointwise"]
    assert lora.trainable == ["head_"] and lora.rank == 4


def test_fortunes_loader_reads_topics(tmp_path):
    import kft

    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "art").write_text("A painting is a poem without words.\n%\n"
                                "Short\n%\nShared entry appears twice here.\n")
    (folder / "science").write_text("Entropy always increases, they say.\n%\n"
                                    "Shared entry appears twice here.\n")
    texts, labels, names = kft.data.load_fortunes(
        ["art", "science"], data_dir=str(folder))
    assert names == ["art", "science"]
    assert texts == ["A painting is a poem without words.",
                     "Entropy always increases, they say."]
    assert labels == [0, 1]
    with pytest.raises(ValueError, match="Available: \\['art', 'science'\\]"):
        kft.data.load_fortunes(["art", "sports"], data_dir=str(folder))


def test_eval_and_export_of_a_lora_text_run(tmp_path):
    from kft.cli import main

    recipe = _recipe(tmp_path, lora={"rank": 2})
    out = str(tmp_path / "run")
    assert main(["run", recipe, "--quiet", "--output-dir", out]) == 0
    assert main(["eval", out]) == 0
    result = json.load(open(os.path.join(out, "eval.json")))
    trained = json.load(open(os.path.join(out, "metrics.json")))
    assert result["accuracy"] == pytest.approx(
        trained["final"]["val"]["accuracy"])
    assert np.sum(result["confusion_matrix"]) == 6
    assert main(["eval", out, "--data", str(tmp_path / "reviews.csv")]) == 0
    assert np.sum(json.load(open(os.path.join(out, "eval.json")))[
        "confusion_matrix"]) == 24
    assert main(["export", out, "--merge-lora"]) == 0
    merged = keras.saving.load_model(os.path.join(out, "export", "model.keras"))
    from kft.lora.base import lora_layers

    assert not lora_layers(merged)
    texts = ["good movie", "awful film"]
    original = keras.saving.load_model(os.path.join(out, "model.keras"))
    np.testing.assert_allclose(merged.predict(texts, verbose=0),
                               original.predict(texts, verbose=0), atol=1e-5)


def test_gradual_unfreezing_opens_transformer_layers_inside_one_fit(tmp_path):
    import kft

    model = kft.build_text_classifier(_tiny_preset(tmp_path / "p"), 2,
                                      sequence_length=8)
    bundle = kft.data.from_texts(["good movie", "bad film"] * 8, [1, 0] * 8,
                                 batch_size=4, validation_split=0.25)
    seen = []

    class Count(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(sum(int(np.prod(w.shape))
                            for w in self.model.trainable_weights))

    kft.freeze(model.backbone)
    plan = kft.callbacks.GradualUnfreezing(every=1).plan(model, 3)
    kft.fine_tune(model, bundle.train, bundle.val, stages=[
        {"name": "gradual", "epochs": 3, "trainable": "head",
         "unfreeze": {"every": 1}}], callbacks=[Count()], verbose=0)
    # pooler, then transformer_layer_1: the plan's counts are what trained.
    assert [r["unfrozen"] for r in plan] == [[], ["top"], ["transformer_layer_1"]]
    assert seen == [r["trainable_params"] for r in plan]
    assert seen[0] < seen[1] < seen[2]
