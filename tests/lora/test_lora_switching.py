"""Switching adapters off, merging and unmerging without a flag in the step:
no per-layer variable, no retrace, nothing lost (issue 24)."""

import keras
import numpy as np
import pytest

from kft.lora.adapters import adapters_disabled
from kft.lora.adapters import disable_adapters
from kft.lora.adapters import enable_adapters
from kft.lora.base import lora_layers
from kft.lora.io import load_adapter
from kft.lora.io import save_adapter
from kft.lora.model import apply_lora

X = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")


def _model(use_dora=False):
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, name="up")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="down")(hidden))
    base = model.predict(X, verbose=0)
    apply_lora(model, targets=("up", "down"), rank=2, use_dora=use_dora)
    for layer in lora_layers(model):
        layer.lora_b.assign(np.random.default_rng(1).normal(
            size=layer.lora_b.shape).astype("float32") * 0.3)
    return model, base


def test_no_layer_carries_a_flag_variable():
    model, _ = _model()
    names = {v.path.rsplit("/", 1)[-1] for v in model.weights}
    assert names == {"kernel", "bias", "lora_a", "lora_b"}
    assert len(model.weights) == 4 + 2 * 2


@pytest.mark.parametrize("use_dora", [False, True])
def test_disable_and_merge_reach_functions_traced_before(use_dora):
    model, base = _model(use_dora)
    adapted = model.predict(X, verbose=0)
    traced = model.predict_function
    assert np.abs(adapted - base).max() > 1e-2
    disable_adapters(model)
    np.testing.assert_allclose(model.predict(X, verbose=0), base, atol=1e-5)
    enable_adapters(model)
    np.testing.assert_allclose(model.predict(X, verbose=0), adapted, atol=1e-6)
    for layer in lora_layers(model):
        layer.merge()
    np.testing.assert_allclose(model.predict(X, verbose=0), adapted, atol=1e-5)
    for layer in lora_layers(model):
        layer.unmerge()
    np.testing.assert_allclose(model.predict(X, verbose=0), adapted, atol=1e-5)
    assert model.predict_function is traced  # nothing retraced


def test_switched_off_adapters_save_as_trained(tmp_path):
    model, base = _model()
    adapted = model.predict(X, verbose=0)
    trained = [np.array(layer.lora_b) for layer in lora_layers(model)]
    disable_adapters(model)
    save_adapter(model, str(tmp_path / "a.npz"))
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(reloaded.predict(X, verbose=0), base, atol=1e-5)
    enable_adapters(reloaded)
    np.testing.assert_allclose(reloaded.predict(X, verbose=0), adapted, atol=1e-5)
    fresh, _ = _model()
    load_adapter(fresh, str(tmp_path / "a.npz"))
    for layer, b in zip(lora_layers(fresh), trained):
        np.testing.assert_array_equal(np.asarray(layer.lora_b), b)


def test_files_with_the_old_flag_load_switched_off_or_on():
    model, base = _model()
    adapted = model.predict(X, verbose=0)
    stores = [{v.name: np.array(v) for v in layer.variables}
              for layer in lora_layers(model)]
    for flag, expected in ((0.0, base), (1.0, adapted)):
        for layer, store in zip(lora_layers(model), stores):
            layer.load_own_variables({**store, "lora_active": np.float32(flag)})
        np.testing.assert_allclose(model.predict(X, verbose=0), expected,
                                   atol=1e-5)


def test_a_block_runs_the_base_without_adapter_work(monkeypatch):
    from kft.lora.base import _LoRAMixin

    model, base = _model()
    adapted = np.asarray(model(X))
    calls = []
    update = _LoRAMixin._update
    monkeypatch.setattr(_LoRAMixin, "_update",
                        lambda self, *a: calls.append(self.name) or update(self, *a))
    with adapters_disabled(model):
        np.testing.assert_allclose(np.asarray(model(X)), base, atol=1e-5)
    assert calls == []  # what a step traces in the block has no adapter
    np.testing.assert_allclose(np.asarray(model(X)), adapted, atol=1e-6)
    assert calls == ["up", "down"]
