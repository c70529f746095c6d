import keras
import numpy as np
import pytest
from conftest import make_images
from conftest import tiny_classifier

import kft
from kft.backbones import blocks as backbones
from kft.training.stage_optimizers import make_optimizer
from kft.training.stages import Stage


def _data(n=24, classes=3):
    x, y = make_images(n, classes=classes)
    return kft.data.from_numpy(x, y, batch_size=8, validation_split=0.25)


def _snapshot(model):
    return {w.path: np.array(w) for w in model.weights}


def _changed(before, model):
    return {w.path for w in model.weights
            if not np.array_equal(before[w.path], np.asarray(w))}


def test_head_stage_changes_only_head_weights():
    model = tiny_classifier(3)
    train, val = _data()
    before = _snapshot(model)
    histories = kft.fine_tune(model, train, val, verbose=0, stages=[
        {"name": "head", "epochs": 2, "trainable": "head", "learning_rate": 1e-2}])
    changed = _changed(before, model)
    assert changed == {"head_output/kernel", "head_output/bias"}
    assert len(histories) == 1 and histories[0].stage == "head"
    assert "val_accuracy" in histories[0].history


def test_last_n_blocks_stage_changes_exactly_those_blocks():
    model = tiny_classifier(3)
    train, val = _data()
    before = _snapshot(model)
    kft.fine_tune(model, train, val, verbose=0, stages=[
        {"epochs": 1, "trainable": {"last_n_blocks": 2}, "learning_rate": 1e-2}])
    blocks = backbones.named_backbone_blocks(model)
    top_layers = {layer.name for _, block in blocks[-2:] for layer in block}
    changed = _changed(before, model)
    changed_layers = {p.split("/")[-2] for p in changed}
    assert changed_layers - {"head_output"} <= top_layers
    # Every trainable weight of the top blocks moved...
    expected = {w.path for _, block in blocks[-2:] for layer in block
                for w in layer.trainable_weights}
    assert expected and expected <= changed
    # ...but not BatchNorm: with bn="frozen" it stays in inference mode.
    assert not any("bn" in p.lower() for p in changed)


def test_bn_train_mode_updates_statistics_of_unfrozen_blocks_only():
    model = tiny_classifier(3, bn="train")
    train, val = _data()
    before = _snapshot(model)
    kft.fine_tune(model, train, val, verbose=0, stages=[
        {"epochs": 1, "trainable": {"last_n_blocks": 1}, "learning_rate": 1e-3}])
    changed = _changed(before, model)
    moved = {p.split("/")[-2] for p in changed if "moving" in p}
    assert moved == {"Conv_1_bn"}
    assert "Conv_1_bn/beta" in changed


def test_stages_continue_the_epoch_count_and_recompile():
    model = tiny_classifier(3)
    train, val = _data()
    histories = kft.fine_tune(model, train, val, verbose=0, stages=[
        {"name": "head", "epochs": 2, "learning_rate": 1e-2},
        {"name": "all", "epochs": 1, "trainable": "all", "learning_rate": 1e-4,
         "optimizer": "sgd"},
    ])
    assert [h.epoch for h in histories] == [[0, 1], [2]]
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert histories[1].trainable_params > histories[0].trainable_params


def test_training_actually_learns():
    x, y = make_images(48, classes=2, seed=3)
    bundle = kft.data.from_numpy(x, y, batch_size=8, validation_split=0.25)
    model = tiny_classifier(2)
    histories = kft.fine_tune(model, bundle.train, bundle.val, verbose=0, stages=[
        {"epochs": 6, "trainable": "all", "learning_rate": 3e-3}])
    loss = histories[0].history["loss"]
    assert loss[-1] < loss[0]


def test_early_stopping_restores_best_weights():
    model = tiny_classifier(3)
    train, val = _data()
    histories = kft.fine_tune(model, train, val, verbose=0, stages=[
        # A huge learning rate makes validation loss diverge early.
        {"epochs": 8, "trainable": "all", "learning_rate": 5.0,
         "optimizer": "sgd", "early_stopping": {"patience": 1}}])
    epochs_run = len(histories[0].epoch)
    assert epochs_run < 8
    best = min(histories[0].history["val_loss"])
    restored = model.evaluate(val, verbose=0, return_dict=True)["loss"]
    assert restored == pytest.approx(best, rel=1e-3, abs=1e-3)


def test_numpy_tuple_input():
    x, y = make_images(16)
    model = tiny_classifier(3)
    histories = kft.fine_tune(model, (x, y), verbose=0, stages=[{"epochs": 1}])
    assert "loss" in histories[0].history


def test_one_hot_labels_pick_categorical_loss():
    x, y = make_images(16)
    model = tiny_classifier(3)
    kft.fine_tune(model, (x, keras.utils.to_categorical(y, 3)), verbose=0,
                  stages=[{"epochs": 1}])
    assert model.loss == "categorical_crossentropy"


def test_cosine_schedule_with_warmup():
    stage = Stage(epochs=2, learning_rate=1e-2, schedule="cosine",
                  warmup_epochs=0.5, optimizer="adamw", weight_decay=0.01)
    optimizer = make_optimizer(stage, steps=10)
    schedule = optimizer._learning_rate
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(5)) == pytest.approx(1e-2)
    assert float(schedule(19)) < 1e-3
    assert optimizer.weight_decay == pytest.approx(0.01)
    warm = make_optimizer(Stage(epochs=2, learning_rate=1e-2, warmup_epochs=1),
                          steps=10)._learning_rate
    assert float(warm(5)) == pytest.approx(5e-3)
    assert float(warm(15)) == pytest.approx(1e-2)


def test_schedule_without_known_length_is_a_clear_error():
    stage = Stage(epochs=1, schedule="cosine")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_optimizer(stage, steps=None)


@pytest.mark.parametrize("stage,match", [
    ({"epochs": 0}, "stages.0.epochs"),
    ({"epochs": 1, "lerning_rate": 1e-3}, "did you mean 'learning_rate'"),
    ({"epochs": 1, "optimizer": "adamm"}, "unknown optimizer 'adamm'"),
    ({"epochs": 1, "trainable": {"last_n_blocks": -1}}, "stages.0.trainable"),
    ({"epochs": 1, "schedule": "linear"}, "stages.0.schedule"),
])
def test_bad_stages_name_the_key(stage, match):
    model = tiny_classifier(3)
    with pytest.raises(ValueError, match=match):
        kft.fine_tune(model, _data().train, stages=[stage])


def test_empty_stages():
    with pytest.raises(ValueError, match="stages is empty"):
        kft.fine_tune(tiny_classifier(3), _data().train, stages=[])
