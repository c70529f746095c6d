"""kft.lora: LoRA adapters in Hugging Face PEFT's directory format.

Tiny keras-hub models built from configs. The layout checks do not trust
kft: they rebuild the Hugging Face weight from the keras-hub kernel as the
keras-hub converters do and apply PEFT's tensors with numpy.
"""

import json
import os
import shutil

import keras
import keras_hub
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from kft.lora.base import lora_layers
from kft.lora.model import apply_lora
from kft.lora.peft_families import supported_architectures
from kft.lora.peft_load import load_peft_adapter
from kft.lora.peft_save import save_peft_adapter

BERT = dict(vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16,
            intermediate_dim=32, max_sequence_length=16)
LLAMA = dict(vocabulary_size=64, num_layers=2, num_query_heads=4,
             num_key_value_heads=2, hidden_dim=32, intermediate_dim=64)
# keras-hub's GPT-2 converter derives intermediate_dim = 4 * n_embd.
GPT2 = dict(vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=16,
            intermediate_dim=64, max_sequence_length=16)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _bert(**kwargs):
    return keras_hub.models.BertBackbone(**BERT, **kwargs)


def _llama(**kwargs):
    return keras_hub.models.Llama3Backbone(**LLAMA, **kwargs)


def _llama_lm(backbone=None):
    return keras_hub.models.Llama3CausalLM(backbone=backbone or _llama(),
                                           preprocessor=None)


def _twin(model, build):
    """A second model from `build` with the same base weights."""
    other = build()
    other.set_weights(model.get_weights())
    return other


def _randomize(model, seed=0):
    """Non-zero adapters, so that a wrong layout changes the outputs."""
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model):
        layer.lora_a.assign(rng.normal(0.0, 0.3, tuple(layer.lora_a.shape)))
        layer.lora_b.assign(rng.normal(0.0, 0.3, tuple(layer.lora_b.shape)))
        if layer.use_dora:   # magnitudes away from the column norms
            magnitude = np.asarray(layer.lora_magnitude)
            layer.lora_magnitude.assign(
                magnitude * rng.uniform(0.5, 1.5, magnitude.shape))


def _bert_inputs():
    rng = np.random.default_rng(1)
    return {"token_ids": rng.integers(1, 100, (2, 8)).astype("int32"),
            "segment_ids": np.zeros((2, 8), "int32"),
            "padding_mask": np.ones((2, 8), "int32")}


def _llama_inputs():
    rng = np.random.default_rng(2)
    return {"token_ids": rng.integers(1, 64, (2, 6)).astype("int32"),
            "padding_mask": np.ones((2, 6), "int32")}


def _outputs(model, inputs):
    outputs = model(inputs)
    if isinstance(outputs, dict):
        return [np.asarray(outputs[key]) for key in sorted(outputs)]
    return [np.asarray(outputs)]


def _assert_same_outputs(first, second, inputs):
    for a, b in zip(_outputs(first, inputs), _outputs(second, inputs)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _read(path):
    with open(os.path.join(path, CONFIG)) as f:
        return json.load(f), load_file(os.path.join(path, WEIGHTS))


# --- Round trips --------------------------------------------------------------


def test_llama_causal_lm_names_shapes_config_and_round_trip(tmp_path):
    model = _llama_lm()
    base = _twin(model, _llama_lm)
    apply_lora(model, targets=("query", "value"), rank=4, alpha=8)
    _randomize(model)
    save_peft_adapter(model, str(tmp_path), base_model_name_or_path="tiny-llama")

    config, tensors = _read(tmp_path)
    shapes = {"q": {"A": (4, 32), "B": (32, 4)},   # 4 heads x head_dim 8
              "v": {"A": (4, 32), "B": (16, 4)}}   # 2 kv heads x head_dim 8
    expected = {
        f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight":
            shapes[p][ab]
        for i in (0, 1) for p in ("q", "v") for ab in ("A", "B")}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["use_rslora"] is False and config["use_dora"] is False
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}

    assert load_peft_adapter(base, str(tmp_path)) == 4
    _assert_same_outputs(model, base, _llama_inputs())
    # Only the adapters train after loading.
    assert {v.path.rsplit("/", 1)[-1] for v in base.trainable_weights} == {
        "lora_a", "lora_b"}


