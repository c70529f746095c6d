import keras
import numpy as np
import pytest
from conftest import make_images
from conftest import tiny_classifier

import kft
from kft import optimizers


def _vgg(bn="frozen"):
    # VGG16 at 32 px: 5 blocks of plain convs, fast and easy to reason about.
    model = kft.build_classifier("vgg16", 2, input_shape=(32, 32, 3), bn=bn)
    kft.unfreeze(model)
    return model


def _rates(optimizer, model):
    rows = optimizers.describe_groups(optimizer, model)
    return {r["group"]: r["learning_rate"] for r in rows}


def test_rules_by_name_index_and_regex():
    model = _vgg()
    opt = optimizers.discriminative(
        model, {"head": 1e-3, -1: 1e-4, "block4": 1e-5, r"block[123]_.*": 1e-6})
    rates = _rates(opt, model)
    assert rates["head"] == pytest.approx(1e-3)
    assert rates["block -1 (block5)"] == pytest.approx(1e-4)
    assert rates["block4"] == pytest.approx(1e-5)
    assert rates[r"block[123]_.*"] == pytest.approx(1e-6)
    assert isinstance(opt, keras.optimizers.MultiOptimizer)
    rows = {r["group"]: r for r in optimizers.describe_groups(opt, model)}
    assert rows["block4"]["variables"] == 6  # 3 convs, kernel + bias


def test_lr_range_is_geometric_over_blocks_and_head():
    model = _vgg()
    opt = optimizers.discriminative(model, lr=(1e-5, 1e-3))
    rows = optimizers.describe_groups(opt, model)
    groups = [r for r in rows if r["variables"]]
    assert [r["group"] for r in groups] == [f"block{i}" for i in range(1, 6)] + ["head"]
    expected = [1e-5 * 100 ** (i / 5) for i in range(6)]
    rates = [r["learning_rate"] for r in groups]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


def test_layerwise_decay_gives_powers_of_decay():
    model = _vgg()
    opt = optimizers.layerwise_lr_decay(model, 1e-3, 0.5, optimizer="adamw",
                                        weight_decay=0.01)
    rates = _rates(opt, model)
    assert rates["head"] == pytest.approx(1e-3)
    for depth, block in enumerate([f"block{i}" for i in (5, 4, 3, 2, 1)], 1):
        assert rates[block] == pytest.approx(1e-3 * 0.5 ** depth)


def test_errors_name_the_rule():
    model = _vgg()
    with pytest.raises(ValueError, match="'nothing_.*' matches no variable"):
        optimizers.discriminative(model, {"nothing_.*": 1e-3})
    with pytest.raises(ValueError, match="matches two rules"):
        optimizers.discriminative(model, {"block5": 1e-3, "block5_conv1": 1e-4})
    with pytest.raises(ValueError, match="Unknown optimizer 'adamm'"):
        optimizers.discriminative(model, {"head": 1e-3}, optimizer="adamm")
    with pytest.raises(ValueError, match="not a block index"):
        optimizers.discriminative(model, {9: 1e-3})
    with pytest.raises(ValueError, match="lr=\\(0.1, 0.01\\)"):
        optimizers.discriminative(model, lr=(0.1, 0.01))
    with pytest.raises(ValueError, match="decay=1.5"):
        optimizers.layerwise_lr_decay(model, 1e-3, 1.5)


def _train(model, optimizer, steps=2, **compile_kwargs):
    x, y = make_images(8, classes=2)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  **compile_kwargs)
    model.fit(x, y, batch_size=8, epochs=steps, verbose=0, shuffle=False)
    return x, y


def test_group_with_zero_rate_does_not_move():
    model = _vgg()
    before = {w.path: np.array(w) for w in model.trainable_weights}
    opt = optimizers.discriminative(model, {"backbone": 0.0, "head": 1e-2})
    _train(model, opt)
    for w in model.trainable_weights:
        moved = not np.array_equal(before[w.path], np.asarray(w))
        assert moved == w.path.startswith("head_"), w.path


