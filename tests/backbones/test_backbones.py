import keras
import numpy as np
import pytest

import kft
from kft.backbones import blocks as backbones
from kft.backbones.preprocessing import ImagePreprocessing

# Families that take several seconds to build are marked slow; CI runs them.
_SLOW = {"resnet101", "resnet152", "resnet101_v2", "resnet152_v2",
         "efficientnet_b4", "efficientnet_v2_s", "densenet169", "densenet201",
         "convnext_small", "inception_v3", "xception"}

REQUIRED = [
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet50",
    "resnet101", "resnet50_v2", "efficientnet_b0", "efficientnet_b1",
    "efficientnet_b2", "efficientnet_b3", "efficientnet_v2_b0", "vgg16",
    "vgg19", "xception", "inception_v3", "densenet121", "convnext_tiny",
]


def _params():
    return [
        pytest.param(name, marks=pytest.mark.slow) if name in _SLOW else name
        for name in kft.list_backbones()
    ]


def test_required_families_are_registered():
    missing = set(REQUIRED) - set(kft.list_backbones())
    assert not missing


@pytest.mark.parametrize("family", _params())
def test_every_family_builds_predicts_and_splits(family):
    size = max(32, backbones.get_backbone(family).min_input_size)
    model = kft.build_classifier(family, 3, weights=None,
                                 input_shape=(size, size, 3))
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3))
    probs = model.predict(x, verbose=0)
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)

    base = model.get_layer("backbone")
    named = backbones.named_backbone_blocks(base)
    blocks = [layers for _, layers in named]
    assert len(blocks) >= 4, [n for n, _ in named]
    # Every layer of the backbone is in exactly one block, in model order.
    flat = [layer for block in blocks for layer in block]
    expected = [layer for layer in base.layers
                if not isinstance(layer, keras.layers.InputLayer)]
    assert [id(layer) for layer in flat] == [id(layer) for layer in expected]
    # The blocks are the family's real blocks, not one catch-all.
    weighted_blocks = [b for b in blocks if any(layer.weights for layer in b)]
    assert len(weighted_blocks) >= 4


def test_block_names_follow_the_family_naming():
    def names(family, size=32):
        base = backbones.build_backbone(family, input_shape=(size, size, 3))
        return [n for n, _ in backbones.named_backbone_blocks(base)]

    mobilenet = names("mobilenet_v2")
    assert mobilenet[0] == "stem" and mobilenet[1] == "block_1"
    assert mobilenet[-2:] == ["block_16", "top"]
    assert names("vgg16") == [f"block{i}" for i in range(1, 6)]
    resnet = names("resnet50")
    assert resnet[0] == "stem" and resnet[1] == "conv2_block1"
    assert resnet[-1] == "conv5_block3" and len(resnet) == 17
    efficient = names("efficientnet_b0")
    assert efficient[1] == "block1a" and efficient[-1] == "top"
    assert len(efficient) == 16 + 2


def test_backbone_blocks_accepts_the_whole_model():
    model = kft.build_classifier("vgg16", 2, input_shape=(32, 32, 3))
    assert len(kft.backbone_blocks(model)) == 5
    assert kft.backbone_blocks(model)[-1][0].name == "block5_conv1"