def test_kft_lora_save_and_load_adapter_speak_peft(tmp_path):
    from kft.lora.io import load_adapter
    from kft.lora.io import save_adapter

    model = _llama_lm()
    base = _twin(model, _llama_lm)
    apply_lora(model, targets="attention", rank=2, alpha=4)
    _randomize(model, seed=3)
    path = save_adapter(model, str(tmp_path / "peft"), format="peft")
    assert sorted(os.listdir(path)) == [CONFIG, WEIGHTS]
    assert _read(path)[0]["target_modules"] == ["k_proj", "o_proj", "q_proj",
                                                "v_proj"]
    assert load_adapter(base, path, format="peft") == 8
    _assert_same_outputs(model, base, _llama_inputs())
    with pytest.raises(ValueError, match="format must be one of"):
        save_adapter(model, str(tmp_path / "x"), format="onnx")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_dora_round_trip_writes_peft_magnitude_names(tmp_path, family):
    """DoRA: `use_dora: true` and PEFT's `<module>.lora_magnitude_vector`
    (saved without `.weight`, peft's `_get_adapter_state_dict`), `(out,)`;
    kft -> PEFT directory -> a fresh kft model gives the same outputs."""
    if family == "llama":
        model, inputs = _llama_lm(), _llama_inputs()
        base = _twin(model, _llama_lm)
        module = "model.layers.{i}.self_attn.{p}_proj"
        projections, outs = ("q", "v"), {"q": 32, "v": 16}
    else:
        model, inputs = _bert(), _bert_inputs()
        base = _twin(model, _bert)
        module = "encoder.layer.{i}.attention.self.{p}"
        projections, outs = ("query", "value"), {"query": 16, "value": 16}
    plain = _twin(model, _llama_lm if family == "llama" else _bert)
    apply_lora(model, targets=("query", "value"), rank=2, alpha=4,
               use_dora=True)
    _randomize(model)
    save_peft_adapter(model, str(tmp_path))

    config, tensors = _read(tmp_path)
    assert config["use_dora"] is True
    magnitudes = {name: tuple(value.shape) for name, value in tensors.items()
                  if "magnitude" in name}
    assert magnitudes == {
        f"base_model.model.{module.format(i=i, p=p)}.lora_magnitude_vector":
            (outs[p],) for i in (0, 1) for p in projections}
    assert len(tensors) == 3 * len(magnitudes)

    assert load_peft_adapter(base, str(tmp_path)) == 4
    assert all(layer.use_dora for layer in lora_layers(base))
    _assert_same_outputs(model, base, inputs)
    assert {v.path.rsplit("/", 1)[-1] for v in base.trainable_weights} == {
        "lora_a", "lora_b", "lora_magnitude"}
    # Existing layers must agree on DoRA.
    apply_lora(plain, targets=("query", "value"), rank=2, alpha=4)
    with pytest.raises(ValueError, match="use_dora=False; the adapter has "
                                         "use_dora=True"):
        load_peft_adapter(plain, str(tmp_path))


def test_mixed_dora_and_plain_layers_are_refused_for_peft_export(tmp_path):
    model = _llama()
    apply_lora(model, targets=("query",), rank=2, use_dora=True)
    apply_lora(model, targets=("value",), rank=2)
    with pytest.raises(ValueError, match="one use_dora for all modules"):
        save_peft_adapter(model, str(tmp_path))


def test_pissa_adapters_are_refused_for_peft_export(tmp_path):
    model = _llama_lm()
    apply_lora(model, targets=("query",), rank=2, init="pissa")
    with pytest.raises(ValueError, match="residual"):
        save_peft_adapter(model, str(tmp_path))


def test_llama_adapter_loads_with_or_without_the_task_prefix(tmp_path):
    """A CausalLM's adapter (`model.layers...`) loads on a bare backbone,
    and a backbone's (`layers...`) on a CausalLM."""
    lm = _llama_lm()
    backbone = _twin(lm.backbone, _llama)
    lm2 = _llama_lm(_twin(lm.backbone, _llama))
    apply_lora(lm, targets=("query", "value", "feedforward"), rank=2, alpha=4)
    _randomize(lm)
    save_peft_adapter(lm, str(tmp_path / "lm"))
    assert load_peft_adapter(backbone, str(tmp_path / "lm")) == 10
    _assert_same_outputs(lm.backbone, backbone, _llama_inputs())

    save_peft_adapter(backbone, str(tmp_path / "bare"))
    config, tensors = _read(tmp_path / "bare")
    assert config["task_type"] is None
    assert config["target_modules"] == [
        "down_proj", "gate_proj", "q_proj", "up_proj", "v_proj"]
    assert "base_model.model.layers.1.mlp.down_proj.lora_B.weight" in tensors
    load_peft_adapter(lm2, str(tmp_path / "bare"))
    _assert_same_outputs(lm, lm2, _llama_inputs())