def test_sgd_step_is_rate_times_gradient():
    import tensorflow as tf

    model = _vgg()
    x, y = make_images(4, classes=2)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = dict(zip([w.path for w in model.trainable_weights],
                     tape.gradient(loss, model.trainable_weights)))
    rates = {"head": 0.1, "block5": 0.01, "backbone": None}
    opt = optimizers.discriminative(model, {"head": 0.1, "block5": 0.01},
                                    optimizer="sgd", default_lr=0.001)
    before = {w.path: np.array(w) for w in model.trainable_weights}
    opt.apply([grads[w.path] for w in model.trainable_weights],
              model.trainable_weights)
    for w in model.trainable_weights:
        group = "head" if w.path.startswith("head_") else (
            "block5" if w.path.startswith("block5_") else "backbone")
        rate = rates[group] or 0.001
        np.testing.assert_allclose(
            np.asarray(w), before[w.path] - rate * np.asarray(grads[w.path]),
            rtol=1e-5, atol=1e-7)


def test_learning_rate_scales_all_groups_for_keras_callbacks():
    model = _vgg()
    opt = optimizers.discriminative(model, {"head": 1e-3, "backbone": 1e-5})
    assert opt.learning_rate == pytest.approx(1e-3)
    opt.learning_rate = 5e-4
    rates = _rates(opt, model)
    assert rates["head"] == pytest.approx(5e-4)
    assert rates["backbone"] == pytest.approx(5e-6)
    x, y = make_images(8, classes=2)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, verbose=0, callbacks=[
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.1)])
    rates = _rates(opt, model)
    assert rates["head"] == pytest.approx(5e-6)
    assert rates["backbone"] == pytest.approx(5e-8)


def test_per_group_schedules_and_layer_decay_schedule():
    model = _vgg()
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, 10, warmup_target=1e-3, warmup_steps=2)
    opt = optimizers.layerwise_lr_decay(model, schedule, 0.5)
    groups = {label: regex for label, regex in opt.kft_groups}
    block5 = opt._optimizer_map[groups["block5"]]
    assert float(block5._learning_rate(2)) == pytest.approx(5e-4)
    _train(model, opt)


def test_save_reload_and_continue_matches(tmp_path):
    model = _vgg()
    opt = optimizers.discriminative(model, {"head": 1e-2, "backbone": 1e-4})
    x, y = _train(model, opt)
    path = str(tmp_path / "m.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded.optimizer, optimizers.DiscriminativeOptimizer)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    reloaded.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.weights, reloaded.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_trains():
    model = _vgg()
    before = np.array(model.get_layer("head_output").kernel)
    opt = optimizers.discriminative(model, {"head": 1e-2, "backbone": 1e-4},
                                    gradient_accumulation_steps=2)
    _train(model, opt, steps=4)
    assert not np.array_equal(before, np.asarray(model.get_layer("head_output").kernel))


def test_mixed_precision_runs_and_trains():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _vgg()
        before = np.array(model.get_layer("backbone").get_layer("block5_conv3").kernel)
        opt = optimizers.discriminative(model, {"head": 1e-2, "backbone": 1e-3})
        _train(model, opt, auto_scale_loss=True)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert model.get_layer("head_output").compute_dtype == "float32"
        after = np.asarray(model.get_layer("backbone").get_layer("block5_conv3").kernel)
        assert not np.array_equal(before, after)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_weight_decay_skips_biases_and_norms():
    model = tiny_classifier(2, bn="train")
    kft.unfreeze(model)
    opt = optimizers.discriminative(model, {"head": 1e-3}, optimizer="adamw",
                                    weight_decay=0.1)
    inner = opt.optimizers[0]
    by_name = {w.name: w for w in model.weights}
    assert not inner._use_weight_decay(by_name["bias"])
    assert not inner._use_weight_decay(by_name["gamma"])
    assert inner._use_weight_decay(by_name["kernel"])
    keep = optimizers.discriminative(model, {"head": 1e-3}, optimizer="adamw",
                                     weight_decay=0.1, exclude_from_weight_decay=())
    assert keep.optimizers[0]._use_weight_decay(by_name["bias"])


def test_transformer_blocks_of_a_keras_hub_backbone():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=3, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=16)
    inputs = backbone.input
    pooled = backbone(inputs)["pooled_output"]
    outputs = keras.layers.Dense(2, name="head_output")(pooled)
    model = keras.Model(inputs, outputs)
    names = [n for n, _ in optimizers.lr_blocks(model)]
    assert names[0] == "embeddings"
    assert names[1:4] == ["transformer_layer_0", "transformer_layer_1",
                          "transformer_layer_2"]
    assert names[-1] == "head"
    opt = optimizers.layerwise_lr_decay(model, 1e-3, 0.8)
    rates = _rates(opt, model)
    assert rates["transformer_layer_0"] == pytest.approx(
        1e-3 * 0.8 ** (len(names) - 2))
    assert rates["embeddings"] == pytest.approx(1e-3 * 0.8 ** (len(names) - 1))