@pytest.mark.parametrize("family,mode", [
    ("mobilenet_v2", "tf"), ("resnet50", "caffe"), ("densenet121", "torch"),
    ("efficientnet_b0", "none"),
])
def test_model_on_raw_pixels_equals_backbone_on_preprocessed(family, mode):
    model = kft.build_classifier(family, 2, input_shape=(32, 32, 3))
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = keras.applications.imagenet_utils.preprocess_input(
        x.copy(), mode=mode) if mode != "none" else x
    assert model.get_layer("preprocessing").mode == mode
    features = model.get_layer("backbone")(expected, training=False)
    pooled = np.asarray(features).mean(axis=(1, 2))
    head = model.get_layer("head_output")
    want = np.asarray(head(pooled))
    got = model.predict(x, verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_preprocessing_layer_serializes():
    layer = ImagePreprocessing("caffe")
    clone = ImagePreprocessing.from_config(layer.get_config())
    x = np.full((1, 2, 2, 3), 128.0, "float32")
    np.testing.assert_allclose(layer(x), clone(x))
    with pytest.raises(ValueError, match="mode='bogus'"):
        ImagePreprocessing("bogus")


def test_register_backbone_refuses_duplicates_and_bad_names():
    with pytest.raises(ValueError, match="already registered"):
        kft.register_backbone("mobilenet_v2", keras.applications.MobileNetV2, "tf")
    with pytest.raises(ValueError, match="lowercase"):
        kft.register_backbone("My Net", keras.applications.MobileNetV2, "tf")
    with pytest.raises(ValueError, match="preprocessing='rgb'"):
        kft.register_backbone("my_net", keras.applications.MobileNetV2, "rgb")


def test_register_backbone_adds_a_usable_family():
    name = "tiny_vgg_for_test"
    if name not in kft.list_backbones():
        kft.register_backbone(name, keras.applications.VGG16, "caffe",
                              default_input_size=32,
                              splitter=backbones.BlockSplitter(
                                  patterns=(r"^(block\d+)_",)))
    model = kft.build_classifier(name, 2)
    assert model.input_shape == (None, 32, 32, 3)


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        kft.build_classifier("resnet9000", 3)
    assert "resnet9000" in str(info.value) and "mobilenet_v2" in str(info.value)


def test_input_smaller_than_the_family_supports():
    with pytest.raises(ValueError, match=r"at least 75x75.*\(32, 32, 3\)"):
        kft.build_classifier("inception_v3", 3, input_shape=(32, 32, 3))


def test_imagenet_weights_need_three_channels():
    with pytest.raises(ValueError, match=r"3 input channels.*\(32, 32, 1\)"):
        kft.build_classifier("mobilenet_v2", 3, weights="imagenet",
                             input_shape=(32, 32, 1))


def test_offline_imagenet_gives_one_clear_error(no_network):
    with pytest.raises(backbones.WeightsUnavailableError) as info:
        kft.build_classifier("mobilenet_v2", 3, weights="imagenet",
                             input_shape=(96, 96, 3), alpha=0.35)
    message = str(info.value)
    assert "mobilenet_v2" in message and "weights='/path/to/weights.h5'" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_weights_from_a_local_file(tmp_path):
    source = backbones.build_backbone("mobilenet_v2", input_shape=(32, 32, 3),
                                      alpha=0.35)
    path = str(tmp_path / "mine.weights.h5")
    source.save_weights(path)
    model = kft.build_classifier("mobilenet_v2", 2, weights=path,
                                 input_shape=(32, 32, 3), alpha=0.35)
    for a, b in zip(source.weights, model.get_layer("backbone").weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_weights_file_of_another_architecture_is_a_clear_error(tmp_path):
    path = str(tmp_path / "vgg.weights.h5")
    backbones.build_backbone("vgg16", input_shape=(32, 32, 3)).save_weights(path)
    with pytest.raises(ValueError, match="same architecture"):
        kft.build_classifier("mobilenet_v2", 2, weights=path,
                             input_shape=(32, 32, 3), alpha=0.35)


def test_missing_weights_file_and_bad_weights_value():
    with pytest.raises(ValueError, match="nope.h5"):
        kft.build_classifier("vgg16", 2, weights="nope.h5", input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="weights=3"):
        kft.build_classifier("vgg16", 2, weights=3, input_shape=(32, 32, 3))


def test_packaged_weights_load_and_check_their_family():
    packaged = backbones.get_packaged_weights("fashion_mnist")
    if packaged is None or not __import__("os").path.exists(packaged.path):
        pytest.skip("packaged weights not built")
    model = kft.build_classifier("mobilenet_v2", 4, weights="fashion_mnist")
    assert model.input_shape == (None, 32, 32, 3)
    with pytest.raises(ValueError, match="for backbone 'mobilenet_v2'"):
        kft.build_classifier("vgg16", 4, weights="fashion_mnist")
    with pytest.raises(ValueError, match="alpha=0.35"):
        kft.build_classifier("mobilenet_v2", 4, weights="fashion_mnist", alpha=1.0)


def test_every_packaged_file_is_where_kft_looks_for_it():
    """Files that ship inside kft are found from their new packages (the
    weights moved with kft.backbones, the hold-out set with kft.data)."""
    import os

    from kft.backbones.families import get_packaged_weights
    from kft.backbones.families import list_packaged_weights
    from kft.data.builtin import BUILTIN_DATASETS

    paths = [get_packaged_weights(n).path for n in list_packaged_weights()]
    paths += list(BUILTIN_DATASETS.values())
    assert paths and all(os.path.isfile(p) for p in paths), paths
