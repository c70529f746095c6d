import keras
import numpy as np
import pytest

from kft.lora import LoRADense


def _model(rank=2, alpha=4.0, dropout=0.0):
    inputs = keras.Input((6,))
    x = LoRADense(5, rank=rank, alpha=alpha, dropout=dropout, name="adapted")(inputs)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs)


def test_fresh_adapter_changes_nothing_and_only_adapters_train():
    model = _model()
    layer = model.get_layer("adapted")
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    plain = x @ np.asarray(layer._kernel) + np.asarray(layer.bias)
    np.testing.assert_allclose(np.asarray(layer(x)), plain, rtol=1e-5, atol=1e-6)
    trainable = {w.path for w in layer.trainable_weights}
    assert trainable == {"adapted/bias", "adapted/lora_a", "adapted/lora_b"}
    kernel = np.array(layer._kernel)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, np.ones((8, 2)), epochs=2, verbose=0)
    np.testing.assert_array_equal(np.asarray(layer._kernel), kernel)
    assert np.abs(np.asarray(layer.lora_b)).sum() > 0


def test_forward_matches_the_formula_and_merge_unmerge_are_exact():
    model = _model(rank=3, alpha=6.0)
    layer = model.get_layer("adapted")
    rng = np.random.default_rng(1)
    layer.lora_b.assign(rng.normal(size=(3, 5)).astype("float32"))
    x = rng.normal(size=(4, 6)).astype("float32")
    a, b = np.asarray(layer.lora_a), np.asarray(layer.lora_b)
    kernel, bias = np.asarray(layer._kernel), np.asarray(layer.bias)
    want = x @ kernel + (6.0 / 3) * x @ a @ b + bias
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-4, atol=1e-5)
    kernel = np.array(layer._kernel)
    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-4, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(np.asarray(layer._kernel), kernel, atol=1e-6)


def test_rslora_scale_and_dropout_only_in_training():
    assert LoRADense(4, rank=4, alpha=8, use_rslora=True).scale == pytest.approx(4.0)
    layer = LoRADense(4, rank=2, alpha=4, dropout=0.5)
    x = np.ones((64, 6), "float32")
    layer.build((None, 6))
    layer.lora_b.assign(np.ones((2, 4), "float32"))
    np.testing.assert_allclose(layer(x, training=False), layer(x, training=False))
    assert not np.allclose(layer(x, training=True), layer(x, training=False))
    with pytest.raises(ValueError, match="rank=0"):
        LoRADense(4, rank=0)


def test_save_and_reload_keeps_adapters_and_predictions(tmp_path):
    model = _model()
    layer = model.get_layer("adapted")
    layer.lora_b.assign(np.full((2, 5), 0.3, "float32"))
    x = np.random.default_rng(2).normal(size=(3, 6)).astype("float32")
    path = str(tmp_path / "lora.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-5)
    again = reloaded.get_layer("adapted")
    np.testing.assert_allclose(np.asarray(again.lora_b), 0.3)
    assert not again._kernel.trainable


def test_no_unfreeze_can_make_the_base_kernel_trainable():
    import kft

    model = _model()
    kft.freeze(model)
    kft.unfreeze(model)
    model.trainable = True
    layer = model.get_layer("adapted")
    layer.trainable = False
    layer.trainable = True
    paths = {w.path for w in model.trainable_weights}
    assert "adapted/kernel" not in paths and "adapted/lora_a" in paths
