"""keras.distribution on JAX, on 4 host CPU devices: run by
test_keras_distribution.py as `KERAS_BACKEND=jax
XLA_FLAGS=--xla_force_host_platform_device_count=4 pytest
tests/distribute/jax_distribution_subset.py` (not collected otherwise).

The training tests train the same model twice from the same weights, on
one device and distributed, and compare the numbers; the last runs a
recipe end to end under model_parallel.
"""

import json

import keras
import numpy as np
import pytest
import yaml
from conftest import make_images
from llm_fixtures import tiny_causal_lm
from llm_fixtures import write_hf_checkpoint

import kft
from kft.data.sft import sft_dataset
from kft.distribute.mesh import keras_distribution
from kft.recipes import load_recipe
from kft.recipes.runner import run_recipe
from kft.sft.model import SFTCausalLM

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax"
    or len(keras.distribution.list_devices()) != 4,
    reason="runs under KERAS_BACKEND=jax with 4 host devices")

MESH = {"batch": 2, "model": 2}
RECORDS = [{"prompt": "a b", "completion": " c d"},
           {"prompt": "b a", "completion": " e"},
           {"prompt": "c", "completion": " a b"},
           {"prompt": "d e", "completion": " b"}]


def _weights(model):
    return {w.path: np.array(w) for w in model.weights}


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _losses(histories):
    return np.array([loss for h in histories for loss in h.history["loss"]])


# === data_parallel ===


def _classifier_run(distribution):
    x, y = make_images(16, classes=2)
    train = kft.data.from_numpy(x, y, batch_size=8, shuffle=False).train
    with keras_distribution(distribution):
        keras.utils.set_random_seed(0)
        model = kft.build_classifier("mobilenet_v2", 2, input_shape=(32, 32, 3),
                                     alpha=0.35, weights="fashion_mnist",
                                     head={"dropout": 0.0})
        # Per-group rates (a MultiOptimizer); the frozen blocks' BatchNorm
        # in inference mode, the top block's training on the global batch.
        histories = kft.fine_tune(model, train, stages=[
            {"name": "top", "epochs": 3, "trainable": {"last_n_blocks": 1},
             "learning_rate": {"head": 1e-2, "backbone": 1e-3}}], verbose=0)
        sharding = model.get_layer("head_output").kernel.value.sharding
    return _losses(histories), _weights(model), sharding


def test_data_parallel_on_4_devices_matches_one_device():
    one_loss, one_weights, one_sharding = _classifier_run("none")
    dp_loss, dp_weights, dp_sharding = _classifier_run("data_parallel")
    assert len(one_sharding.device_set) == 1
    assert len(dp_sharding.device_set) == 4 and dp_sharding.is_fully_replicated
    assert np.all(np.abs(one_loss[:-1] - one_loss[1:]) > 0)  # it trained
    np.testing.assert_allclose(dp_loss, one_loss, rtol=1e-5)
    assert _max_difference(one_weights, dp_weights) < 1e-4
    # The previous distribution (none) is current again.
    assert keras.distribution.distribution() is None


# === model_parallel: tiny Llama 3, keras-hub's layout map ===


def _sft_run(distribution, *, lora=False, packing=False):
    keras.utils.set_random_seed(0)
    import keras_hub

    distributed = distribution != "none"
    with keras_distribution(
            distribution, MESH if distributed else None,
            layout=keras_hub.models.Llama3Backbone if distributed else None) as d:
        lm = tiny_causal_lm(sequence_length=16)
        if lora:
            kft.lora.apply_lora(lm, targets="all-linear", rank=2, alpha=4)
        train = sft_dataset(RECORDS, lm, batch_size=4, shuffle=False,
                            packing=packing)
        model = SFTCausalLM(lm)
        before = _weights(model)
        histories = kft.fine_tune(model, train, stages=[
            {"name": "sft", "epochs": 3, "learning_rate": 1e-2,
             "trainable": "keep" if lora else "all"}], verbose=0)
        specs = {w.path: tuple(getattr(w.value.sharding, "spec", ()))
                 for w in model.weights}
        relaxed = dict(getattr(d, "relaxed", {}))
    return _losses(histories), before, _weights(model), specs, relaxed