def test_bert_backbone_names_shapes_and_round_trip(tmp_path):
    model = _bert()
    base = _twin(model, _bert)
    apply_lora(model, targets=("query", "value"), rank=4, alpha=8)
    _randomize(model)
    save_peft_adapter(model, str(tmp_path))

    config, tensors = _read(tmp_path)
    expected = {
        f"base_model.model.encoder.layer.{i}.attention.self.{p}.lora_{ab}.weight":
            (4, 16) if ab == "A" else (16, 4)
        for i in (0, 1) for p in ("query", "value") for ab in ("A", "B")}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert config["target_modules"] == ["query", "value"]
    assert config["task_type"] is None

    load_peft_adapter(base, str(tmp_path))
    _assert_same_outputs(model, base, _bert_inputs())


def test_bert_classifier_saves_head_as_modules_to_save(tmp_path):
    def build():
        return keras_hub.models.BertTextClassifier(
            backbone=_bert(), num_classes=3, preprocessor=None)

    model = build()
    base = _twin(model, build)
    apply_lora(model, targets=("query", "value", "attention_output"), rank=2,
               alpha=4, trainable=("logits",))
    _randomize(model)
    model.get_layer("logits").kernel.assign(
        np.random.default_rng(3).normal(size=(16, 3)))
    save_peft_adapter(model, str(tmp_path))

    config, tensors = _read(tmp_path)
    assert config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier"]
    # "dense" alone would also select the feed-forward and pooler denses.
    assert config["target_modules"] == sorted(
        [f"encoder.layer.{i}.attention.output.dense" for i in (0, 1)]
        + [f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1)
           for p in ("query", "value")])
    assert tensors["base_model.model.classifier.weight"].shape == (3, 16)
    assert tensors["base_model.model.classifier.bias"].shape == (3,)
    assert ("base_model.model.bert.encoder.layer.1.attention.output.dense"
            ".lora_A.weight") in tensors

    load_peft_adapter(base, str(tmp_path))
    _assert_same_outputs(model, base, _bert_inputs())
    assert base.get_layer("logits").trainable


def test_different_ranks_write_rank_and_alpha_patterns(tmp_path):
    model = _llama()
    base = _twin(model, _llama)
    apply_lora(model, targets=("query",), rank=4, alpha=8)
    apply_lora(model, targets=("value",), rank=2, alpha=2)
    apply_lora(model, targets=("attention_output",), rank=4, alpha=8)
    _randomize(model)
    save_peft_adapter(model, str(tmp_path))

    config, _ = _read(tmp_path)
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["rank_pattern"] == {"0.self_attn.v_proj": 2,
                                      "1.self_attn.v_proj": 2}
    assert config["alpha_pattern"] == {"0.self_attn.v_proj": 2,
                                       "1.self_attn.v_proj": 2}
    load_peft_adapter(base, str(tmp_path))
    assert sorted({(layer.name, layer.rank, layer.alpha)
                   for layer in lora_layers(base)}) == [
        ("attention_output", 4, 8.0), ("query", 4, 8.0), ("value", 2, 2.0)]
    _assert_same_outputs(model, base, _llama_inputs())


def test_load_into_existing_lora_layers_checks_rank_and_scale(tmp_path):
    model = _llama()
    same = _twin(model, _llama)
    apply_lora(model, targets=("query", "value"), rank=4, alpha=8,
               use_rslora=True)
    _randomize(model)
    save_peft_adapter(model, str(tmp_path))
    assert _read(tmp_path)[0]["use_rslora"] is True

    apply_lora(same, targets=("query", "value"), rank=4, alpha=8,
               use_rslora=True)   # same layers, fresh adapters
    load_peft_adapter(same, str(tmp_path))
    _assert_same_outputs(model, same, _llama_inputs())

    other = _llama()
    apply_lora(other, targets=("query", "value"), rank=4, alpha=8)
    with pytest.raises(ValueError, match="scale"):
        load_peft_adapter(other, str(tmp_path))
    fewer = _llama()
    apply_lora(fewer, targets=("query",), rank=4, alpha=8, use_rslora=True)
    with pytest.raises(ValueError, match="Adapter only"):
        load_peft_adapter(fewer, str(tmp_path))