def test_fine_tune_stage_with_group_rates_range_and_layer_decay():
    x, y = make_images(16, classes=2)
    model = _vgg()
    histories = kft.fine_tune(model, (x, y), verbose=0, stages=[
        {"epochs": 1, "trainable": "all",
         "learning_rate": {"head": 1e-3, -1: 1e-4, "default": 0.0}},
    ])
    assert isinstance(model.optimizer, optimizers.DiscriminativeOptimizer)
    rates = _rates(model.optimizer, model)
    assert rates["default"] == 0.0 and rates["head"] == pytest.approx(1e-3)
    kft.fine_tune(model, (x, y), verbose=0, stages=[
        {"epochs": 1, "trainable": "all", "learning_rate": [1e-5, 1e-3],
         "schedule": "cosine", "warmup_epochs": 0.5}])
    assert len(model.optimizer.optimizers) == 7  # 5 blocks, head, default
    kft.fine_tune(model, (x, y), verbose=0, stages=[
        {"epochs": 1, "trainable": "all", "learning_rate": 1e-3,
         "layer_decay": 0.5, "optimizer": "adamw", "weight_decay": 0.01}])
    assert _rates(model.optimizer, model)["block5"] == pytest.approx(5e-4)
    assert histories[0].history["loss"]


@pytest.mark.parametrize("stage,match", [
    ({"epochs": 1, "learning_rate": [1e-3, 1e-5]}, "0 < low <= high"),
    ({"epochs": 1, "learning_rate": {"head": -1.0}}, "rates >= 0"),
    ({"epochs": 1, "learning_rate": {"head": 1.0}, "layer_decay": 0.5},
     "layer_decay takes one learning_rate"),
    ({"epochs": 1, "layer_decay": 2.0}, "stages.0.layer_decay"),
])
def test_bad_group_rates_in_stages(stage, match):
    with pytest.raises(ValueError, match=match):
        kft.fine_tune(_vgg(), (np.zeros((2, 32, 32, 3)), np.array([0, 1])),
                      stages=[stage])


def test_reduce_lr_on_plateau_scales_every_group():
    model = _vgg()
    opt = optimizers.discriminative(model, {"head": 1e-3, "backbone": 1e-5})
    x, y = make_images(8, classes=2)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    # min_delta=10: no epoch counts as an improvement, so it reduces each time.
    model.fit(x, y, epochs=3, verbose=0, callbacks=[
        keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0,
                                          min_delta=10.0)])
    rates = _rates(opt, model)
    assert rates["head"] < 1e-3
    assert rates["head"] / rates["backbone"] == pytest.approx(100.0)
