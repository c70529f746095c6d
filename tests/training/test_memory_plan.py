"""kft.plan_memory and `kft plan`: counts that match a built model, the
devices a plan fits and what would make it fit. (Against XLA's compiled
memory analysis: tests/jax_subset.py and benchmarks/memory_plan.py.)"""

import json

import numpy as np
import pytest
import yaml
from llm_fixtures import tiny_causal_lm
from llm_fixtures import write_hf_checkpoint

import kft
from kft.training.memory_plan import GIB
from kft.training.memory_plan import ModelShape
from kft.training.memory_plan import model_shape

SMOLLM2 = dict(vocab_size=49152, num_hidden_layers=30, hidden_size=576,
               intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def lm():
    return tiny_causal_lm(sequence_length=16, tie_word_embeddings=False)


def _bytes(variables):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
               for v in variables)


def test_weights_adapters_and_slots_match_the_built_model(lm):
    plan = kft.plan_memory(lm, method="full", dtype="float32")
    assert plan.weights == _bytes(lm.weights)
    assert plan.gradients == plan.weights
    assert plan.optimizer_state == 2 * plan.weights  # AdamW: m and v
    lora_lm = tiny_causal_lm(sequence_length=16)
    kft.lora.apply_lora(lora_lm, targets="all-linear", rank=2)
    adapters = [v for v in lora_lm.trainable_variables
                if v.path.endswith(("lora_a", "lora_b"))]
    plan = kft.plan_memory(lora_lm, method="lora", lora_rank=2,
                           dtype="bfloat16")
    assert plan.adapters == _bytes(adapters)  # float32 whatever the policy


def test_model_shape_reads_models_configs_and_checkpoints(lm, tmp_path):
    shape = model_shape(lm)
    # keras-hub 0.32's Llama 3 get_config omits tie_word_embeddings.
    assert shape == model_shape({**lm.backbone.get_config(),
                                 "tie_word_embeddings": False})
    directory = write_hf_checkpoint(lm, tmp_path / "hf")
    assert model_shape(directory) == shape  # Hugging Face config.json
    assert model_shape("smollm2") == model_shape(SMOLLM2) == ModelShape(
        49152, 30, 576, 1536, 9, 3)
    assert model_shape("smollm2").params == 134_515_008  # SmolLM2-135M
    with pytest.raises(ValueError, match="lacks.*hidden_dim"):
        model_shape({"vocab_size": 10})
    with pytest.raises(ValueError, match="No model config"):
        model_shape(str(tmp_path / "missing"))


def test_remat_flash_attention_and_quantization_each_save_what_they_should():
    kwargs = dict(sequence_length=4096, batch_size=1, dtype="bfloat16")
    plain = kft.plan_memory("smollm2", method="lora", **kwargs)
    remat = kft.plan_memory("smollm2", method="lora", remat=True, **kwargs)
    flash = kft.plan_memory("smollm2", method="lora", attention="flash",
                            **kwargs)
    assert remat.activations == remat.activations_with_remat
    assert remat.activations < 0.1 * plain.activations
    assert plain.activations == remat.activations_without_remat
    assert max(flash.peak, remat.peak) < 0.2 * plain.peak
    full = kft.plan_memory("smollm2", method="full", **kwargs)
    int8 = kft.plan_memory("smollm2", method="qlora", quantize="int8", **kwargs)
    int4 = kft.plan_memory("smollm2", method="qlora", quantize="int4", **kwargs)
    assert int4.weights < int8.weights < plain.weights == full.weights
    assert full.optimizer_state == 2 * full.weights > 20 * plain.optimizer_state


def test_devices_say_what_fits_and_the_setting_that_would():
    plan = kft.plan_memory("smollm2", method="full", sequence_length=4096,
                           batch_size=1)
    peak, fits, suggestion = plan.devices["T4 16GB"]
    assert not fits and peak > 16 * GIB and suggestion == "remat=True"
    assert kft.plan_memory("smollm2", method="full", sequence_length=4096,
                           batch_size=1, remat=True).devices["T4 16GB"][1]
    assert plan.devices["H100 80GB"][1]  # flash attention
    huge = dict(SMOLLM2, num_hidden_layers=3000, hidden_size=8192,
                intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8)
    _, fits, suggestion = kft.plan_memory(huge, method="full").devices["T4 16GB"]
    assert not fits and suggestion is None
    text = plan.summary()
    assert "peak" in text and "fits with remat=True" in text


@pytest.mark.parametrize("kwargs,needle", [
    ({"method": "dora"}, "method must be one of"),
    ({"method": "qlora"}, "method='qlora' goes with quantize"),
    ({"method": "lora", "quantize": "int8"}, "method='qlora' goes with"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"sequence_length": 0}, "sequence_length=0"),
])
def test_bad_arguments_name_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        kft.plan_memory("smollm2", **kwargs)


def test_kft_plan_prints_a_recipes_plan(tmp_path, capsys):
    from kft.cli import main

    checkpoint = write_hf_checkpoint(tiny_causal_lm(sequence_length=16),
                                     tmp_path / "hf")
    recipe = {"name": "tiny_sft", "model": {"causal_lm": checkpoint,
                                           "sequence_length": 64},
              "data": {"source": "sft_file", "path": str(tmp_path / "d.jsonl"),
                       "batch_size": 4},
              "lora": {"targets": "all-linear", "rank": 4},
              "stages": [{"name": "sft", "epochs": 1}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["plan", str(path), "--set", "model.remat=true"]) == 0
    out = capsys.readouterr().out
    assert "method='lora'" in out and "remat=True" in out
    assert "lora_rank=4" in out and "T4 16GB" in out
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"x": 1}))
    assert main(["plan", str(path)]) == 2
    assert "model.causal_lm" in capsys.readouterr().err
    assert main(["plan", "quickstart"]) == 2
    assert "causal-LM recipes" in capsys.readouterr().err