DECODER = dict(vocabulary_size=64, num_layers=2, num_query_heads=4,
               num_key_value_heads=2, hidden_dim=32, intermediate_dim=64)


@pytest.mark.parametrize("name, kwargs, targets, modules", [
    ("MistralBackbone", {}, ("query", "value"), ("self_attn.q_proj",
                                                 "self_attn.v_proj")),
    ("QwenBackbone", {}, ("key", "attention_output"), ("self_attn.k_proj",
                                                      "self_attn.o_proj")),
    ("Qwen3Backbone", {"head_dim": 8}, ("feedforward_gate_dense",),
     ("mlp.gate_proj",)),
    ("GemmaBackbone", {"head_dim": 8}, ("ffw_gating$", "ffw_linear"),
     ("mlp.gate_proj", "mlp.down_proj")),
])
def test_llama_like_families_names_and_round_trip(tmp_path, name, kwargs,
                                                  targets, modules):
    def build():
        return getattr(keras_hub.models, name)(**DECODER, **kwargs)

    model = build()
    base = _twin(model, build)
    apply_lora(model, targets=targets, rank=2, alpha=4)
    _randomize(model)
    save_peft_adapter(model, str(tmp_path))
    _, tensors = _read(tmp_path)
    assert set(tensors) == {
        f"base_model.model.layers.{i}.{module}.lora_{ab}.weight"
        for i in (0, 1) for module in modules for ab in ("A", "B")}
    load_peft_adapter(base, str(tmp_path))
    _assert_same_outputs(model, base, _llama_inputs())


# --- The layout, checked without kft ---------------------------------------


def _hf_layer_check(layer, config, tensors, module, converter):
    """Rebuilds the Hugging Face weight from the keras-hub kernel (inverse
    of the converter, which is asserted), merges PEFT's `B @ A` into it
    (DoRA: each row rescaled to `lora_magnitude_vector`, as PEFT's merge)
    and compares `x @ W.T + b` with the keras-hub layer's output."""
    a = tensors[f"base_model.model.{module}.lora_A.weight"]
    b = tensors[f"base_model.model.{module}.lora_B.weight"]
    kernel = np.asarray(layer.kernel)
    fan_in, fan_out = a.shape[1], b.shape[0]
    weight = kernel.reshape(fan_in, fan_out).T            # torch (out, in)
    np.testing.assert_array_equal(converter(weight, kernel.shape), kernel)
    scale = config["lora_alpha"] / config["r"]
    merged = weight + scale * (b @ a)
    if config["use_dora"]:
        magnitude = tensors[f"base_model.model.{module}.lora_magnitude_vector"]
        merged = merged * (magnitude / np.linalg.norm(merged, axis=1))[:, None]
    x = np.random.default_rng(4).normal(size=(2, 5, fan_in)).astype("float32")
    expected = x @ merged.T
    if layer.bias is not None:
        expected = expected + np.asarray(layer.bias).reshape(-1)
    expected = np.asarray(layer.activation(expected))   # BERT's gelu
    in_axes = next(kernel.shape[:n] for n in range(1, kernel.ndim)
                   if np.prod(kernel.shape[:n]) == fan_in)
    got = np.asarray(layer(x.reshape(2, 5, *in_axes))).reshape(2, 5, fan_out)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _transpose_and_reshape(weight, shape):
    """keras_hub/src/utils/transformers/convert_{bert,llama3}.py."""
    return np.reshape(np.transpose(weight), shape)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_peft_tensors_give_the_keras_hub_function(tmp_path, family, dora):
    if family == "bert":
        model, block = _bert(), "encoder.layer.{i}."
        modules = {"query": "attention.self.query",
                   "value": "attention.self.value",
                   "attention_output": "attention.output.dense",
                   "feedforward_intermediate_dense": "intermediate.dense",
                   "feedforward_output_dense": "output.dense"}
    else:
        model, block = _llama(), "layers.{i}."
        modules = {"query": "self_attn.q_proj", "key": "self_attn.k_proj",
                   "value": "self_attn.v_proj",
                   "attention_output": "self_attn.o_proj",
                   "feedforward_gate_dense": "mlp.gate_proj",
                   "feedforward_intermediate_dense": "mlp.up_proj",
                   "feedforward_output_dense": "mlp.down_proj"}
    apply_lora(model, targets=tuple(modules), rank=3, alpha=6, use_dora=dora)
    _randomize(model)
    save_peft_adapter(model, str(tmp_path))
    config, tensors = _read(tmp_path)
    assert config["use_dora"] is dora
    assert len(tensors) == 2 * len(modules) * (3 if dora else 2)
    for layer in lora_layers(model):
        index = int(layer.path.split("/")[0].rsplit("_", 1)[1])
        module = block.format(i=index) + modules[layer.name]
        _hf_layer_check(layer, config, tensors, module, _transpose_and_reshape)


