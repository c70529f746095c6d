"""RL recipes: model.causal_lm + rl: + prompts, run by the runner (tiny
random Llama written as a Hugging Face checkpoint): held-out reward
before and after, samples, kft eval, a broken reward that keeps the last
checkpoint, exact resume after SIGKILL, and validation errors."""

import json
import os

import numpy as np
import pytest
import yaml
from llm_fixtures import tiny_causal_lm
from llm_fixtures import write_hf_checkpoint
from test_resume import _kft_run  # `kft run` killed at a global step

from kft.recipes import RecipeError
from kft.recipes import load_recipe
from kft.recipes.checkpoint import read_history
from kft.recipes.checkpoint import read_state
from kft.recipes.rl_config import BUILTIN_REWARDS
from kft.recipes.runner import run_recipe
from kft.recipes.tasks import get_task
from kft.recipes.tasks import task_for
from kft.rl import rewards as rl_rewards


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    lm = tiny_causal_lm(sequence_length=32)
    return write_hf_checkpoint(lm, tmp_path_factory.mktemp("hf") / "tiny")


def _recipe(tmp_path, checkpoint, rl=None, **changes):
    records = [{"prompt": f"{a}+{b}=", "answer": str(a + b)}
               for a in range(1, 5) for b in range(1, 5)]
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    recipe = {
        "name": "tiny_grpo", "seed": 0,
        "model": {"causal_lm": checkpoint, "sequence_length": 32},
        "data": {"source": "prompt_file", "path": str(tmp_path / "prompts.jsonl"),
                 "batch_size": 2, "validation_split": 0.25},
        "lora": {"targets": "all-linear", "rank": 2, "alpha": 4},
        "rl": {"rewards": [{"name": "length", "options": {"max_chars": 2}},
                           {"name": "exact_answer", "weight": 0.5,
                            "options": {"pattern": r"(\d+)"}}],
               "num_generations": 4, "max_new_tokens": 4,
               "max_prompt_length": 8, "chat": False, "eval_batch_size": 4,
               **(rl or {})},
        "stages": [{"name": "grpo", "epochs": 2, "steps_per_epoch": 2,
                    "learning_rate": 1e-3}],
    }
    recipe.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_recipe_reward_names_equal_the_library_names():
    assert BUILTIN_REWARDS == tuple(rl_rewards.REWARDS)[:len(BUILTIN_REWARDS)]


def test_grpo_recipe_reports_held_out_reward_before_and_after(tmp_path,
                                                              checkpoint):
    config = load_recipe(_recipe(tmp_path, checkpoint))
    assert task_for(config).name == "causal_lm_rl"
    run_dir, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    files = set(os.listdir(run_dir))
    assert {"adapter.npz", "adapter_peft", "samples.json", "samples.jsonl",
            "metrics.json", "history.csv", "config.yaml"} <= files
    before, after = metrics["final"]["val_before"], metrics["final"]["val"]
    for result in (before, after):
        assert {"reward", "reward_length", "reward_exact_answer",
                "completion_length"} <= set(result)
        assert 0 <= result["reward"] <= 1.5
    rows = read_history(os.path.join(run_dir, "history.csv"))
    assert len(rows) == 2 and {"reward", "reward_std", "kl", "clip_fraction",
                               "zero_std_fraction", "generation_seconds",
                               "update_seconds"} <= set(rows[0])
    lines = open(os.path.join(run_dir, "samples.jsonl")).read().splitlines()
    assert len(lines) == 2 * 2 * 2 * 4  # epochs x steps x prompts x G
    samples = json.load(open(os.path.join(run_dir, "samples.json")))
    assert len(samples["before"]) == len(samples["after"]) == 4
    # kft eval: the held-out reward of the saved adapters, as after training.
    task = get_task("causal_lm_rl")
    model = task.load_run(run_dir, config)
    assert task.evaluate_run(run_dir, config, model)["reward"] == pytest.approx(
        after["reward"])
    # kft eval --data: other prompts, scored by the recipe's rewards.
    (tmp_path / "other.jsonl").write_text(
        json.dumps({"prompt": "9+9=", "answer": "18"}) + "\n")
    other = task.evaluate_run(run_dir, config, model, str(tmp_path / "other.jsonl"))
    assert set(other) >= {"reward", "reward_length", "reward_exact_answer"}


