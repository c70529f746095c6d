"""kft on the JAX backend: run by test_backends.py as
`KERAS_BACKEND=jax pytest tests/jax_subset.py` (not collected otherwise)."""

import keras
import numpy as np
import pytest
from conftest import changed_after_fit
from conftest import make_images

import kft

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax",
                                reason="runs under KERAS_BACKEND=jax")


def test_fine_tune_with_per_group_rates_trains_only_what_it_should():
    x, y = make_images(16, classes=2)
    model = kft.build_classifier("mobilenet_v2", 2, input_shape=(32, 32, 3),
                                 alpha=0.35, weights="fashion_mnist")
    data = kft.data.from_numpy(x, y, batch_size=8, validation_split=0.25)
    before = {w.path: np.array(w) for w in model.weights}
    kft.fine_tune(model, data.train, data.val, stages=[
        {"name": "head", "epochs": 1},
        {"name": "top", "epochs": 1, "trainable": {"last_n_blocks": 2},
         "learning_rate": {"head": 1e-3, "backbone": 1e-4}}], verbose=0)
    changed = {w.path for w in model.weights
               if not np.array_equal(before[w.path], np.asarray(w))}
    assert any(p.startswith("head_output") for p in changed)
    blocks = kft.backbone_blocks(model)
    frozen = {w.path for layer in blocks[0] for w in layer.weights}
    assert not changed & frozen


def test_image_augmentation_layer_flips_only_flip():
    image = np.zeros((1, 8, 8, 3), "float32")
    image[0, :, :2] = 255.0
    layer = kft.augment.ImageAugmentation(horizontal_flip=True, seed=1).layer()
    outputs = np.asarray(layer(np.repeat(image, 16, axis=0), training=True))
    mirrored = image[:, :, ::-1]
    same = [np.allclose(o, image[0]) for o in outputs]
    flipped = [np.allclose(o, mirrored[0]) for o in outputs]
    assert all(s or f for s, f in zip(same, flipped)) and any(same) and any(flipped)


def test_lora_trains_adapters_saves_reloads_and_merges(tmp_path):
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, name="query")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    kft.lora.apply_lora(model, targets=("query",), rank=2, trainable=("head",))
    data = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    changed = changed_after_fit(model, data, np.arange(8) % 2, epochs=2)
    assert "query/kernel" not in changed and "query/lora_b" in changed
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(reloaded.predict(data, verbose=0),
                               model.predict(data, verbose=0), atol=1e-5)
    want = model.predict(data, verbose=0)
    kft.lora.merge_lora(model)
    np.testing.assert_allclose(model.predict(data, verbose=0), want, atol=1e-5)


def test_tensorflow_only_features_say_so():
    x, y = make_images(8, classes=2)
    model = kft.build_classifier("mobilenet_v2", 2, input_shape=(32, 32, 3),
                                 alpha=0.35)
    with pytest.raises(RuntimeError, match="TensorFlow backend only"):
        kft.fine_tune(model, (x, y), stages=[{"epochs": 1,
                                              "unfreeze": {"every": 1}}],
                      verbose=0)
    with pytest.raises(ValueError, match="TensorFlow backend"):
        kft.distribute.make_strategy("mirrored")


