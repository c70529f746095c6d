import keras
import numpy as np
import pytest
from conftest import tiny_classifier

import kft
from kft.models.heads import head_kind


def test_build_classifier_structure_and_frozen_backbone():
    model = tiny_classifier(3, head={"hidden": [16], "dropout": 0.5})
    names = [layer.name for layer in model.layers]
    assert names[:3] == ["image", "preprocessing", "backbone"]
    assert names[-1] == "head_output"
    assert "head_dense_0" in names and "head_dropout" in names
    assert model.get_layer("backbone").trainable is False
    assert model.get_layer("backbone").trainable_weights == []
    head_weights = {w.path for w in model.trainable_weights}
    assert head_weights and all(p.startswith("head_") for p in head_weights)


@pytest.mark.parametrize("kind,classes,units,activation", [
    ("multiclass", 3, 3, "softmax"),
    ("binary", 1, 1, "sigmoid"),
    ("binary", 2, 1, "sigmoid"),
    ("multilabel", 4, 4, "sigmoid"),
    ("regression", 2, 2, "linear"),
])
def test_head_kinds(kind, classes, units, activation):
    model = tiny_classifier(classes, head={"kind": kind, "pooling": "max"})
    out = model.get_layer("head_output")
    assert out.units == units
    assert keras.activations.serialize(out.activation) == activation
    assert head_kind(model) == kind
    assert model.get_layer("head_pool").__class__.__name__ == "GlobalMaxPooling2D"


def test_head_batch_norm_and_flatten():
    model = tiny_classifier(2, head={"pooling": "flatten", "hidden": [8, 4],
                                     "batch_norm": True})
    names = [layer.name for layer in model.layers]
    assert {"head_bn_0", "head_bn_1", "head_dense_1"} <= set(names)


@pytest.mark.parametrize("head,match", [
    ({"kind": "ordinal"}, "kind='ordinal'"),
    ({"pooling": "sum"}, "pooling='sum'"),
    ({"dropout": 1.5}, "dropout=1.5"),
    ({"hidden": [0]}, r"hidden=\[0\]"),
    ({"hiden": [4]}, "hiden"),
])
def test_bad_head_options(head, match):
    with pytest.raises(ValueError, match=match):
        tiny_classifier(3, head=head)


def test_binary_head_needs_one_or_two_classes():
    with pytest.raises(ValueError, match="num_classes=3"):
        tiny_classifier(3, head={"kind": "binary"})


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_num_classes_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="num_classes"):
        tiny_classifier(value)


def test_bn_mode_is_checked():
    with pytest.raises(ValueError, match="bn='sometimes'"):
        tiny_classifier(2, bn="sometimes")


def test_save_and_reload_predicts_the_same(tmp_path):
    model = tiny_classifier(3, head={"hidden": [8], "dropout": 0.1})
    kft.unfreeze(model)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    model.fit(x, np.array([0, 1, 2, 0, 1, 2]), epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(model.predict(x, verbose=0),
                               reloaded.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert reloaded.get_layer("preprocessing").mode == "tf"
    assert head_kind(reloaded) == "multiclass"
