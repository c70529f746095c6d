"""build_detector / build_segmenter: anatomy, freezing, unfreezing, save."""

import keras
import numpy as np
import pytest
from vision_fixtures import SIZE
from vision_fixtures import background_files
from vision_fixtures import tiny_encoder
from vision_fixtures import toy_garments

import kft
from kft.vision import build_detector
from kft.vision import build_segmenter
from kft.vision import synthetic
from kft.vision.data import detection_dataset
from kft.vision.data import segmentation_dataset

BLOCKS = ["stem", "block1a", "block2a", "block3a", "block4a", "top"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    return synthetic.fashion_scenes(
        8, image_size=SIZE, objects=(1, 2), scale=(0.45, 0.7),
        garments=toy_garments(), backgrounds=background_files(folder))


def _detector(**kwargs):
    return build_detector(tiny_encoder(), 3, image_size=(SIZE, SIZE),
                          levels=(3, 5), head_conv_layers=1, **kwargs)


def _segmenter(**kwargs):
    return build_segmenter(tiny_encoder(), 4, image_size=(SIZE, SIZE), **kwargs)


def _snapshot(model):
    return {id(v): np.array(v) for v in model.weights}


def _moved(model, before, variables):
    return {v.path for v in variables
            if not np.array_equal(before[id(v)], np.asarray(v))}


def _encoder(model):
    return model.backbone.image_encoder


@pytest.mark.parametrize("build", [_detector, _segmenter])
def test_the_anatomy_lists_the_encoder_blocks(build):
    model = build()
    anatomy = kft.describe(model)
    assert anatomy.backbone == "image_encoder"
    assert anatomy.family == "EfficientNetBackbone"
    assert [n for n, _ in kft.anatomy.backbone_blocks_of(model)] == BLOCKS
    assert not _encoder(model).trainable_weights  # built frozen
    assert model.trainable_weights


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_a_head_only_stage_leaves_the_encoder_and_its_statistics(bn, scenes):
    model = _detector(bn=bn)
    data = detection_dataset(scenes, image_size=(SIZE, SIZE), batch_size=4)
    before = _snapshot(model)
    kft.fine_tune(model, data, stages=[
        {"epochs": 1, "trainable": "head", "learning_rate": 1e-2}], verbose=0)
    encoder = _encoder(model).weights
    assert any("moving_mean" in v.path for v in encoder)
    assert _moved(model, before, encoder) == set()
    head = [v for v in model.weights if id(v) not in {id(e) for e in encoder}]
    assert _moved(model, before, head)


def test_a_head_only_segmenter_stage_leaves_the_encoder(scenes):
    model = _segmenter(bn="train")
    data = segmentation_dataset(scenes, image_size=(SIZE, SIZE), batch_size=4)
    before = _snapshot(model)
    histories = kft.fine_tune(model, data, stages=[
        {"epochs": 1, "trainable": "head", "learning_rate": 1e-2}], verbose=0)
    assert _moved(model, before, _encoder(model).weights) == set()
    assert "mean_iou" in histories[0].history
    assert 0.0 <= histories[0].history["mean_iou"][-1] <= 1.0


class _EpochWeights(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.ends = [_snapshot(self.model)]

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(_snapshot(self.model))


def test_gradual_unfreezing_inside_one_fit_trains_the_blocks_it_says(scenes):
    model = _detector(bn="train")
    data = detection_dataset(scenes, image_size=(SIZE, SIZE), batch_size=4,
                             shuffle=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    recorder = _EpochWeights()
    # Epoch 0: heads and pyramid only; epoch 1: the top two encoder blocks.
    model.fit(data, epochs=2, verbose=0, callbacks=[
        kft.callbacks.GradualUnfreezing({0: 0, 1: 2}, verbose=0), recorder])
    start, first, second = recorder.ends
    blocks = dict(kft.anatomy.backbone_blocks_of(model))
    encoder = _encoder(model).weights
    top = [v for name in ("block4a", "top") for layer in blocks[name]
           for v in layer.weights]

    def moved(before, after):
        return {v.path for v in encoder
                if not np.array_equal(before[id(v)], after[id(v)])}

    assert moved(start, first) == set()
    assert moved(first, second)
    assert moved(first, second) <= {v.path for v in top}
    assert any("kernel" in p for p in moved(first, second))
    # bn="train": the unfrozen blocks' BatchNorm statistics move too.
    assert any("moving_mean" in p for p in moved(first, second))


def test_unfreeze_last_blocks_keeps_batch_norm_frozen_by_policy():
    model = _detector(bn="frozen")
    kft.unfreeze(model, last_n_blocks=2)
    trainable = {id(v) for v in model.trainable_weights}
    blocks = dict(kft.anatomy.backbone_blocks_of(model))
    block4a = [layer for layer in blocks["block4a"] if layer.weights]
    assert any(id(v) in trainable for layer in block4a for v in layer.weights)
    assert not any(isinstance(layer, keras.layers.BatchNormalization)
                   and layer.trainable for layer in block4a)
    assert not any(id(v) in trainable for layer in blocks["block2a"]
                   for v in layer.weights)


@pytest.mark.parametrize("build", [_detector, _segmenter])
def test_save_and_reload_gives_the_same_outputs_and_anatomy(build, tmp_path):
    model = build()
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3))
    x = model.preprocessor(x.astype("float32"))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is type(model)
    assert kft.describe(loaded) == kft.describe(model)
    expected, got = model(x), loaded(x)
    for a, b in zip(keras.tree.flatten(expected), keras.tree.flatten(got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_a_detector_predicts_boxes_from_raw_pixels(scenes):
    model = _detector()
    out = model.predict(scenes["images"][:2].astype("float32"), verbose=0)
    assert out["boxes"].shape[:2] == (2, 100) and out["boxes"].shape[-1] == 4
    assert set(out) >= {"boxes", "labels", "confidence", "num_detections"}


def test_an_encoder_without_a_pyramid_is_refused_with_a_sentence():
    import keras_hub

    vit = keras_hub.models.ViTBackbone(
        image_shape=(SIZE, SIZE, 3), patch_size=8, num_layers=1, num_heads=1,
        hidden_dim=8, mlp_dim=8)
    with pytest.raises(ValueError, match="no feature pyramid"):
        build_detector(vit, 2, image_size=(SIZE, SIZE))


@pytest.mark.parametrize("kwargs,match", [
    ({"num_classes": 0}, "num_classes"),
    ({"num_classes": 2, "bn": "moving"}, "bn must be one of"),
    ({"num_classes": 2, "levels": (5, 3)}, "levels"),
])
def test_bad_detector_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_detector(tiny_encoder(), image_size=(SIZE, SIZE), **kwargs)


def test_lora_on_the_encoder_trains_adapters_and_heads_and_reloads(scenes, tmp_path):
    import re

    model = _detector()
    head = [f"^{re.escape(layer.name)}$"
            for layer in kft.anatomy.head_layers(model)]
    adapted = kft.lora.apply_lora(model, targets=[r"block\d+[a-z]_project"],
                                  rank=2, trainable=head)
    assert adapted == 4  # one projection per MBConv block
    data = detection_dataset(scenes, image_size=(SIZE, SIZE), batch_size=4)
    before = _snapshot(model)
    kft.fine_tune(model, data, stages=[
        {"epochs": 1, "trainable": "keep", "learning_rate": 1e-2}], verbose=0)
    moved = _moved(model, before, _encoder(model).weights)
    assert moved and all("lora_" in path for path in moved), moved
    path = tmp_path / "lora.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = model.preprocessor(scenes["images"][:2].astype("float32"))
    for a, b in zip(keras.tree.flatten(model(x)), keras.tree.flatten(loaded(x))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
