"""Causal-LM recipes: model.causal_lm + an SFT data source + lora:, run by
the runner into a run directory (tiny random Llama written as a Hugging
Face checkpoint; WordNet and SmolLM2 are large)."""

import json
import os

import numpy as np
import pytest
import yaml
from llm_fixtures import tiny_causal_lm
from llm_fixtures import write_hf_checkpoint

from kft.recipes import RecipeError
from kft.recipes import load_recipe
from kft.recipes.runner import run_recipe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    lm = tiny_causal_lm(sequence_length=32)
    return write_hf_checkpoint(lm, tmp_path_factory.mktemp("hf") / "tiny")


def _recipe(tmp_path, checkpoint, **changes):
    records = [{"prompt": f"{a} {b}", "completion": f"{b} {a}"}
               for a in "abcd" for b in "abcd"]
    with open(tmp_path / "sft.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    recipe = {
        "name": "tiny_sft",
        "model": {"causal_lm": checkpoint, "sequence_length": 16},
        "data": {"source": "sft_file", "path": str(tmp_path / "sft.jsonl"),
                 "batch_size": 4, "validation_split": 0.25, "packing": True},
        "lora": {"targets": "all-linear", "rank": 2, "alpha": 4},
        "generate": {"prompts": ["a b"], "max_length": 12},
        "stages": [{"name": "sft", "epochs": 2, "learning_rate": 1e-2}],
    }
    recipe.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_lora_sft_recipe_writes_adapters_samples_and_perplexity(tmp_path,
                                                                checkpoint):
    config = load_recipe(_recipe(tmp_path, checkpoint))
    assert config.stages[0].trainable == "keep"
    run_dir, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    files = set(os.listdir(run_dir))
    # Per-epoch checkpoints (weights, optimizer, random and data state).
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [
        "stage1-epoch0002", "state.json"]
    assert {"adapter.npz", "adapter_peft", "samples.json", "metrics.json",
            "history.csv", "config.yaml"} <= files
    assert "model.keras" not in files
    val = metrics["final"]["val"]
    assert val["perplexity"] == pytest.approx(np.exp(val["loss"]), rel=1e-3)
    # Held-out NLL before training too, from the same loss.
    assert metrics["final"]["val_before"]["loss"] > val["loss"]
    assert metrics["adapter"]["layers"] == 14  # 2 layers x 7 projections
    assert metrics["params"]["trainable"] < metrics["params"]["total"] / 10
    samples = json.load(open(os.path.join(run_dir, "samples.json")))
    assert [s["prompt"] for s in samples["before"]] == ["a b"]
    assert len(samples["after"]) == 1
    with open(os.path.join(run_dir, "history.csv")) as f:
        assert len(f.read().splitlines()) == 3  # header + 2 epochs


def test_full_sft_recipe_trains_everything_and_saves_weights(tmp_path,
                                                             checkpoint):
    path = _recipe(tmp_path, checkpoint, lora=None, generate=None)
    config = load_recipe(path)
    assert config.stages[0].trainable == "all"
    run_dir, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    assert os.path.exists(os.path.join(run_dir, "model.weights.h5"))
    assert metrics["params"]["trainable"] == metrics["params"]["total"]


@pytest.mark.parametrize("change,needle", [
    ({"data": {"source": "builtin", "name": "fashion_mnist_holdout"}},
     "SFT data source"),
    ({"model": {"backbone": "vgg16"}}, "SFT data source"),
    ({"model": {"causal_lm": "x", "quantize": "int3"}}, "model.quantize"),
    ({"model": {"backbone": "vgg16", "quantize": "int8"}, "lora": None,
      "generate": None, "data": {"source": "builtin",
                                 "name": "fashion_mnist_holdout"}},
     "model.quantize is for model.causal_lm"),
    ({"model": {"backbone": "vgg16", "remat": True}, "lora": None,
      "generate": None, "data": {"source": "builtin",
                                 "name": "fashion_mnist_holdout"}},
     "model.remat is for model.causal_lm"),
    ({"model": {"causal_lm": "x", "input_shape": [32, 32, 3]}},
     "are for image models"),
    ({"prompt_tuning": {"num_virtual_tokens": 4}, "lora": None},
     "set data.packing: false"),
])
def test_bad_causal_lm_recipes_name_the_key(tmp_path, change, needle):
    with pytest.raises(RecipeError, match=needle):
        load_recipe(_recipe(tmp_path, "/nonexistent", **change))


def test_model_remat_reaches_the_model_and_round_trips(tmp_path, checkpoint):
    """`model.remat: true` builds the LM with rematerialised blocks and
    stays in the resolved config (what config.yaml holds and a rebuilt run
    reads); off, the resolved config has no `remat` (earlier runs keep
    their hash)."""
    from kft.recipes.builders import causal_model
    from kft.recipes.loader import config_hash
    from kft.recipes.loader import resolved

    path = _recipe(tmp_path, checkpoint)
    plain = load_recipe(path)
    config = load_recipe(path, ["model.remat=true"])
    assert "remat" not in resolved(plain)["model"]
    assert resolved(config)["model"]["remat"] is True
    assert config_hash(config) != config_hash(plain)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(resolved(config)))
    assert load_recipe(str(tmp_path / "config.yaml")).model.remat is True
    assert causal_model(config).remat is True
    assert causal_model(plain).remat is False


