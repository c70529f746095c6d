"""QLoRA: kft's LoRA layers over a base quantized by Keras (int8 / int4).

Each test builds a tiny model, quantizes it with `model.quantize`, and
asserts on numbers: the quantized base's output is kept, only the float32
adapters train, adapters move between fresh quantized copies of a base,
and merging into a quantized kernel costs a bounded, measured error.
"""

import gc
import warnings

import keras
import numpy as np
import pytest

from kft.lora.adapters import adapters_disabled
from kft.lora.base import lora_layers
from kft.lora.dense import LoRADense
from kft.lora.dense import LoRAEinsumDense
from kft.lora.io import load_adapter
from kft.lora.io import save_adapter
from kft.lora.model import apply_lora
from kft.lora.model import merge_lora

MODES = ("int8", "int4")
ADAPTERS = ("lora_a", "lora_b")


@pytest.fixture(autouse=True)
def _no_gc_per_deleted_variable(monkeypatch):
    """Keras' `quantize()` runs `gc.collect()` for every float kernel it
    deletes (~0.3 s each with TensorFlow loaded); tiny tests need no
    memory back."""
    monkeypatch.setattr(gc, "collect", lambda *args: 0)


def _quantize(model, mode):
    # Keras warns for every layer that cannot be quantized (InputLayer).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.quantize(mode)
    return model


def _mlp(seed=0, activation=None):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16,))
    x = keras.layers.Dense(24, activation=activation, name="up")(inputs)
    x = keras.layers.Dense(16, name="down")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 16)).astype("float32"),
            rng.normal(size=(n, 3)).astype("float32"))


def _fit(model, x, y, epochs=3):
    """Fits with Adam on MSE; returns the paths of the weights that changed
    and the loss history."""
    before = {w.path: np.array(w) for w in model.weights}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    loss = model.fit(x, y, epochs=epochs, verbose=0).history["loss"]
    changed = {w.path for w in model.weights
               if not np.array_equal(before[w.path], np.asarray(w))}
    return changed, loss


def _perturb(model, size=0.1, seed=1):
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model):
        layer.lora_b.assign(
            rng.normal(size=layer.lora_b.shape).astype("float32") * size)


@pytest.mark.parametrize("mode", MODES)
def test_fresh_adapters_keep_the_quantized_output_and_only_they_train(mode):
    model = _quantize(_mlp(), mode)
    x, y = _data()
    base = model.predict(x, verbose=0)
    assert apply_lora(model, targets=("up", "down"), rank=4) == 2
    np.testing.assert_array_equal(model.predict(x, verbose=0), base)
    layer = model.get_layer("up")
    assert isinstance(layer, LoRADense) and layer.quantization_mode == mode
    dtypes = {w.name: str(w.dtype) for w in layer.weights}
    assert dtypes["kernel"] == "int8" and dtypes["lora_a"] == "float32"
    trainable = {w.path for w in model.trainable_weights}
    assert trainable == {f"{n}/{a}" for n in ("up", "down") for a in ADAPTERS}

    changed, loss = _fit(model, x, y, epochs=5)
    # Every weight but the adapters, the int8 / int4 kernels, scales and
    # zero points included, is bit-identical after training.
    assert changed == trainable
    assert loss[-1] < loss[0]


@pytest.mark.parametrize("mode", MODES)
def test_adapters_trained_on_a_quantized_base_load_onto_a_fresh_copy(
        mode, tmp_path):
    base_weights = str(tmp_path / "base.weights.h5")
    model = _mlp(seed=3)
    model.save_weights(base_weights)
    _quantize(model, mode)
    apply_lora(model, targets=("up", "down"), rank=2)
    x, y = _data()
    _fit(model, x, y)
    want = model.predict(x, verbose=0)
    path = str(tmp_path / "adapter.npz")
    save_adapter(model, path)

    fresh = _mlp(seed=9)
    fresh.load_weights(base_weights)
    _quantize(fresh, mode)
    assert load_adapter(fresh, path) == 2
    np.testing.assert_allclose(fresh.predict(x, verbose=0), want, atol=1e-5)
    assert {w.path for w in fresh.trainable_weights} == {
        f"{n}/{a}" for n in ("up", "down") for a in ADAPTERS}

    # The float base, or the other mode, is another base.
    other = "int4" if mode == "int8" else "int8"
    for wrong in (_mlp(seed=3), _quantize(_mlp(seed=3), other)):
        with pytest.raises(ValueError, match=f"quantization \\['{mode}'\\]"):
            load_adapter(wrong, path)


