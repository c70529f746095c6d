import keras
import numpy as np
import pytest
from conftest import changed_after_fit
from llm_fixtures import tiny_causal_lm

from kft.data.sft import sft_examples
from kft.lora.dense import LoRADense
from kft.lora.model import apply_lora
from kft.sft.model import SFTCausalLM


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
    assert trainable == {"adapted/lora_a", "adapted/lora_b"}
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


def _bert(hidden=8, seed=0):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=hidden,
        intermediate_dim=16, max_sequence_length=16)
    inputs = backbone.input
    outputs = keras.layers.Dense(3, name="head_output")(
        backbone(inputs)["pooled_output"])
    return keras.Model(inputs, outputs)


def _bert_inputs(n=8):
    rng = np.random.default_rng(0)
    return {"token_ids": rng.integers(1, 50, (n, 16)).astype("int32"),
            "segment_ids": np.zeros((n, 16), "int32"),
            "padding_mask": np.ones((n, 16), "int32")}


def test_apply_lora_on_a_keras_hub_backbone_trains_only_adapters_and_head():
    from kft.lora.base import lora_layers
    from kft.lora.model import apply_lora

    model = _bert()
    x = _bert_inputs()
    before_out = model.predict(x, verbose=0)
    count = apply_lora(model, targets=("query", "value"), rank=2, alpha=4,
                       trainable=("head_output",))
    assert count == 4  # 2 layers x (query, value)
    np.testing.assert_allclose(model.predict(x, verbose=0), before_out, atol=1e-6)
    trainable = {w.path for w in model.trainable_weights}
    assert all(p.endswith(("lora_a", "lora_b")) or p.startswith("head_output")
               for p in trainable)
    assert len(trainable) == 4 * 2 + 2
    changed = changed_after_fit(model, x, np.arange(8) % 3, epochs=2)
    # Only adapters and the head moved; every B and the head did move.
    assert changed <= trainable
    assert {p for p in trainable if p.endswith("lora_b")} <= changed
    assert "head_output/kernel" in changed
    assert len(lora_layers(model)) == 4


def test_merge_lora_keeps_outputs_and_leaves_plain_keras_layers(tmp_path):
    from kft.lora.base import lora_layers
    from kft.lora.model import apply_lora
    from kft.lora.model import merge_lora

    model = _bert()
    apply_lora(model, targets=("query", "value", "attention_output"), rank=2)
    for layer in lora_layers(model):
        layer.lora_b.assign(np.random.default_rng(1).normal(
            size=layer.lora_b.shape).astype("float32") * 0.1)
    x = _bert_inputs()
    want = model.predict(x, verbose=0)
    assert merge_lora(model) == 6
    np.testing.assert_allclose(model.predict(x, verbose=0), want, atol=1e-5)
    assert not lora_layers(model)
    assert "kft>" not in json_config(model)


def json_config(model):
    import json

    return json.dumps(model.get_config(), default=str)


def test_adapter_file_round_trip_and_clear_errors(tmp_path):
    from kft.lora.io import load_adapter
    from kft.lora.io import save_adapter
    from kft.lora.model import apply_lora

    base_weights = str(tmp_path / "base.weights.h5")
    model = _bert(seed=3)
    model.save_weights(base_weights)
    apply_lora(model, rank=2, alpha=4)
    from kft.lora.base import lora_layers

    for layer in lora_layers(model):
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.05, "float32"))
    x = _bert_inputs()
    want = model.predict(x, verbose=0)
    path = str(tmp_path / "adapter.npz")
    save_adapter(model, path)

    fresh = _bert(seed=9)
    fresh.load_weights(base_weights)
    assert load_adapter(fresh, path) == 4
    np.testing.assert_allclose(fresh.predict(x, verbose=0), want, atol=1e-5)

    with pytest.raises(ValueError, match="different base model"):
        load_adapter(_bert(hidden=12), path)
    other = _bert(seed=3)
    apply_lora(other, rank=4)
    with pytest.raises(ValueError, match="rank 2"):
        load_adapter(other, path)
    import os

    full = str(tmp_path / "full.weights.h5")
    model.save_weights(full)
    assert os.path.getsize(path) < os.path.getsize(full)