@pytest.mark.parametrize("dora", [False, True])
def test_merged_hugging_face_checkpoint_matches_through_keras_hub(tmp_path, dora):
    """Merges the PEFT adapter into a Hugging Face Llama checkpoint with
    numpy (DoRA: rows rescaled to the magnitudes, as PEFT merges), loads it
    with keras-hub's own converter and compares the whole model with
    kft's adapted one."""
    model = _llama()
    apply_lora(model, targets=("query", "value", "attention_output",
                               "feedforward_output_dense"), rank=2, alpha=4,
               use_dora=dora)
    _randomize(model)
    save_peft_adapter(model, str(tmp_path / "adapter"))
    config, tensors = _read(tmp_path / "adapter")
    weights = {v.path: np.asarray(v) for v in model.weights}

    def linear(path, hf_in):
        kernel = weights[f"{path}/kernel"]
        return kernel.reshape(hf_in, -1).T

    state = {"model.embed_tokens.weight": weights["token_embedding/embeddings"],
             "lm_head.weight": weights["token_embedding/reverse_embeddings"].T,
             "model.norm.weight": weights["sequence_output_layernorm/scale"]}
    names = {"self_attention/query": ("self_attn.q_proj", 32),
             "self_attention/key": ("self_attn.k_proj", 32),
             "self_attention/value": ("self_attn.v_proj", 32),
             "self_attention/attention_output": ("self_attn.o_proj", 32),
             "feedforward_gate_dense": ("mlp.gate_proj", 32),
             "feedforward_intermediate_dense": ("mlp.up_proj", 32),
             "feedforward_output_dense": ("mlp.down_proj", 64),
             "self_attention_layernorm": ("input_layernorm", None),
             "feedforward_layernorm": ("post_attention_layernorm", None)}
    for i in range(2):
        for keras_name, (hf_name, hf_in) in names.items():
            key = f"model.layers.{i}.{hf_name}"
            path = f"transformer_layer_{i}/{keras_name}"
            if hf_in is None:
                state[f"{key}.weight"] = weights[f"{path}/scale"]
                continue
            weight = linear(path, hf_in)
            if f"base_model.{key}.lora_A.weight" in tensors:
                a = tensors[f"base_model.{key}.lora_A.weight"]
                b = tensors[f"base_model.{key}.lora_B.weight"]
                weight = weight + config["lora_alpha"] / config["r"] * (b @ a)
                if dora:
                    m = tensors[f"base_model.{key}.lora_magnitude_vector"]
                    weight = weight * (m / np.linalg.norm(weight, axis=1))[:, None]
            state[f"{key}.weight"] = np.ascontiguousarray(weight, "float32")
    checkpoint = tmp_path / "hf"
    checkpoint.mkdir()
    save_file(state, str(checkpoint / "model.safetensors"))
    hf_config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                 "vocab_size": 64, "num_hidden_layers": 2, "hidden_size": 32,
                 "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 64, "tie_word_embeddings": False,
                 "rope_theta": 10000.0}
    (checkpoint / "config.json").write_text(json.dumps(hf_config))
    merged = keras_hub.models.Llama3Backbone.from_preset(str(checkpoint))
    assert len(lora_layers(merged)) == 0
    _assert_same_outputs(model, merged, _llama_inputs())


# --- GPT-2: query, key and value fused in c_attn ------------------------------


def _gpt2():
    return keras_hub.models.GPT2Backbone(**GPT2)


