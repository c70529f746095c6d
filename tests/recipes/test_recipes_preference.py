"""Preference recipes: model.causal_lm + preference: + a preference_file, run
by the runner (tiny random Llama written as a Hugging Face checkpoint),
then `kft eval`, `kft generate` and `kft compare` on the run."""

import json
import os

import numpy as np
import pytest
import yaml
from llm_fixtures import tiny_causal_lm
from llm_fixtures import write_hf_checkpoint

from kft.data.preference import PREFERENCE_FORMATS
from kft.losses.preference import LOSSES
from kft.recipes import RecipeError
from kft.recipes import load_recipe
from kft.recipes.checkpoint import read_history
from kft.recipes.preference_config import PREFERENCE_FORMATS as RECIPE_FORMATS
from kft.recipes.preference_config import PREFERENCE_LOSSES
from kft.recipes.runner import run_recipe
from kft.recipes.tasks import task_for


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    lm = tiny_causal_lm(sequence_length=32)
    return write_hf_checkpoint(lm, tmp_path_factory.mktemp("hf") / "tiny")


def _recipe(tmp_path, checkpoint, **changes):
    # After any prompt " d a" is preferred to " d e": held-out prompts too.
    records = [{"prompt": f"{a} {b}", "chosen": " d a", "rejected": " d e"}
               for a in "abcd" for b in "abcd"]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    recipe = {
        "name": "tiny_dpo",
        "model": {"causal_lm": checkpoint, "sequence_length": 16},
        "data": {"source": "preference_file", "path": str(tmp_path / "pairs.jsonl"),
                 "batch_size": 4, "validation_split": 0.25},
        "lora": {"targets": "all-linear", "rank": 2, "alpha": 4},
        "preference": {"loss": "dpo", "beta": 0.5},
        "generate": {"prompts": ["a b"], "max_length": 12},
        "stages": [{"name": "dpo", "epochs": 2, "learning_rate": 1e-2}],
    }
    recipe.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_recipe_names_equal_the_library_names():
    assert PREFERENCE_LOSSES == tuple(LOSSES)
    assert RECIPE_FORMATS == PREFERENCE_FORMATS


def test_dpo_lora_recipe_reports_reward_accuracy_before_and_after(tmp_path,
                                                                  checkpoint):
    config = load_recipe(_recipe(tmp_path, checkpoint))
    assert task_for(config).name == "causal_lm_preference"
    assert config.preference.reference == "adapters_off"  # resolved default
    assert config.data.format == "prompt_chosen_rejected"
    run_dir, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    files = set(os.listdir(run_dir))
    assert {"adapter.npz", "adapter_peft", "samples.json", "metrics.json",
            "history.csv", "config.yaml"} <= files
    before, after = metrics["final"]["val_before"], metrics["final"]["val"]
    # LoRA's B starts at zero: the policy is the reference, every reward 0.
    assert before["reward_accuracy"] == 0.5 and before["reward_margin"] == 0.0
    assert after["reward_accuracy"] == 1.0 and after["reward_margin"] > 0.1
    assert after["loss"] < before["loss"]
    assert metrics["final"]["train"]["reward_accuracy"] > 0.5
    rows = read_history(os.path.join(run_dir, "history.csv"))
    assert len(rows) == 2 and {"reward_accuracy", "reward_margin",
                               "val_reward_accuracy", "val_reward_margin",
                               "val_logps_chosen"} <= set(rows[0])
    samples = json.load(open(os.path.join(run_dir, "samples.json")))
    assert len(samples["before"]) == len(samples["after"]) == 1

    from kft.cli import main
    from kft.models.causal_lm import build_causal_lm
    from kft.recipes.evaluate import generate_run
    from kft.recipes.evaluate import load_run

    # kft eval rebuilds the base, loads the adapters, finds the numbers again.
    assert main(["eval", run_dir]) == 0
    result = json.load(open(os.path.join(run_dir, "eval.json")))
    for key in ("loss", "reward_accuracy", "reward_margin"):
        assert result[key] == pytest.approx(after[key], abs=1e-4)
    assert generate_run(run_dir, ["a b"], max_length=12) == samples["after"]
    # kft export merges the adapters into a Hugging Face checkpoint that
    # gives the preference-tuned model's logits.
    out = str(tmp_path / "export")
    assert main(["export", run_dir, "--output", out]) == 0
    assert json.load(open(os.path.join(out, "kft_export.json")))["format"] == (
        "transformers")
    merged = build_causal_lm(out, sequence_length=16)
    _, tuned = load_run(run_dir)
    x = {"token_ids": np.array([[1, 70, 260, 261, 40, 41]], "int32"),
         "padding_mask": np.ones((1, 6), bool)}
    np.testing.assert_allclose(np.asarray(merged(x)), np.asarray(tuned.lm(x)),
                               atol=1e-5)


