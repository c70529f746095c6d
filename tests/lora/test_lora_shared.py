"""Adapters that read one input computed together (`kft.lora.shared`): the
same outputs and gradients as separate adapters, groups formed wherever
LoRA layers are made, and exact results when siblings read different
inputs."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from llm_fixtures import tiny_causal_lm

from kft.lora.base import lora_layers
from kft.lora.io import load_adapter
from kft.lora.io import save_adapter
from kft.lora.model import apply_lora
from kft.lora.shared import SharedInput
from kft.lora.shared import share_inputs

BATCH = {"token_ids": np.array([[1, 5, 6, 7, 2, 0], [1, 9, 3, 2, 0, 0]], "int32"),
         "padding_mask": np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], bool)}


def _groups(model):
    found = {id(layer._kft_shared_input): layer._kft_shared_input
             for layer in lora_layers(model)
             if getattr(layer, "_kft_shared_input", None) is not None}
    return sorted(tuple(m.name for m in g.layers) for g in found.values())


def _random_b(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model):
        layer.lora_b.assign(0.1 * rng.normal(size=layer.lora_b.shape))


def _ungrouped(model):
    for layer in lora_layers(model):
        layer._kft_shared_input = None


def _loss_and_grads(lm):
    variables = [v for layer in lora_layers(lm) for v in (layer.lora_a, layer.lora_b)]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(lm(BATCH)))
    return float(loss), [np.asarray(g) for g in tape.gradient(loss, variables)]


def test_query_key_value_and_gate_up_share_one_input_with_the_same_results():
    lm = tiny_causal_lm()
    apply_lora(lm, targets="all-linear", rank=4)
    layers = len(lm.backbone.transformer_layers)
    assert _groups(lm) == sorted(
        [("query", "key", "value")] * layers
        + [("feedforward_gate_dense", "feedforward_intermediate_dense")] * layers)
    _random_b(lm)
    grouped_loss, grouped_grads = _loss_and_grads(lm)
    _ungrouped(lm)
    loss, grads = _loss_and_grads(lm)
    np.testing.assert_allclose(grouped_loss, loss, rtol=1e-6)
    for grouped, separate in zip(grouped_grads, grads):
        scale = np.abs(separate).max()
        assert scale > 0  # every A and B gets a gradient
        # float32 sums in another order: equal to a few ulps of the largest
        np.testing.assert_allclose(grouped, separate, rtol=0, atol=1e-5 * scale)


def test_each_group_computes_once_per_input(monkeypatch):
    lm = tiny_causal_lm()
    apply_lora(lm, targets="all-linear", rank=4)
    computed = []
    update = SharedInput.update

    def counting(self, layer, x, dtype, training=False):
        if x is not self._input or (dtype, False) != self._kind:
            computed.append(tuple(m.name for m in self.layers))
        return update(self, layer, x, dtype, training)

    monkeypatch.setattr(SharedInput, "update", counting)
    lm(BATCH)
    assert sorted(computed) == _groups(lm)
    groups = {id(layer._kft_shared_input): layer._kft_shared_input
              for layer in lora_layers(lm) if layer._kft_shared_input}
    # once every member has its part, a group holds no activation
    assert all(g._input is None and not g._parts for g in groups.values())


class _CrossAttention(keras.layers.Layer):
    """Siblings named like self-attention's, the query reading another input."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.query = keras.layers.Dense(4, name="query")
        self.key = keras.layers.Dense(4, name="key")
        self.value = keras.layers.Dense(4, name="value")

    def call(self, inputs):
        decoder, encoder = inputs
        return self.query(decoder) * self.key(encoder) + self.value(encoder)


def test_siblings_reading_different_inputs_stay_exact():
    decoder, encoder = keras.Input((5, 6)), keras.Input((5, 6))
    model = keras.Model([decoder, encoder], _CrossAttention()([decoder, encoder]))
    apply_lora(model, targets=("query", "key", "value"), rank=2)
    assert _groups(model) == [("query", "key", "value")]
    _random_b(model)
    rng = np.random.default_rng(1)
    x = [rng.normal(size=(2, 5, 6)).astype("float32") for _ in range(2)]
    grouped = np.asarray(model(x))
    _ungrouped(model)
    np.testing.assert_allclose(grouped, np.asarray(model(x)), rtol=1e-6, atol=1e-6)


def test_a_group_draws_one_dropout_mask(monkeypatch):
    lm = tiny_causal_lm()
    apply_lora(lm, targets="all-linear", rank=4, dropout=0.5)
    groups = _groups(lm)
    assert groups == _groups_without_dropout()
    _random_b(lm)
    expected = np.asarray(lm(BATCH))  # inference: no dropout
    calls = []
    dropout = keras.random.dropout
    monkeypatch.setattr(keras.random, "dropout", lambda x, *a, **k: (
        calls.append(tuple(x.shape)) or dropout(x, *a, **k)))
    trained = np.asarray(lm(BATCH, training=True))
    grouped = sum(len(group) for group in groups)
    assert len(calls) == len(groups) + len(lora_layers(lm)) - grouped
    assert np.abs(trained - expected).max() > 1e-4  # the masks did apply
    np.testing.assert_allclose(np.asarray(lm(BATCH)), expected, atol=1e-6)


def _groups_without_dropout():
    lm = tiny_causal_lm()
    apply_lora(lm, targets="all-linear", rank=4)
    return _groups(lm)


def test_groups_after_loading(tmp_path):
    import keras_hub

    bert = keras_hub.models.BertBackbone(
        vocabulary_size=20, num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8)
    apply_lora(bert, targets=("query", "key", "value"), rank=2)
    _random_b(bert)
    inputs = {"token_ids": np.array([[2, 5, 7, 3, 0, 0, 0, 0]], "int32"),
              "segment_ids": np.zeros((1, 8), "int32"),
              "padding_mask": np.array([[1, 1, 1, 1, 0, 0, 0, 0]], bool)}
    path = tmp_path / "bert.keras"  # kft's LoRA container of a keras-hub backbone
    bert.save(path)
    loaded = keras.saving.load_model(path)
    assert _groups(loaded) == _groups(bert) == [("query", "key", "value")]
    for name in ("sequence_output", "pooled_output"):
        np.testing.assert_allclose(np.asarray(loaded(inputs)[name]),
                                   np.asarray(bert(inputs)[name]), rtol=1e-5,
                                   atol=1e-6)
    lm = tiny_causal_lm()
    apply_lora(lm, targets="all-linear", rank=4)
    _random_b(lm)
    expected = np.asarray(lm(BATCH))
    save_adapter(lm, tmp_path / "adapter")
    fresh = tiny_causal_lm()
    load_adapter(fresh, tmp_path / "adapter")
    assert _groups(fresh) == _groups(lm)
    np.testing.assert_allclose(np.asarray(fresh(BATCH)), expected, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("names", [("query", "key"), ("feedforward_gate_dense",)])
def test_share_inputs_counts_only_complete_enough_groups(names):
    lm = tiny_causal_lm()
    apply_lora(lm, targets=list(names), rank=2)
    expected = len(lm.backbone.transformer_layers) if len(names) > 1 else 0
    assert share_inputs(lm) == expected
