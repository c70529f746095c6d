"""Training calls of Dense / EinsumDense LoRA run `kft.lora.fused`: the
same outputs and gradients as the separate form, no kernel gradient."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from kft.lora.base import lora_layers
from kft.lora.fused import fused_lora_group
from kft.lora.fused import fused_lora_matmul
from kft.lora.model import apply_lora
from kft.lora.shared import share_inputs

RNG = np.random.default_rng(0)


def _gradients(function, *args):
    args = [tf.Variable(a) for a in args]
    with tf.GradientTape() as tape:
        outputs = function(*args)
        outputs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
        loss = sum(tf.reduce_sum(o * np.float32(i + 1) * o)
                   for i, o in enumerate(outputs))
    return [np.asarray(o) for o in outputs], tape.gradient(loss, args)


def _separate(x, kernel, a, b):
    return ops.matmul(x, kernel) + ops.matmul(ops.matmul(x, a), b)


def test_fused_matmul_equals_the_separate_form_with_gradients():
    x, w = RNG.normal(size=(10, 6)), RNG.normal(size=(6, 4))
    a, b = RNG.normal(size=(6, 2)), RNG.normal(size=(2, 4))
    args = [v.astype("float32") for v in (x, w, a, b)]
    (fused,), fused_grads = _gradients(fused_lora_matmul, *args)
    (plain,), plain_grads = _gradients(_separate, *args)
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_grads[:1] + fused_grads[2:],
                         plain_grads[:1] + plain_grads[2:]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                   rtol=1e-5, atol=1e-4)
    # The frozen kernel's cotangent is zeros (no weight gradient formed).
    assert not np.asarray(fused_grads[1]).any()


def test_fused_group_equals_each_member_separately():
    x = RNG.normal(size=(7, 6)).astype("float32")
    widths, ranks = (6, 3, 3), (2, 2, 2)
    kernels = [RNG.normal(size=(6, w)).astype("float32") for w in widths]
    a_parts = [RNG.normal(size=(6, r)).astype("float32") for r in ranks]
    b_parts = [RNG.normal(size=(r, w)).astype("float32")
               for r, w in zip(ranks, widths)]

    def group(x, *weights):
        return fused_lora_group(x, weights[:3], weights[3:6], weights[6:])

    def separate(x, *weights):
        return [_separate(x, w, a, b) for w, a, b in
                zip(weights[:3], weights[3:6], weights[6:])]

    outputs, grads = _gradients(group, x, *kernels, *a_parts, *b_parts)
    expected, want = _gradients(separate, x, *kernels, *a_parts, *b_parts)
    for got, exp in zip(outputs, expected):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5)
    for index in [0, *range(4, 10)]:  # x, every A and B (not the kernels)
        np.testing.assert_allclose(np.asarray(grads[index]), np.asarray(want[index]),
                                   rtol=1e-5, atol=1e-4)


def _attention_block():
    """q / k / v EinsumDense (the keras-hub layouts) and a gated MLP."""
    inputs = keras.Input((5, 8))
    q = keras.layers.EinsumDense("btd,ndh->btnh", (5, 2, 4), name="query")(inputs)
    k = keras.layers.EinsumDense("abc,cde->abde", (5, 1, 4), name="key")(inputs)
    v = keras.layers.EinsumDense("abc,cde->abde", (5, 1, 4), name="value")(inputs)
    mixed = keras.layers.Concatenate()([keras.layers.Reshape((5, 8))(q),
                                        keras.layers.Reshape((5, 4))(k),
                                        keras.layers.Reshape((5, 4))(v)])
    gate = keras.layers.Dense(6, name="feedforward_gate_dense")(mixed)
    up = keras.layers.Dense(6, name="feedforward_intermediate_dense")(mixed)
    outputs = keras.layers.Dense(3, name="down")(gate * up)
    return keras.Model(inputs, outputs)


def _random_b(model):
    for layer in lora_layers(model):
        layer.lora_b.assign(RNG.normal(size=layer.lora_b.shape).astype("float32"))


def _step(model, x, training):
    """`(outputs, gradients of the trainable variables)` of one call."""
    with tf.GradientTape() as tape:
        y = model(x, training=training)
        loss = tf.reduce_sum(y * y)
    return np.asarray(y), tape.gradient(loss, model.trainable_variables)


def _assert_same_step(model, trained, inferred):
    """A training call's outputs and gradients equal an inference call's
    (the separate form), gradients relative to their largest entry."""
    np.testing.assert_allclose(trained[0], inferred[0], rtol=1e-5, atol=1e-4)
    for variable, got, want in zip(model.trainable_variables, trained[1],
                                   inferred[1]):
        if want is None:  # a merged layer's adapter: out of both calls
            assert got is None, variable.path
            continue
        scale = np.abs(np.asarray(want)).max() or 1.0
        np.testing.assert_allclose(np.asarray(got) / scale,
                                   np.asarray(want) / scale, atol=1e-5,
                                   err_msg=variable.path)


@pytest.mark.parametrize("grouped", [True, False])
def test_training_calls_match_inference_calls_with_gradients(grouped, monkeypatch):
    from kft.lora.base import _LoRAMixin
    from kft.lora.shared import SharedInput

    model = _attention_block()
    apply_lora(model, targets=("query", "key", "value", "feedforward_gate_dense",
                               "feedforward_intermediate_dense", "down"), rank=2)
    if not grouped:
        for layer in lora_layers(model):
            layer._kft_shared_input = None
    else:
        assert share_inputs(model) == 2
    _random_b(model)
    x = RNG.normal(size=(3, 5, 8)).astype("float32")
    calls = []
    for owner, name in ((_LoRAMixin, "_fused_output"), (SharedInput, "fused")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda self, *a, _f=original, _n=name: (
            calls.append(_n) or _f(self, *a)))
    trained, inferred = _step(model, x, True), _step(model, x, False)
    # Training: every adapted layer fused (5 of 6 through their group);
    # inference: none.
    assert sorted(calls) == (["_fused_output"] + ["fused"] * 5 if grouped
                             else ["_fused_output"] * 6)
    _assert_same_step(model, trained, inferred)
    assert {v.path.rsplit("/", 1)[-1] for v in model.trainable_variables} == {
        "lora_a", "lora_b"}


def test_a_group_with_one_adapter_left_running_still_fuses():
    model = _attention_block()
    apply_lora(model, targets=("feedforward_gate_dense",
                               "feedforward_intermediate_dense"), rank=2)
    assert share_inputs(model) == 1
    _random_b(model)
    model.get_layer("feedforward_gate_dense").merge()  # up alone runs its adapter
    x = RNG.normal(size=(3, 5, 8)).astype("float32")
    _assert_same_step(model, _step(model, x, True), _step(model, x, False))


def test_dropout_dora_and_int8_layers_keep_the_separate_form(monkeypatch):
    from kft.lora.base import _LoRAMixin

    model = _attention_block()
    apply_lora(model, targets=("query",), rank=2, dropout=0.1)
    apply_lora(model, targets=("key",), rank=2, use_dora=True)
    apply_lora(model, targets=("value",), rank=2)
    fused = []
    original = _LoRAMixin._fused_output
    monkeypatch.setattr(_LoRAMixin, "_fused_output", lambda self, x: (
        fused.append(self.name) or original(self, x)))
    model(RNG.normal(size=(2, 5, 8)).astype("float32"), training=True)
    assert fused == ["value"]
    dense = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="up")])
    apply_lora(dense, targets=("up",), rank=2)
    dense.quantize("int8")  # Keras' int8 matmul already dequantizes once
    assert not lora_layers(dense)[0]._fuses()


def _int4_block():
    inputs = keras.Input((5, 16))
    q = keras.layers.EinsumDense("btd,ndh->btnh", (5, 2, 4), name="query")(inputs)
    k = keras.layers.EinsumDense("abc,cde->abde", (5, 2, 4), name="key")(inputs)
    mixed = keras.layers.Concatenate()([keras.layers.Reshape((5, 8))(q),
                                        keras.layers.Reshape((5, 8))(k)])
    outputs = keras.layers.Dense(3, name="down", activation="gelu")(mixed)
    model = keras.Model(inputs, outputs)
    model.quantize("int4")  # Keras' default: groups of 128 input rows
    return model


def test_grouped_int4_kernel_is_what_keras_computes_with():
    from kft._keras_internals import grouped_int4_kernel

    model = _int4_block()
    x = RNG.normal(size=(2, 5, 16)).astype("float32")
    for name in ("query", "key"):
        layer = model.get_layer(name)
        kernel = grouped_int4_kernel(layer)
        expected = np.asarray(layer(x))  # no bias
        np.testing.assert_array_equal(
            np.asarray(ops.einsum(layer.equation, x, kernel)), expected)
    assert grouped_int4_kernel(keras.layers.Dense(2)) is None


def test_qlora_int4_training_calls_dequantize_once_with_the_same_gradients(
        monkeypatch):
    import kft.lora.base as base

    model = _int4_block()
    apply_lora(model, targets=("query", "key", "down"), rank=2)
    assert share_inputs(model) == 1  # query and key
    _random_b(model)
    assert all(layer._fuses() for layer in lora_layers(model))
    x = RNG.normal(size=(3, 5, 16)).astype("float32")
    dequantized = []
    original = base.grouped_int4_kernel
    monkeypatch.setattr(base, "grouped_int4_kernel", lambda layer: (
        dequantized.append(layer.name) or original(layer)))
    trained = _step(model, x, True)
    # One dequantization per layer for the whole step: forward and
    # backward share it.
    assert sorted(dequantized) == ["down", "key", "query"]
    _assert_same_step(model, trained, _step(model, x, False))