@pytest.mark.parametrize("dora", [False, True])
def test_gpt2_separate_adapters_export_as_exact_block_c_attn(tmp_path, dora):
    model = _gpt2()
    base = _twin(model, _gpt2)
    apply_lora(model, targets=("query", "value", "attention_output",
                               "feedforward"), rank=2, alpha=4, use_dora=dora)
    _randomize(model)
    save_peft_adapter(model, str(tmp_path))
    config, tensors = _read(tmp_path)
    if dora:
        # c_attn's rows: query's and value's magnitudes; key (no LoRA) its
        # kernel's column norms, a DoRA factor of 1.
        magnitude = tensors["base_model.model.h.0.attn.c_attn.lora_magnitude_vector"]
        from kft._keras_internals import all_layers

        layer = {layer.path: layer for layer in all_layers(model)}
        path = "transformer_layer_0/self_attention/{}"
        np.testing.assert_array_equal(
            magnitude[:16], layer[path.format("query")].lora_magnitude)
        np.testing.assert_array_equal(
            magnitude[32:], layer[path.format("value")].lora_magnitude)
        key_kernel = np.asarray(layer[path.format("key")].kernel)
        np.testing.assert_allclose(magnitude[16:32], np.linalg.norm(
            key_kernel.reshape(16, 16), axis=0), rtol=1e-6)
    assert config["fan_in_fan_out"] is True
    assert config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    c_attn = "base_model.model.h.0.attn.c_attn"
    # query and value, rank 2 each: rank 4; key's rows of B are zero.
    assert tensors[f"{c_attn}.lora_A.weight"].shape == (4, 16)
    b = tensors[f"{c_attn}.lora_B.weight"]
    assert b.shape == (48, 4)
    assert not b[16:32].any() and not b[:16, 2:].any() and not b[32:, :2].any()
    assert (config["r"], config["lora_alpha"]) == (2, 4)
    # Same scale alpha / r = 2 at rank 4: lora_alpha 8.
    assert config["rank_pattern"] == {"0.attn.c_attn": 4, "1.attn.c_attn": 4}
    assert config["alpha_pattern"] == {"0.attn.c_attn": 8, "1.attn.c_attn": 8}

    load_peft_adapter(base, str(tmp_path))
    assert sorted({(layer.name, layer.rank) for layer in lora_layers(base)}) == [
        ("attention_output", 2), ("feedforward_intermediate_dense", 2),
        ("feedforward_output_dense", 2), ("key", 4), ("query", 4), ("value", 4)]
    _assert_same_outputs(model, base, _llama_inputs())


def test_gpt2_peft_c_attn_adapter_loads_and_saves_back_unchanged(tmp_path):
    """A PEFT c_attn adapter (one dense A, B over query, key, value rows)
    round-trips PEFT -> kft -> PEFT to the same tensors."""
    rng = np.random.default_rng(5)
    tensors = {}
    for i in range(2):
        key = f"base_model.model.transformer.h.{i}.attn.c_attn"
        tensors[f"{key}.lora_A.weight"] = rng.normal(size=(3, 16)).astype("f4")
        tensors[f"{key}.lora_B.weight"] = rng.normal(size=(48, 3)).astype("f4")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 3,
              "lora_alpha": 6, "lora_dropout": 0.05, "target_modules": ["c_attn"],
              "fan_in_fan_out": True, "bias": "none", "use_dora": False,
              "use_rslora": False, "modules_to_save": None}
    (tmp_path / "peft").mkdir()
    save_file(tensors, str(tmp_path / "peft" / WEIGHTS))
    (tmp_path / "peft" / CONFIG).write_text(json.dumps(config))

    model = keras_hub.models.GPT2CausalLM(backbone=_gpt2(), preprocessor=None)
    assert load_peft_adapter(model, str(tmp_path / "peft")) == 6
    assert {(layer.rank, layer.alpha, layer.dropout)
            for layer in lora_layers(model)} == {(3, 6.0, 0.05)}
    save_peft_adapter(model, str(tmp_path / "kft"))
    saved_config, saved = _read(tmp_path / "kft")
    assert set(saved) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(saved[key], value)
    assert (saved_config["r"], saved_config["lora_alpha"]) == (3, 6)
    assert saved_config["target_modules"] == ["c_attn"]
    assert saved_config["rank_pattern"] == {}