def test_apply_lora_errors_list_candidates():
    from kft.lora.model import apply_lora

    with pytest.raises(ValueError, match="Candidates: .*query"):
        apply_lora(_bert(), targets=("nonexistent",))


def test_keras_round_trip_keeps_nonzero_adapters(tmp_path):
    from kft.lora.model import apply_lora

    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, name="query")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    apply_lora(model, targets=("query",), rank=2, trainable=("head",))
    model.get_layer("query").lora_b.assign(np.full((2, 5), 0.2, "float32"))
    path = str(tmp_path / "m.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    layer = reloaded.get_layer("query")
    assert isinstance(layer, LoRADense)
    np.testing.assert_allclose(np.asarray(layer.lora_b), 0.2)
    data = np.ones((2, 6), "float32")
    np.testing.assert_allclose(reloaded.predict(data, verbose=0),
                               model.predict(data, verbose=0), rtol=1e-5)


def test_named_adapters_switch_and_disable(tmp_path):
    from kft.lora.adapters import active_adapter
    from kft.lora.adapters import disable_adapters
    from kft.lora.adapters import enable_adapters
    from kft.lora.adapters import set_adapter
    from kft.lora.base import lora_layers
    from kft.lora.io import load_adapter
    from kft.lora.io import save_adapter
    from kft.lora.model import apply_lora

    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="query")(inputs))
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    base = model.predict(x, verbose=0)
    apply_lora(model, targets=("query",), rank=2)
    layer = lora_layers(model)[0]
    outputs = {}
    for name, value in (("a", 0.1), ("b", -0.2)):
        layer.lora_b.assign(np.full((2, 3), value, "float32"))
        save_adapter(model, str(tmp_path / f"{name}.npz"))
        outputs[name] = model.predict(x, verbose=0)
    load_adapter(model, str(tmp_path / "a.npz"), name="a")
    load_adapter(model, str(tmp_path / "b.npz"), name="b")
    assert active_adapter(model) == "b"
    np.testing.assert_allclose(model.predict(x, verbose=0), outputs["b"], atol=1e-6)
    set_adapter(model, "a")
    np.testing.assert_allclose(model.predict(x, verbose=0), outputs["a"], atol=1e-6)
    disable_adapters(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), base, atol=1e-6)
    enable_adapters(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), outputs["a"], atol=1e-6)
    with pytest.raises(ValueError, match="No adapter named 'c'"):
        set_adapter(model, "c")


def test_keras_round_trip_inside_a_keras_hub_backbone_resumes_training(tmp_path):
    """keras-hub backbones save hyperparameters, not layers: kft's wrapping
    config brings the LoRA layers, their values and the frozen flags back."""
    from kft.lora.base import lora_layers
    from kft.lora.model import apply_lora

    model = _bert()
    apply_lora(model, targets=("query", "value"), rank=2,
               trainable=("head_output",))
    for layer in lora_layers(model):
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.05, "float32"))
    x = _bert_inputs()
    want = model.predict(x, verbose=0)
    trainable = sorted(w.path for w in model.trainable_weights)
    path = str(tmp_path / "bert_lora.keras")
    model.save(path)

    reloaded = keras.saving.load_model(path)
    assert len(lora_layers(reloaded)) == 4
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), want, atol=1e-6)
    assert sorted(w.path for w in reloaded.trainable_weights) == trainable
    # Training resumes on the adapters and head only, and it saves again.
    changed = changed_after_fit(reloaded, x, np.arange(8) % 3)
    assert changed and changed <= set(trainable)
    again = str(tmp_path / "again.keras")
    reloaded.save(again)
    np.testing.assert_allclose(
        keras.saving.load_model(again).predict(x, verbose=0),
        reloaded.predict(x, verbose=0), atol=1e-6)