def test_arithmetic_prompts_are_rendered_with_the_chat_template(tmp_path,
                                                                checkpoint):
    from llm_fixtures import CHAT_TEMPLATE

    from kft.recipes.tasks.rl import rl_prompts

    path = _recipe(tmp_path, checkpoint, rl={"chat": True}, data={
        "source": "arithmetic", "max_examples": 20, "validation_split": 0.25})
    config = load_recipe(path)
    lm = tiny_causal_lm(sequence_length=32, chat_template=CHAT_TEMPLATE)
    train, held_out = rl_prompts(config, lm)
    assert (len(train), len(held_out)) == (15, 5)
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}
    record = train[0]
    assert record["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert record["question"] in record["prompt"]
    a, b = map(int, record["question"][len("What is "):].split("?")[0].split(" + "))
    assert record["answer"] == str(a + b)


def test_a_reward_that_raises_is_named_and_the_last_checkpoint_stays(
        tmp_path, checkpoint):
    calls = [0]

    def flaky_factory():
        def flaky(prompts, completions, **columns):
            calls[0] += 1
            if calls[0] == 4:  # epoch 2's second step: epoch 1 is saved
                raise KeyError("missing column")
            return [0.5] * len(completions)
        return flaky

    rl_rewards.register_reward("flaky", flaky_factory)
    try:
        path = _recipe(tmp_path, checkpoint, rl={
            "rewards": [{"name": "flaky"}]}, data={
                "source": "prompt_file", "path": str(tmp_path / "prompts.jsonl"),
                "batch_size": 2, "validation_split": 0.0})
        with pytest.raises(rl_rewards.RewardError,
                           match="reward 'flaky' raised KeyError"):
            run_recipe(load_recipe(path), str(tmp_path / "run"), verbose=0)
    finally:
        rl_rewards.REWARDS.pop("flaky")
    state = read_state(str(tmp_path / "run"))
    assert state["epochs_done"] == 1
    assert os.path.isdir(state["path"])
    assert len(read_history(str(tmp_path / "run" / "history.csv"))) == 1


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_rollouts_and_adapters(tmp_path,
                                                               checkpoint):
    path = _recipe(tmp_path, checkpoint, deterministic=True, seed=2,
                   rl={"num_iterations": 2},
                   stages=[{"name": "grpo", "epochs": 3, "steps_per_epoch": 2,
                            "learning_rate": 1e-2, "schedule": "cosine"}])
    whole = _kft_run(path, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _kft_run(path, tmp_path / "resumed", kill_at=4)  # in epoch 2
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert read_state(str(tmp_path / "resumed"))["epochs_done"] == 1
    resumed = _kft_run(path, tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [read_history(str(d / "history.csv")) for d in
            (tmp_path / "whole", tmp_path / "resumed")]
    for key in ("reward", "loss", "completion_length"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key

    def completions(run):
        lines = (tmp_path / run / "samples.jsonl").read_text().splitlines()
        return {(s["step"], s["completion"]) for s in map(json.loads, lines)}

    assert completions("whole") == completions("resumed")
    with np.load(tmp_path / "whole" / "adapter.npz") as a, \
            np.load(tmp_path / "resumed" / "adapter.npz") as b:
        for key in a.files:
            if a[key].dtype.kind not in "US":
                np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)


@pytest.mark.parametrize("change, needle", [
    ({"rl": {"rewards": [{"name": "lenght"}]}}, "did you mean 'length'"),
    ({"rl": {"rewards": []}}, "rl.rewards"),
    ({"lora": None}, "rl.beta > 0"),
    ({"rl": {"rewards": [{"name": "length", "options": {"max_word": 2}}]}},
     "rl.rewards[0]"),
])
def test_bad_rl_recipes_name_the_key(tmp_path, checkpoint, change, needle):
    path = _recipe(tmp_path, checkpoint, **change)
    with pytest.raises(RecipeError, match=needle.replace("[", r"\[")
                       .replace("]", r"\]").replace(".", r"\.")):
        config = load_recipe(path)
        task_for(config).build_model(config, None, (), True)


def test_rl_sources_need_rl_and_rl_needs_them(tmp_path, checkpoint):
    path = _recipe(tmp_path, checkpoint, rl=None)
    recipe = yaml.safe_load(open(path))
    recipe.pop("rl")
    open(path, "w").write(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="add an rl: section"):
        load_recipe(path)
    recipe = yaml.safe_load(open(_recipe(tmp_path, checkpoint)))
    recipe["data"] = {"source": "wordnet_glosses"}
    open(path, "w").write(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="rl: trains on prompts"):
        load_recipe(path)