@pytest.mark.parametrize("mode", MODES)
def test_lora_then_quantize_equals_quantize_then_lora(mode, tmp_path):
    """Keras' `quantize` reaches the frozen base of a LoRA layer; the float
    kernel it replaces leaves the model's weights."""
    x, _ = _data()
    first = _quantize(_mlp(activation="gelu"), mode)
    apply_lora(first, targets=("up",), rank=2)
    _perturb(first)
    path = str(tmp_path / "a.npz")
    save_adapter(first, path)

    second = _mlp(activation="gelu")
    apply_lora(second, targets=("up",), rank=2)
    _quantize(second, mode)
    layer = second.get_layer("up")
    assert isinstance(layer, LoRADense) and layer.quantization_mode == mode
    assert sorted(w.path for w in second.weights) == sorted(
        w.path for w in first.weights)
    load_adapter(second, path)  # same fingerprint
    np.testing.assert_array_equal(second.predict(x, verbose=0),
                                  first.predict(x, verbose=0))
    layer = LoRADense(4)
    layer.build((None, 3))
    with pytest.raises(NotImplementedError, match="Received: mode='float8'"):
        layer.quantize("float8")


def _with_update(model, x, layer_name):
    """The layer's output with adapters, and the formula's: the quantized
    base (adapters disabled) plus scale * x @ A @ B before the activation."""
    layer = model.get_layer(layer_name)
    probe = keras.Model(model.input, layer.output)
    got = np.asarray(probe(x))
    layer.activation = keras.activations.linear
    with adapters_disabled(model):
        base = np.asarray(probe(x))
    layer.activation = keras.activations.gelu
    update = layer.scale * x @ np.asarray(layer.lora_a) @ np.asarray(layer.lora_b)
    return got, np.asarray(keras.activations.gelu(base + update))


@pytest.mark.parametrize("mode", MODES)
def test_update_joins_the_quantized_base_before_the_activation(mode):
    model = _quantize(_mlp(activation="gelu"), mode)
    apply_lora(model, targets=("up",), rank=3, alpha=6)
    _perturb(model, size=0.3)
    got, want = _with_update(model, _data()[0], "up")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# Measured (see kft.lora.merge_lora): max |error| / max |output| of 0.3-0.5%
# for int8 and 5-7% for int4 at 16x12 ... 576x1536; asserted with headroom.
MERGE_BOUNDS = {"int8": 0.015, "int4": 0.15}


@pytest.mark.parametrize("mode", MODES)
def test_merge_into_a_quantized_kernel_has_a_bounded_error(mode):
    model = _quantize(_mlp(), mode)
    apply_lora(model, targets=("up",), rank=4)
    layer = model.get_layer("up")
    _perturb(model, size=0.05)
    x, _ = _data(n=256)
    before = model.predict(x, verbose=0)
    state = [np.array(v) for v in layer.weights]
    layer.merge()
    merged = model.predict(x, verbose=0)
    error = np.abs(merged - before).max() / np.abs(before).max()
    assert 0 < error < MERGE_BOUNDS[mode]
    layer.unmerge()  # the kernel from before the merge comes back exactly
    for variable, value in zip(layer.weights, state):
        np.testing.assert_array_equal(np.asarray(variable), value)
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)

    assert merge_lora(model) == 1
    layer = model.get_layer("up")
    assert type(layer) is keras.layers.Dense and layer.quantization_mode == mode
    np.testing.assert_allclose(model.predict(x, verbose=0), merged, atol=1e-6)