def test_model_parallel_llama_shards_per_layout_map_and_matches_one_device():
    one_loss, _, one_weights, _, _ = _sft_run("none")
    mp_loss, _, mp_weights, specs, relaxed = _sft_run("model_parallel")
    # Sharded as keras-hub's LlamaBackbone.get_layout_map says ...
    layer = "transformer_layer_0"
    assert specs[f"{layer}/self_attention/query/kernel"] == ("model", "batch", None)
    assert specs[f"{layer}/self_attention/attention_output/kernel"] == (
        "model", None, "batch")
    assert specs[f"{layer}/feedforward_gate_dense/kernel"] == ("batch", "model")
    assert specs[f"{layer}/feedforward_output_dense/kernel"] == ("model", "batch")
    # ... except where a dimension does not divide: 267 tokens over 2.
    assert relaxed == {"token_embedding/embeddings": (("model", "batch"),
                                                      (None, "batch"))}
    assert specs["token_embedding/embeddings"] == (None, "batch")
    assert all(a is None for a in specs[f"{layer}/self_attention_layernorm/scale"])
    assert np.all(np.diff(one_loss) < 0)  # it learned
    np.testing.assert_allclose(mp_loss, one_loss, rtol=1e-5)
    assert _max_difference(one_weights, mp_weights) < 1e-4


def test_lora_sft_with_packing_trains_under_model_parallel():
    one_loss, _, one_weights, _, _ = _sft_run("none", lora=True, packing=True)
    mp_loss, before, mp_weights, specs, _ = _sft_run(
        "model_parallel", lora=True, packing=True)
    query = "transformer_layer_0/self_attention/query"
    # The frozen base stays sharded and unchanged; the adapters are
    # replicated (kft.distribute says why) and trained.
    assert specs[f"{query}/kernel"] == ("model", "batch", None)
    assert all(a is None for a in specs[f"{query}/lora_a"])
    assert all(a is None for a in specs[f"{query}/lora_b"])
    changed = {p for p in before if not np.array_equal(before[p], mp_weights[p])}
    assert f"{query}/lora_b" in changed
    assert not {p for p in changed
                if not p.rsplit("/", 1)[-1].startswith("lora_")}
    assert one_loss[-1] < one_loss[0]
    np.testing.assert_allclose(mp_loss, one_loss, rtol=1e-5)
    assert _max_difference(one_weights, mp_weights) < 1e-4


def test_mesh_and_layout_errors_are_clear():
    with pytest.raises(ValueError, match=r"spans batch 3 = 3 devices, but 4"):
        kft.distribute.make_distribution("data_parallel", {"batch": 3})
    with pytest.raises(ValueError, match="batch 2 x model 1 = 2 devices"):
        kft.distribute.make_distribution(
            "model_parallel", {"batch": 2, "model": 1}, layout="x")
    import keras_hub

    with pytest.raises(ValueError, match="no layout map for BertBackbone.*"
                                         "LlamaBackbone"):
        kft.distribute.make_distribution("model_parallel", MESH,
                                         layout=keras_hub.models.BertBackbone)
    with pytest.raises(ValueError, match="needs a layout map"):
        kft.distribute.make_distribution("model_parallel", MESH)


def test_recipe_runs_lora_sft_under_model_parallel(tmp_path):
    """The runner makes the distribution current for the whole run; the
    layout map comes from the checkpoint directory's config.json."""
    checkpoint = write_hf_checkpoint(tiny_causal_lm(), tmp_path / "tiny")
    mesh = kft.distribute.device_mesh("model_parallel", MESH)
    layouts = kft.distribute.layout_map(checkpoint, mesh)
    query = layouts["transformer_layer_3/self_attention/query/kernel"]
    assert tuple(query.axes) == ("model", "batch", None)
    with pytest.raises(ValueError, match="cannot tell which keras-hub backbone"):
        kft.distribute.layout_map(str(tmp_path / "missing"), mesh)

    with open(tmp_path / "sft.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in RECORDS * 2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "mp", "model": {"causal_lm": checkpoint, "sequence_length": 16},
        "data": {"source": "sft_file", "path": str(tmp_path / "sft.jsonl"),
                 "batch_size": 4, "validation_split": 0.25},
        "lora": {"targets": "all-linear", "rank": 2, "alpha": 4},
        "distribution": {"strategy": "model_parallel", "mesh": MESH},
        "stages": [{"name": "sft", "epochs": 2, "learning_rate": 1e-2}]}))
    _, metrics = run_recipe(load_recipe(str(recipe)), str(tmp_path / "run"),
                            verbose=0)
    assert metrics["distribution"] == {"strategy": "model_parallel", "replicas": 2}
    assert metrics["final"]["val"]["loss"] < metrics["final"]["val_before"]["loss"]
    assert (tmp_path / "run" / "adapter.npz").exists()
    assert keras.distribution.distribution() is None