def test_gpt2_merged_checkpoint_matches_through_keras_hub(tmp_path):
    """GPT-2's fused layout, checked without kft: merge PEFT's tensors into
    a Hugging Face GPT-2 checkpoint (Conv1D weights are (in, out)), load it
    with keras-hub's converter, compare the whole model."""
    model = _gpt2()
    apply_lora(model, targets=("query", "key", "value", "attention_output",
                               "feedforward_output_dense"), rank=2, alpha=4)
    _randomize(model)
    save_peft_adapter(model, str(tmp_path / "adapter"))
    config, tensors = _read(tmp_path / "adapter")
    weights = {v.path: np.asarray(v) for v in model.weights}
    state = {"wte.weight": weights["token_embedding/embeddings"],
             "wpe.weight": weights["position_embedding/embeddings"],
             "ln_f.weight": weights["layer_norm/gamma"],
             "ln_f.bias": weights["layer_norm/beta"]}
    for i in range(2):
        path = f"transformer_layer_{i}"
        for norm, hf in (("self_attention_layer_norm", "ln_1"),
                         ("feedforward_layer_norm", "ln_2")):
            state[f"h.{i}.{hf}.weight"] = weights[f"{path}/{norm}/gamma"]
            state[f"h.{i}.{hf}.bias"] = weights[f"{path}/{norm}/beta"]
        qkv = [f"{path}/self_attention/{n}" for n in ("query", "key", "value")]
        convs = {  # Conv1D (in, out), as convert_gpt2.py reshapes it
            "attn.c_attn": (np.concatenate(
                [weights[f"{p}/kernel"].reshape(16, -1) for p in qkv], axis=1),
                np.concatenate([weights[f"{p}/bias"].reshape(-1) for p in qkv])),
            "attn.c_proj": (
                weights[f"{path}/self_attention/attention_output/kernel"]
                .reshape(16, 16),
                weights[f"{path}/self_attention/attention_output/bias"]),
            "mlp.c_fc": (weights[f"{path}/feedforward_intermediate_dense/kernel"],
                         weights[f"{path}/feedforward_intermediate_dense/bias"]),
            "mlp.c_proj": (weights[f"{path}/feedforward_output_dense/kernel"],
                           weights[f"{path}/feedforward_output_dense/bias"]),
        }
        for name, (weight, bias) in convs.items():
            key = f"h.{i}.{name}"
            a = tensors.get(f"base_model.model.{key}.lora_A.weight")
            if a is not None:
                b = tensors[f"base_model.model.{key}.lora_B.weight"]
                pattern = f"{i}.{name}"
                r = config["rank_pattern"].get(pattern, config["r"])
                alpha = config["alpha_pattern"].get(pattern, config["lora_alpha"])
                weight = weight + (alpha / r) * (b @ a).T
            state[f"{key}.weight"] = np.ascontiguousarray(weight, "float32")
            state[f"{key}.bias"] = bias
    checkpoint = tmp_path / "hf"
    checkpoint.mkdir()
    save_file(state, str(checkpoint / "model.safetensors"))
    (checkpoint / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": 64, "n_layer": 2, "n_head": 2,
        "n_embd": 16, "n_positions": 16, "resid_pdrop": 0.0}))
    merged = keras_hub.models.GPT2Backbone.from_preset(str(checkpoint))
    _assert_same_outputs(model, merged, _llama_inputs())


# --- Refusals -----------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    """A saved Llama q/v adapter and the base weights it goes on."""
    keras.utils.set_random_seed(0)
    model = _llama()
    weights = model.get_weights()
    apply_lora(model, targets=("query", "value"), rank=4, alpha=8)
    _randomize(model)
    path = tmp_path_factory.mktemp("llama_adapter")
    save_peft_adapter(model, str(path))
    return path, weights


def _edited(llama_adapter, tmp_path, edit_config=None, edit_tensors=None):
    path, _ = llama_adapter
    target = tmp_path / "edited"
    shutil.copytree(path, target)
    config, tensors = _read(target)
    if edit_config:
        edit_config(config)
        (target / CONFIG).write_text(json.dumps(config))
    if edit_tensors:
        edit_tensors(tensors)
        save_file(tensors, str(target / WEIGHTS))
    return str(target)


def _fresh(llama_adapter):
    model = _llama()
    model.set_weights(llama_adapter[1])
    return model


Q0 = "base_model.model.layers.0.self_attn.q_proj"


def test_missing_tensor_is_named(llama_adapter, tmp_path):
    path = _edited(llama_adapter, tmp_path,
                   edit_tensors=lambda t: t.pop(f"{Q0}.lora_B.weight"))
    model = _fresh(llama_adapter)
    with pytest.raises(ValueError, match=rf"'{Q0}.lora_B.weight' is missing"):
        load_peft_adapter(model, path)
    assert lora_layers(model) == []   # nothing changed before the check