def test_a_missing_checkpoint_is_a_recipe_error(tmp_path):
    config = load_recipe(_recipe(tmp_path, str(tmp_path / "nope")))
    with pytest.raises(RecipeError, match="model.causal_lm"):
        run_recipe(config, str(tmp_path / "run"), verbose=0)


def test_generate_eval_and_export_of_an_sft_run(tmp_path, checkpoint):
    from kft.cli import main

    config = load_recipe(_recipe(tmp_path, checkpoint))
    run_dir, _ = run_recipe(config, str(tmp_path / "run"), verbose=0)
    after = json.load(open(os.path.join(run_dir, "samples.json")))["after"]
    from kft.recipes.evaluate import generate_run

    # The adapters reload onto a fresh base and complete as the run did.
    assert generate_run(run_dir, ["a b"], max_length=12) == after
    assert main(["generate", run_dir, "--prompt", "a b", "--max-length",
                 "12"]) == 0
    _check_eval_matches_the_run(run_dir, main)


def _check_eval_matches_the_run(run_dir, main):
    """`kft eval` rebuilds the run and finds its held-out loss again."""
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert main(["eval", run_dir]) == 0
    result = json.load(open(os.path.join(run_dir, "eval.json")))
    assert result["loss"] == pytest.approx(metrics["final"]["val"]["loss"],
                                           abs=1e-4)
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]),
                                                 rel=1e-3)


def _logits(lm, token_ids):
    x = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids, bool)}
    return np.asarray(lm(x))


def test_export_merges_lora_into_a_hugging_face_checkpoint(tmp_path,
                                                           checkpoint):
    from kft.cli import main
    from kft.models.causal_lm import build_causal_lm
    from kft.recipes.evaluate import load_run

    config = load_recipe(_recipe(tmp_path, checkpoint, generate=None))
    run_dir, _ = run_recipe(config, str(tmp_path / "run"), verbose=0)
    out = str(tmp_path / "export")
    assert main(["export", run_dir, "--output", out]) == 0
    info = json.load(open(os.path.join(out, "kft_export.json")))
    assert info["format"] == "transformers"
    assert info["merged_lora_layers"] == 14
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(
        os.listdir(out))
    # The merged checkpoint loads as a plain model (no LoRA layers, the
    # chat template kept) and gives the adapted model's logits.
    merged = build_causal_lm(out, sequence_length=16)
    assert merged.chat_template and "im_start" in merged.chat_template
    _, adapted = load_run(run_dir)
    token_ids = np.array([[1, 70, 260, 261, 262, 263, 40, 41]], "int32")
    expected = _logits(adapted.lm, token_ids)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(_logits(merged, token_ids), expected, atol=1e-5)


def test_export_of_a_quantized_run_writes_keras_weights(tmp_path, checkpoint):
    from kft.models.causal_lm import build_causal_lm
    from kft.recipes.evaluate import export_run
    from kft.recipes.evaluate import load_run

    path = _recipe(tmp_path, checkpoint, generate=None, model={
        "causal_lm": checkpoint, "sequence_length": 16, "quantize": "int8"})
    run_dir, _ = run_recipe(load_recipe(path), str(tmp_path / "run"), verbose=0)
    _, adapted = load_run(run_dir)
    token_ids = np.array([[1, 70, 260, 261, 262, 263, 40, 41]], "int32")
    expected = _logits(adapted.lm, token_ids)
    out = export_run(run_dir, output=str(tmp_path / "export"))
    info = json.load(open(os.path.join(out, "kft_export.json")))
    assert info["format"] == "keras_weights"
    assert "quantized (int8)" in info["why_not_transformers"]
    lm = build_causal_lm(checkpoint, sequence_length=16, quantize="int8")
    lm.load_weights(os.path.join(out, "model.weights.h5"))
    # Merging requantizes each kernel: one more int8 rounding.
    error = np.abs(_logits(lm, token_ids) - expected).max()
    assert 0 < error < 0.02 * np.abs(expected).max()


def test_prompt_tuning_recipe_trains_virtual_tokens_only(tmp_path, checkpoint):
    from kft.cli import main
    from kft.recipes.evaluate import generate_run

    data = {"source": "sft_file", "path": str(tmp_path / "sft.jsonl"),
            "batch_size": 4, "validation_split": 0.25}
    path = _recipe(tmp_path, checkpoint, lora=None, data=data,
                   prompt_tuning={"num_virtual_tokens": 3, "init_text": "a b"},
                   stages=[{"name": "prompt", "epochs": 2,
                            "learning_rate": 3e-2}])
    config = load_recipe(path)
    assert config.stages[0].trainable == "keep"
    run_dir, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    assert metrics["params"]["trainable"] == 3 * 32  # 3 tokens x hidden 32
    assert metrics["stages"][0]["trainable_params"] == 3 * 32
    assert metrics["prompt"]["num_virtual_tokens"] == 3
    files = set(os.listdir(run_dir))
    assert "prompt.npz" in files and not {"adapter.npz",
                                          "model.weights.h5"} & files
    assert metrics["final"]["val_before"]["loss"] > metrics["final"]["val"]["loss"]
    after = json.load(open(os.path.join(run_dir, "samples.json")))["after"]
    # The prompt reloads onto a fresh frozen base and completes as the run did.
    assert generate_run(run_dir, ["a b"], max_length=12) == after
    _check_eval_matches_the_run(run_dir, main)
    assert main(["export", run_dir]) == 2  # virtual tokens do not merge
