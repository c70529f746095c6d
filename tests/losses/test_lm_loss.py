"""kft.losses.causal_lm: the chunked causal-LM cross-entropy, and token accuracy
only where it is asked for."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from llm_fixtures import tiny_causal_lm

from kft.data.sft import sft_dataset
from kft.losses.causal_lm import CausalLMLoss
from kft.losses.causal_lm import chunked_sparse_cross_entropy
from kft.sft.model import SFTCausalLM


def _batch(shape=(3, 10, 17), seed=0):
    rng = np.random.default_rng(seed)
    logits = (3 * rng.normal(size=shape)).astype("float32")
    labels = rng.integers(0, shape[-1], shape[:-1]).astype("int32")
    weights = (rng.uniform(size=shape[:-1]) > 0.3).astype("float32")
    return logits, labels, weights


def _value_and_gradient(loss, logits, labels, weights, dtype="float32"):
    variable = tf.Variable(tf.cast(logits, dtype))
    with tf.GradientTape() as tape:
        value = loss(labels, variable, weights)
    gradient = tape.gradient(value, variable)
    return value, gradient


@pytest.mark.parametrize("chunk_size", (1, 3, 4, 10, 64))
def test_chunked_loss_and_gradient_equal_keras_sparse_cross_entropy(chunk_size):
    logits, labels, weights = _batch()
    plain = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight")
    want, want_grad = _value_and_gradient(plain, logits, labels, weights)
    got, got_grad = _value_and_gradient(CausalLMLoss(chunk_size), logits,
                                        labels, weights)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad),
                               rtol=1e-5, atol=1e-7)
    per_token = chunked_sparse_cross_entropy(labels, logits, chunk_size)
    np.testing.assert_allclose(
        np.asarray(per_token),
        np.asarray(keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True)), rtol=1e-5, atol=1e-6)


def test_bfloat16_logits_are_never_float32_as_a_whole():
    """Only a chunk at a time is cast to float32; the gradient comes back in
    the logits' dtype."""
    logits, labels, weights = _batch((2, 12, 33))
    loss = CausalLMLoss(chunk_size=4)
    value, gradient = _value_and_gradient(loss, logits, labels, weights,
                                          "bfloat16")
    assert gradient.dtype == tf.bfloat16
    exact = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight")(
            labels, tf.cast(tf.cast(logits, "bfloat16"), "float32"), weights)
    np.testing.assert_allclose(float(value), float(exact), rtol=1e-5)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = loss(labels, x, weights)
        return tape.gradient(value, x)

    graph = tf.function(step).get_concrete_function(
        tf.TensorSpec(logits.shape, "bfloat16")).graph
    whole = [op.name for op in graph.get_operations() for t in op.outputs
             if t.dtype == tf.float32 and t.shape.rank == 3 and t.shape[1] == 12]
    assert not whole, whole


def test_config_round_trip_and_bad_chunk():
    loss = keras.losses.deserialize(keras.losses.serialize(CausalLMLoss(7)))
    assert isinstance(loss, CausalLMLoss) and loss.chunk_size == 7
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_sparse_cross_entropy(np.zeros((1, 2)), np.zeros((1, 2, 3)), 0)


def test_sft_model_tracks_token_accuracy_in_evaluation_only():
    lm = tiny_causal_lm(sequence_length=16)
    data = sft_dataset([{"prompt": "a b", "completion": " c d"},
                        {"prompt": "b a", "completion": " e"}], lm,
                       batch_size=2, shuffle=False)
    model = SFTCausalLM(lm)
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    history = model.fit(data, validation_data=data, epochs=1, verbose=0)
    assert "accuracy" not in history.history
    assert {"loss", "val_loss", "val_accuracy"} <= set(history.history)
    result = model.evaluate(data, verbose=0, return_dict=True)
    assert set(result) == {"loss", "accuracy"}
    # The default loss is Keras' sparse cross-entropy, token-weighted.
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"))
    plain = model.evaluate(data, verbose=0, return_dict=True)
    np.testing.assert_allclose(result["loss"], plain["loss"], rtol=1e-5)
    np.testing.assert_allclose(result["accuracy"], plain["accuracy"])
    model.compile(optimizer=keras.optimizers.SGD(1e-3), train_metrics=True)
    assert "accuracy" in model.fit(data, epochs=1, verbose=0).history