def test_wrong_shape_names_tensor_expected_and_received(llama_adapter, tmp_path):
    def edit(tensors):
        tensors[f"{Q0}.lora_A.weight"] = np.zeros((4, 31), "float32")

    path = _edited(llama_adapter, tmp_path, edit_tensors=edit)
    with pytest.raises(ValueError, match=r"lora_A.weight' has shape \(4, 31\); "
                                         r"expected \(4, 32\)"):
        load_peft_adapter(_fresh(llama_adapter), path)


def test_rank_disagreeing_with_config_is_refused(llama_adapter, tmp_path):
    path = _edited(llama_adapter, tmp_path,
                   edit_config=lambda c: c.update(r=8))
    with pytest.raises(ValueError, match=r"expected \(8, 32\) \(r=8"):
        load_peft_adapter(_fresh(llama_adapter), path)


def test_unknown_module_and_untargeted_tensor_are_refused(llama_adapter, tmp_path):
    def rename(tensors):
        for part in ("A", "B"):
            tensors[f"base_model.model.layers.7.self_attn.q_proj.lora_{part}"
                    ".weight"] = tensors.pop(f"{Q0}.lora_{part}.weight")

    path = _edited(llama_adapter, tmp_path, edit_tensors=rename)
    with pytest.raises(ValueError, match="layers.7.self_attn.q_proj"):
        load_peft_adapter(_fresh(llama_adapter), path)

    shutil.rmtree(tmp_path / "edited")
    path = _edited(llama_adapter, tmp_path,
                   edit_config=lambda c: c.update(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="does not select; PEFT would ignore"):
        load_peft_adapter(_fresh(llama_adapter), path)


def test_pickle_only_directory_is_refused(llama_adapter, tmp_path):
    path = _edited(llama_adapter, tmp_path)
    os.remove(os.path.join(path, WEIGHTS))
    with open(os.path.join(path, "adapter_model.bin"), "wb") as f:
        f.write(b"not loaded")
    with pytest.raises(ValueError, match="adapter_model.bin.*safetensors"):
        load_peft_adapter(_fresh(llama_adapter), path)


@pytest.mark.parametrize("key, value, message", [
    ("use_dora", True, "lora_magnitude_vector' is missing; the config has "
                       "use_dora=True"),
    ("peft_type", "IA3", "peft_type='IA3'"),
    ("bias", "lora_only", "bias='lora_only'"),
])
def test_unsupported_configs_are_refused(llama_adapter, tmp_path, key, value,
                                         message):
    path = _edited(llama_adapter, tmp_path,
                   edit_config=lambda c: c.update({key: value}))
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(_fresh(llama_adapter), path)


def test_unknown_architecture_is_refused(llama_adapter, tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="query")(inputs))
    apply_lora(model, targets=("query",), rank=2)
    with pytest.raises(ValueError, match="one of: BertBackbone, LlamaBackbone"):
        save_peft_adapter(model, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="keras-hub backbone"):
        load_peft_adapter(model, str(llama_adapter[0]))
    assert "Llama3Backbone" in supported_architectures()


def test_merged_layers_and_other_adapter_slots_are_refused(llama_adapter, tmp_path):
    model = _llama()
    apply_lora(model, targets=("query",), rank=2)
    lora_layers(model)[0].merge()
    with pytest.raises(ValueError, match="merged"):
        save_peft_adapter(model, str(tmp_path))
    with pytest.raises(ValueError, match="name='other'"):
        load_peft_adapter(_fresh(llama_adapter), str(llama_adapter[0]),
                          name="other")


# --- Optional: real PEFT ------------------------------------------------------


def test_real_peft_loads_every_tensor(tmp_path):
    reason = "optional check against real PEFT; torch/transformers/peft are " \
             "not kft dependencies"
    torch = pytest.importorskip("torch", reason=reason)
    transformers = pytest.importorskip("transformers", reason=reason)
    peft = pytest.importorskip("peft", reason=reason)
    model = _llama_lm()
    apply_lora(model, targets=("query", "value"), rank=4, alpha=8)
    _randomize(model)
    save_peft_adapter(model, str(tmp_path))
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    peft_model = peft.PeftModel.from_pretrained(hf_model, str(tmp_path))
    state = {k: v for k, v in peft_model.state_dict().items() if ".lora_" in k}
    _, tensors = _read(tmp_path)
    assert set(state) == {k.replace(".weight", ".default.weight")
                          for k in tensors}
    for key, value in tensors.items():
        loaded = state[key.replace(".weight", ".default.weight")]
        np.testing.assert_allclose(loaded.to(torch.float32).numpy(), value)
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / 4)
