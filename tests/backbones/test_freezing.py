import numpy as np
import pytest
from conftest import tiny_classifier

import kft
from kft.backbones import blocks as backbones
from kft.backbones.freezing import batch_norm_policy
from kft.backbones.freezing import format_trainable_summary
from kft.backbones.freezing import set_trainable
from kft.backbones.freezing import trainable_summary


def _trainable_layer_names(model):
    return {w.path.split("/")[-2] for w in model.trainable_weights}


def test_freeze_makes_everything_untrainable():
    model = tiny_classifier(2)
    kft.freeze(model)
    assert model.trainable_weights == []


def test_unfreeze_without_arguments_trains_everything_but_frozen_batch_norm():
    model = tiny_classifier(2)
    assert batch_norm_policy(model) == "frozen"
    kft.freeze(model)
    kft.unfreeze(model)
    trainable = {w.path for w in model.trainable_weights}
    bn = {w.path for w in model.weights if "bn" in w.path.lower()}
    assert trainable == {w.path for w in model.weights} - bn
    model = tiny_classifier(2, bn="train")
    assert batch_norm_policy(model) == "train"
    kft.freeze(model)
    kft.unfreeze(model)
    assert len(model.trainable_weights) == len(
        [w for w in model.weights if "moving" not in w.path])


def test_batch_norm_policy_survives_save_and_load(tmp_path):
    import keras

    for bn in ("frozen", "train"):
        path = str(tmp_path / f"{bn}.keras")
        tiny_classifier(2, bn=bn).save(path)
        assert batch_norm_policy(keras.saving.load_model(path)) == bn


def test_unfreeze_last_n_blocks_trains_exactly_those_blocks():
    model = tiny_classifier(2)
    kft.freeze(model)
    blocks = backbones.named_backbone_blocks(model)
    assert [n for n, _ in blocks[-3:]] == ["block_15", "block_16", "top"]
    kft.unfreeze(model, last_n_blocks=2)
    expected = {layer.name for _, block in blocks[-2:] for layer in block
                if layer.trainable_weights}
    assert _trainable_layer_names(model) == expected
    # The head stays frozen: unfreeze only adds.
    assert not any(w.path.startswith("head_") for w in model.trainable_weights)


def test_unfreeze_keeps_what_was_trainable():
    model = tiny_classifier(2)  # head trainable, backbone frozen
    kft.unfreeze(model, last_n_blocks=1)
    names = _trainable_layer_names(model)
    assert "head_output" in names and "Conv_1" in names
    assert "block_16_project" not in names


def test_unfreeze_layers_regex_and_batch_norm_policy():
    model = tiny_classifier(2)
    kft.freeze(model)
    kft.unfreeze(model, layers=r"^block_16_")
    names = _trainable_layer_names(model)
    assert names == {"block_16_expand", "block_16_depthwise", "block_16_project"}
    kft.unfreeze(model, layers=r"^block_16_", batch_norm=True)
    assert "block_16_project_BN" in _trainable_layer_names(model)


def test_unfreeze_errors_name_the_bad_value():
    model = tiny_classifier(2)
    with pytest.raises(ValueError, match="last_n_blocks=99"):
        kft.unfreeze(model, last_n_blocks=99)
    with pytest.raises(ValueError, match="last_n_blocks=-1"):
        kft.unfreeze(model, last_n_blocks=-1)
    with pytest.raises(ValueError, match="matches no layer"):
        kft.unfreeze(model, layers="^nothing_here$")
    with pytest.raises(ValueError, match="not a valid regex"):
        kft.unfreeze(model, layers="(")


def test_set_trainable_specs():
    model = tiny_classifier(2)
    set_trainable(model, "all")
    n_all = len(model.trainable_weights)
    set_trainable(model, "head")
    assert _trainable_layer_names(model) == {"head_output"}
    set_trainable(model, {"last_n_blocks": "all"})
    assert len(model.trainable_weights) == n_all
    set_trainable(model, "none")
    assert model.trainable_weights == []
    with pytest.raises(ValueError, match="trainable="):
        set_trainable(model, "most")


def test_trainable_summary_counts_blocks():
    model = tiny_classifier(2)
    kft.unfreeze(model, last_n_blocks=1)
    rows = {r["block"]: r for r in trainable_summary(model)}
    # Conv_1 trains, its BatchNorm stays frozen (bn="frozen").
    assert rows["top"]["state"] == "partial"
    assert rows["block_16"]["state"] == "frozen"
    assert rows["head"]["state"] == "trainable"
    assert rows["head"]["trainable_params"] == 1280 * 2 + 2
    total = sum(r["params"] for r in rows.values())
    assert total == int(sum(np.prod(w.shape) for w in model.weights))
    trainable = sum(r["trainable_params"] for r in rows.values())
    assert trainable == int(sum(np.prod(w.shape) for w in model.trainable_weights))
    text = format_trainable_summary(model)
    assert "block_16" in text and "trainable:" in text