def test_remat_checkpoints_each_block_with_the_same_gradients():
    """On JAX `set_remat` is `jax.checkpoint` per transformer block (one
    optimization barrier each in the lowered step), with the plain step's
    loss and gradients."""
    import jax
    from llm_fixtures import tiny_causal_lm

    def step(remat):
        lm = tiny_causal_lm(sequence_length=16)
        model = kft.sft.SFTCausalLM(lm, remat=remat)
        model.compile(optimizer=keras.optimizers.SGD(1.0))
        (x, y, weight), _ = kft.sft.sft_examples(
            ["a b c d e", "b a", "c d a b"], lm, format="text", shuffle=False)
        data = (x, y, weight)
        model._symbolic_build(data_batch=data)  # what fit does first
        state = ([v.value for v in model.trainable_variables],
                 [v.value for v in model.non_trainable_variables],
                 [v.value for v in model.optimizer.variables],
                 [v.value for v in model.metrics_variables])
        lowered = jax.jit(model.train_step).lower(state, data)
        logs, (trainable, *_) = lowered.compile()(state, data)
        changes = [before - after for before, after in zip(state[0], trainable)]
        return (lowered.as_text().count("optimization_barrier"),
                float(logs["loss"]), changes)

    barriers, loss, changes = step(False)
    remat_barriers, remat_loss, remat_changes = step(True)
    assert barriers == 0 and remat_barriers == 2  # two transformer blocks
    assert remat_loss == pytest.approx(loss, abs=1e-5)
    for change, remat_change in zip(changes, remat_changes, strict=True):
        np.testing.assert_allclose(remat_change, change, atol=1e-5)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_plan_memory_is_within_15_percent_of_xla(method):
    """`kft.plan_memory`'s peak against XLA's memory analysis of the
    compiled train step (donated state, as Keras compiles it: arguments +
    temporaries), float32, a Llama 3 of hidden size 64."""
    import jax
    import keras_hub

    shape = dict(vocabulary_size=512, num_layers=2, num_query_heads=4,
                 num_key_value_heads=2, hidden_dim=64, intermediate_dim=128)
    lm = keras_hub.models.Llama3CausalLM(
        backbone=keras_hub.models.Llama3Backbone(**shape), preprocessor=None)
    if method == "lora":
        kft.lora.apply_lora(lm, targets="all-linear", rank=8)
    model = kft.sft.SFTCausalLM(lm)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    tokens = np.random.default_rng(0).integers(3, 512, (4, 257)).astype("int32")
    data = ({"token_ids": tokens[:, :-1], "padding_mask": np.ones((4, 256), bool)},
            tokens[:, 1:], np.ones((4, 256), "float32"))
    model._symbolic_build(data_batch=data)  # what fit does first
    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))
    memory = jax.jit(model.train_step, donate_argnums=0).lower(
        state, data).compile().memory_analysis()
    xla = memory.argument_size_in_bytes + memory.temp_size_in_bytes
    plan = kft.plan_memory(lm, method=method, sequence_length=256,
                           batch_size=4, dtype="float32", attention="xla")
    assert plan.peak == pytest.approx(xla, rel=0.15)
    state_bytes = sum(x.size * x.dtype.itemsize
                      for x in jax.tree_util.tree_leaves(state))
    counted = plan.weights + plan.adapters + plan.optimizer_state
    assert counted == pytest.approx(state_bytes, rel=1e-3)


def test_grpo_with_lora_trains_only_adapters_and_logs_its_metrics():
    from llm_fixtures import tiny_causal_lm

    lm = tiny_causal_lm(sequence_length=32)
    kft.lora.apply_lora(lm, targets="all-linear", rank=4, alpha=8)
    records = [{"prompt": f"{a}+{b}="} for a in range(3) for b in range(3)]
    model = kft.rl.RLCausalLM(
        lm, [lambda p, c, **k: [1.0 / (1 + len(x)) for x in c]],
        rollout=kft.rl.RolloutConfig(num_generations=4, max_new_tokens=4,
                                     max_prompt_length=8),
        beta=0.04, num_iterations=2)  # reference and old log-probs: score()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = {w.path: np.array(w) for w in lm.weights}
    history = model.fit(kft.rl.PromptDataset(records, batch_size=2), epochs=1,
                        steps_per_epoch=2, verbose=0)
    assert {"loss", "reward", "kl", "clip_fraction"} <= set(history.history)
    changed = {w.path for w in lm.weights
               if not np.array_equal(before[w.path], np.asarray(w))}
    assert changed and all("lora" in path for path in changed)