def test_unmerge_of_a_reloaded_merged_quantized_layer_is_refused(tmp_path):
    model = _quantize(_mlp(), "int8")
    apply_lora(model, targets=("up",), rank=2)
    _perturb(model)
    model.get_layer("up").merge()
    path = str(tmp_path / "merged.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    x, _ = _data()
    np.testing.assert_allclose(reloaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-6)
    with pytest.raises(ValueError, match="cannot be undone exactly"):
        reloaded.get_layer("up").unmerge()


@pytest.mark.parametrize("mode", MODES)
def test_keras_round_trip_with_a_quantized_base(mode, tmp_path):
    model = _quantize(_mlp(activation="gelu"), mode)
    apply_lora(model, targets=("up", "down"), rank=2, trainable=("head",))
    _perturb(model)
    x, _ = _data()
    path = str(tmp_path / "qlora.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    layer = reloaded.get_layer("up")
    assert isinstance(layer, LoRADense) and layer.quantization_mode == mode
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0),
                                  model.predict(x, verbose=0))
    assert sorted(w.path for w in reloaded.trainable_weights) == sorted(
        w.path for w in model.trainable_weights)


def _attention_query(equation, kernel_axes, mode):
    """A keras-hub style query projection: (batch, time, 16) -> 2 heads x 4."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 16))
    query = keras.layers.EinsumDense(equation, (None, 2, 4), name="query")
    model = keras.Model(inputs, query(inputs))
    assert query.kernel.shape == kernel_axes
    return _quantize(model, mode) if mode else model


@pytest.mark.parametrize("mode", (None, *MODES))
@pytest.mark.parametrize("equation,kernel_shape", [
    ("btd,dnh->btnh", (16, 2, 4)),  # Llama / GPT-2 style
    ("btd,ndh->btnh", (2, 16, 4)),  # Gemma: the contracted axis in the middle
])
def test_lora_einsum_over_a_quantized_attention_query(mode, equation,
                                                      kernel_shape):
    model = _attention_query(equation, kernel_shape, mode)
    x = np.random.default_rng(0).normal(size=(4, 5, 16)).astype("float32")
    base = np.asarray(model(x))
    apply_lora(model, targets=("query",), rank=2, alpha=4)
    layer = model.get_layer("query")
    assert isinstance(layer, LoRAEinsumDense)
    np.testing.assert_array_equal(np.asarray(model(x)), base)
    _perturb(model, size=0.2)
    update = 2.0 * x @ np.asarray(layer.lora_a) @ np.asarray(layer.lora_b)
    want = base + update.reshape(4, 5, 2, 4)
    got = np.asarray(model(x))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    layer.merge()
    error = np.abs(np.asarray(model(x)) - got).max() / np.abs(got).max()
    assert error < (MERGE_BOUNDS[mode] if mode else 1e-6)
    layer.unmerge()  # exact when quantized; float rounding otherwise
    np.testing.assert_allclose(np.asarray(model(x)), got, atol=0 if mode else 1e-5)


def _bytes_by_dtype(model):
    sizes = {}
    for w in model.weights:
        dtype = str(w.dtype)
        sizes[dtype] = sizes.get(dtype, 0) + (
            np.dtype(dtype).itemsize * int(np.prod(w.shape)))
    return sizes


def _llama3(seed=0):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(seed)
    return keras_hub.models.Llama3Backbone(
        vocabulary_size=64, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=32, intermediate_dim=64)


def _tokens(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"token_ids": rng.integers(1, 64, (n, 8)).astype("int32"),
            "padding_mask": np.ones((n, 8), "int32")}


def test_int8_base_with_lora_holds_far_fewer_bytes_than_float32():
    float_model = _llama3()
    apply_lora(float_model, targets="all-linear", rank=4)
    int8_model = _quantize(_llama3(), "int8")
    apply_lora(int8_model, targets="all-linear", rank=4)
    float_bytes = _bytes_by_dtype(float_model)
    int8_bytes = _bytes_by_dtype(int8_model)
    assert set(float_bytes) == {"float32"}
    assert set(int8_bytes) == {"int8", "float32"}
    # The same adapters (float32) on both; measured ratio 0.39 at this tiny
    # size, where norms and adapters weigh most.
    ratio = sum(int8_bytes.values()) / sum(float_bytes.values())
    assert ratio < 0.45


def test_llama3_int8_backbone_trains_query_value_adapters_only(tmp_path):
    """keras-hub's Llama attention names its projections `query`, `key`,
    `value`, `attention_output` (attributes `_query_dense`, ...)."""
    base_weights = str(tmp_path / "llama.weights.h5")
    backbone = _llama3()
    backbone.save_weights(base_weights)
    _quantize(backbone, "int8")
    x = _tokens()
    base = backbone.predict(x, verbose=0)
    assert apply_lora(backbone, targets=("query", "value"), rank=2) == 4
    np.testing.assert_array_equal(backbone.predict(x, verbose=0), base)
    adapters = {w.path for w in backbone.trainable_weights}
    assert len(adapters) == 8 and all(p.endswith(ADAPTERS) for p in adapters)
    y = np.random.default_rng(1).normal(size=base.shape).astype("float32")
    changed, loss = _fit(backbone, x, y, epochs=4)
    assert loss[-1] < loss[0]
    assert changed == adapters

    path = str(tmp_path / "llama_adapter.npz")
    save_adapter(backbone, path)
    fresh = _llama3(seed=5)
    fresh.load_weights(base_weights)
    _quantize(fresh, "int8")
    assert load_adapter(fresh, path) == 4
    np.testing.assert_allclose(fresh.predict(x, verbose=0),
                               backbone.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("targets,per_block", [
    ("attention", 4), ("mlp", 3), ("all-linear", 7), (("attention", "mlp"), 7)])
def test_target_presets_on_llama3(targets, per_block):
    backbone = _llama3()
    assert apply_lora(backbone, targets=targets, rank=2) == 2 * per_block
    names = {layer.name for layer in lora_layers(backbone)}
    assert "token_embedding" not in names
    if targets == "attention":
        assert names == {"query", "key", "value", "attention_output"}


def test_target_presets_cover_keras_hub_families_and_need_a_backbone():
    keras_hub = pytest.importorskip("keras_hub")
    from kft.lora.model import LORA_TARGET_PRESETS

    for name, entry in LORA_TARGET_PRESETS.items():
        assert hasattr(keras_hub.models, name), name
        assert set(entry) == {"attention", "mlp"}
    with pytest.raises(ValueError, match="'attention' is a preset .* none"):
        apply_lora(_mlp(), targets="attention")


def test_presets_adapt_gemma_and_gpt2_but_never_their_head():
    keras_hub = pytest.importorskip("keras_hub")
    gemma = keras_hub.models.GemmaBackbone(
        vocabulary_size=64, num_layers=1, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=16, intermediate_dim=32, head_dim=8)
    assert apply_lora(_quantize(gemma, "int8"), targets="all-linear") == 7
    gpt2 = keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=8)
    inputs = gpt2.input
    head = keras.layers.Dense(64, name="lm_head")(gpt2(inputs))
    model = keras.Model(inputs, head)
    assert apply_lora(model, targets="all-linear") == 6
    assert not isinstance(model.get_layer("lm_head"), LoRADense)


def test_unsupported_bases_are_refused_by_name():
    model = _quantize(_mlp(), "float8")
    with pytest.raises(ValueError, match="'up' is quantized as 'float8'"):
        apply_lora(model, targets=("up",))
    assert not lora_layers(model)
    model = _mlp()
    model.get_layer("up").enable_lora(2)
    with pytest.raises(ValueError, match="Keras' own LoRA"):
        apply_lora(model, targets=("up", "down"))
    assert not lora_layers(model)  # nothing converted before the refusal