def test_merged_keras_hub_model_saves_as_the_plain_backbone(tmp_path):
    from kft.lora.model import apply_lora
    from kft.lora.model import merge_lora

    model = _bert()
    apply_lora(model, rank=2)
    merge_lora(model)
    assert "kft>" not in json_config(model)
    path = str(tmp_path / "merged.keras")
    model.save(path)
    x = _bert_inputs()
    np.testing.assert_allclose(keras.saving.load_model(path).predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize("use_dora", (False, True))
def test_adapters_run_in_the_compute_dtype_and_train_float32_masters(use_dora):
    """Under bfloat16 no activation-sized tensor of the traced call is
    float32 (the adapters are cast, not the input); A and B stay float32
    and train; there is no random state without dropout."""
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        pytest.skip("inspects a TensorFlow graph")
    keras.utils.set_random_seed(0)
    layer = LoRADense(5, rank=2, alpha=4, use_dora=use_dora, dtype="bfloat16")
    layer.build((None, 6))
    assert {v.dtype for v in layer.trainable_weights} == {"float32"}
    assert not any("seed" in v.path for v in layer.variables)
    batch = 7  # no weight has this size
    graph = tf.function(layer).get_concrete_function(
        tf.TensorSpec((batch, 6), "bfloat16")).graph
    float32 = [op.name for op in graph.get_operations() for t in op.outputs
               if t.dtype == tf.float32 and t.shape.rank and t.shape[0] == batch]
    assert not float32, float32

    inputs = keras.Input((6,))
    model = keras.Model(inputs, layer(inputs))
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    assert keras.backend.standardize_dtype(model(x).dtype) == "bfloat16"
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, np.ones((8, 5)), epochs=2, verbose=0)
    assert layer.lora_b.dtype == "float32"
    assert np.abs(np.asarray(layer.lora_b)).sum() > 0


def test_bfloat16_lora_loss_curve_follows_float32_on_a_tiny_llama():
    """50 steps of all-linear LoRA under the bfloat16 policy (adapters cast
    to bfloat16 for each step, float32 masters) track the float32 run
    within bfloat16's precision."""
    records = [{"prompt": "a b", "completion": " c d e"},
               {"prompt": "b a", "completion": " e d"},
               {"prompt": "hello", "completion": " a a b"},
               {"prompt": "c", "completion": " b c"}]

    def losses(policy):
        keras.config.set_dtype_policy(policy)
        try:
            lm = tiny_causal_lm(sequence_length=16)
            apply_lora(lm, targets="all-linear", rank=4, alpha=8)
            (x, y, w), _ = sft_examples(records, lm, shuffle=False)
            model = SFTCausalLM(lm)
            model.compile(optimizer=keras.optimizers.Adam(1e-2))
            history = model.fit(x, y, sample_weight=w, batch_size=4, epochs=50,
                                verbose=0, shuffle=False)
        finally:
            keras.config.set_dtype_policy("float32")
        assert lm.backbone.compute_dtype == policy
        return np.array(history.history["loss"])

    exact, bf16 = losses("float32"), losses("bfloat16")
    assert exact[-1] < exact[0] - 0.2
    np.testing.assert_allclose(bf16, exact, rtol=2e-2)


def _two_dense_model():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, name="query")(inputs)
    outputs = keras.layers.Dense(3, name="value")(hidden)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("as_dict", [False, True])
def test_one_lora_config_object_for_the_api_and_the_recipes(as_dict):
    """`apply_lora(model, LoRAConfig(...))` (or its dict) is the keyword
    call; a recipe's `lora:` section is the same class."""
    from kft.lora.config import LoRAConfig
    from kft.recipes.schema import LoRAConfig as RecipeLoRAConfig

    config = LoRAConfig(targets=["value"], rank=2, alpha=4, use_rslora=True)
    by_object = _two_dense_model()
    assert apply_lora(by_object, config.model_dump() if as_dict else config) == 1
    by_keywords = _two_dense_model()
    apply_lora(by_keywords, targets=("value",), rank=2, alpha=4,
               use_rslora=True)
    for model in (by_object, by_keywords):
        layer = model.get_layer("value")
        assert isinstance(layer, LoRADense) and layer.rank == 2
        assert layer.scale == pytest.approx(4 / np.sqrt(2))
        assert not isinstance(model.get_layer("query"), LoRADense)
    assert issubclass(RecipeLoRAConfig, LoRAConfig)
    assert RecipeLoRAConfig().trainable == ["logits"]  # a recipe's default
    with pytest.raises(ValueError, match="rank"):
        apply_lora(_two_dense_model(), {"targets": ["value"], "rank": 0})
    with pytest.raises(ValueError, match="ranks"):
        apply_lora(_two_dense_model(), {"targets": ["value"], "ranks": 2})