def test_full_fine_tuning_precomputes_the_reference_once(tmp_path, checkpoint):
    path = _recipe(tmp_path, checkpoint, lora=None, generate=None,
                   stages=[{"name": "dpo", "epochs": 1, "learning_rate": 1e-3}])
    config = load_recipe(path)
    assert config.preference.reference == "precomputed"
    assert config.stages[0].trainable == "all"
    run_dir, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    assert sorted(os.listdir(os.path.join(run_dir, "reference_logps"))) == [
        "train.npz", "val.npz"]
    assert metrics["final"]["val_before"]["reward_margin"] == pytest.approx(
        0.0, abs=1e-5)
    assert os.path.exists(os.path.join(run_dir, "model.weights.h5"))
    assert metrics["params"]["trainable"] == metrics["params"]["total"]


def test_compare_runs_the_losses(tmp_path, checkpoint):
    from kft.cli import main

    out = str(tmp_path / "compare")
    assert main(["compare", _recipe(tmp_path, checkpoint), "--methods",
                 "dpo,simpo,kto,full", "--smoke", "--output-dir", out]) == 0
    report = json.load(open(os.path.join(out, "compare.json")))
    methods = report["methods"]
    assert methods["dpo"]["status"] == methods["simpo"]["status"] == "ok"
    assert methods["dpo"]["monitor"] == "val_reward_accuracy"
    assert methods["kto"]["status"] == methods["full"]["status"] == "skipped"
    derived = yaml.safe_load(open(os.path.join(out, "simpo", "seed_0",
                                               "recipe.yaml")))
    assert derived["preference"]["loss"] == "simpo"
    assert derived["preference"]["reference"] is None


@pytest.mark.parametrize("change, needle", [
    ({"preference": {"loss": "kto"}}, "loss 'kto' trains on unpaired"),
    ({"lora": None, "preference": {"reference": "adapters_off"}},
     "has no lora:"),
    ({"preference": {"reference": "copy"}}, "with lora: use 'adapters_off'"),
    ({"preference": {"loss": "simpo", "reference": "precomputed"}},
     "reference-free"),
    ({"preference": {"loss": "ipo", "label_smoothing": 0.1}},
     "label_smoothing is for loss 'dpo'"),
    ({"preference": {"loss": "dpop"}}, "preference.loss"),
    ({"data": {"source": "sft_file", "path": "x.jsonl"}},
     "preference: trains on a preference data source"),
    ({"data": {"source": "preference_file", "path": "x", "packing": True}},
     "not packed"),
    ({"data": {"source": "preference_file", "path": "x", "format": "text"}},
     "data.format of a preference_file"),
    ({"data": {"source": "wordnet_pairs", "format": "messages"}},
     "data.format of source 'wordnet_pairs'"),
    ({"data": {"source": "preference_file", "path": "x"},
      "model": {"backbone": "vgg16"}, "lora": None, "generate": None,
      "preference": None}, "preference data source"),
])
def test_bad_preference_recipes_name_the_key(tmp_path, change, needle):
    with pytest.raises(RecipeError, match=needle):
        load_recipe(_recipe(tmp_path, "/nonexistent", **change))


def test_an_sft_source_cannot_take_a_preference_format(tmp_path):
    path = _recipe(tmp_path, "/x", preference=None, data={
        "source": "sft_file", "path": "x.jsonl", "format": "unpaired"})
    with pytest.raises(RecipeError, match="is for source 'preference_file'"):
        load_recipe(path)


@pytest.mark.slow
def test_a_killed_full_dpo_run_resumes_to_the_same_weights(tmp_path, checkpoint):
    # Full fine-tuning against a precomputed reference: the resumed process
    # rebuilds the base, finds its reference log-probabilities in the run
    # directory, then loads the checkpoint.
    from test_resume import _interrupted_then_resumed
    from test_resume import _rows

    path = _recipe(tmp_path, checkpoint, lora=None, generate=None,
                   seed=1, deterministic=True,
                   # 12 pairs, 3 batches a pass, one stream of 3 steps.
                   stages=[{"name": "dpo", "epochs": 3, "steps_per_epoch": 3,
                            "learning_rate": 1e-3, "schedule": "cosine"}])
    kill_at = int(np.random.default_rng().integers(4, 9))
    whole, resumed, state = _interrupted_then_resumed(path, tmp_path, kill_at)
    assert state["epochs_done"] == (kill_at - 1) // 3
    for key in ("loss", "reward_accuracy", "val_reward_margin"):
        assert [r[key] for r in _rows(resumed)] == [r[key] for r in _rows(whole)]
    import h5py

    with h5py.File(whole / "model.weights.h5") as a, \
            h5py.File(resumed / "model.weights.h5") as b:
        names = []
        a.visit(lambda n: names.append(n) if isinstance(a[n], h5py.Dataset)
                else None)
        assert names
        for name in names:
            np.testing.assert_allclose(a[name][()], b[name][()], atol=1e-6,
                                       err_msg=name)
