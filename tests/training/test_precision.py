"""Mixed precision: recipes set the dtype policy before building; the head
outputs float32; float16 gets loss scaling; LoRA weights stay float32."""

import keras
import numpy as np
import pytest
import yaml
from conftest import make_images

from kft.recipes import load_recipe
from kft.recipes.runner import run_recipe


def _recipe(tmp_path, precision):
    x, y = make_images(16, classes=2)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=y)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "mixed", "precision": precision,
        "model": {"backbone": "mobilenet_v2", "weights": "fashion_mnist",
                  "input_shape": [32, 32, 3], "backbone_kwargs": {"alpha": 0.35}},
        "data": {"source": "numpy", "path": str(tmp_path / "data.npz"),
                 "batch_size": 8, "validation_split": 0.25},
        "callbacks": {"checkpoints": False},
        "stages": [{"name": "top", "epochs": 2, "trainable": {"last_n_blocks": 2},
                    "learning_rate": 1e-3}]}))
    return str(path)


@pytest.mark.parametrize("precision,compute", [("mixed_bfloat16", "bfloat16"),
                                               ("mixed_float16", "float16")])
def test_recipe_trains_in_mixed_precision_with_a_float32_head(
        tmp_path, precision, compute):
    out, metrics = run_recipe(load_recipe(_recipe(tmp_path, precision)),
                              str(tmp_path / "run"), verbose=0)
    assert keras.config.dtype_policy().name == "float32"  # restored after
    model = keras.saving.load_model(f"{out}/model.keras")
    backbone = model.get_layer("backbone")
    conv = next(layer for layer in backbone.layers
                if isinstance(layer, keras.layers.Conv2D))
    assert conv.compute_dtype == compute and conv.kernel.dtype == "float32"
    assert model.get_layer("head_output").compute_dtype == "float32"
    x = make_images(4, classes=2)[0]
    assert model.predict(x, verbose=0).dtype == np.float32
    assert np.isfinite(metrics["final"]["val"]["loss"])
    import csv

    losses = [float(r["loss"]) for r in csv.DictReader(open(f"{out}/history.csv"))]
    assert losses[1] < losses[0]  # it trains


def test_float16_compile_has_loss_scaling():
    import kft

    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = kft.build_classifier("mobilenet_v2", 2, input_shape=(32, 32, 3),
                                     alpha=0.35)
        kft.fine_tune(model, make_images(8, classes=2), stages=[
            {"epochs": 1, "learning_rate": {"head": 1e-3, "backbone": 1e-4},
             "trainable": "all"}], verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)


def test_lora_weights_stay_float32_under_bfloat16(tmp_path):
    from test_text import _tiny_preset

    import kft

    preset = _tiny_preset(tmp_path / "p")
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = kft.build_text_classifier(preset, 2, sequence_length=8)
        kft.lora.apply_lora(model, rank=2, trainable=("logits",))
        texts = ["good movie", "bad film"] * 4
        kft.fine_tune(model, (np.array(texts), np.array([1, 0] * 4)), stages=[
            {"epochs": 1, "trainable": "keep", "learning_rate": 1e-2}], verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    layers = kft.lora.lora_layers(model)
    assert layers and all(layer.lora_a.dtype == "float32"
                          and layer.lora_b.dtype == "float32" for layer in layers)
    assert any(np.abs(np.asarray(layer.lora_b)).max() > 0 for layer in layers)
