"""RLCausalLM on a tiny random Llama with LoRA: the objective moves the
rewarded completion up and the others down, the reference is the base
with its adapters off, and `fit` runs the whole loop on prompts."""

import json

import keras
import numpy as np
import pytest
from llm_fixtures import tiny_causal_lm

from kft.lora import apply_lora
from kft.rl import PromptDataset
from kft.rl import RewardError
from kft.rl import RLCausalLM
from kft.rl import RolloutConfig
from kft.rl import arithmetic_prompts
from kft.rl import evaluate_rewards
from kft.rl import group_advantages
from kft.rl.rollout import Rollouts

ROLLOUT = RolloutConfig(num_generations=4, max_new_tokens=4, max_prompt_length=24)


def _lora_lm(seed=0):
    lm = tiny_causal_lm(sequence_length=32, seed=seed)
    apply_lora(lm, targets="all-linear", rank=4, alpha=8)
    return lm


def _fixed_rollouts():
    """Two prompts (3 tokens each), each with four different 4-token
    completions."""
    token_ids = np.zeros((8, 10), "int32")
    token_ids[:4, :3] = [265, 72, 105]
    token_ids[4:, :3] = [265, 80, 81]
    completions = [[97, 98, 99, 100], [101, 102, 103, 104],
                   [110, 111, 112, 113], [120, 121, 122, 123]]
    token_ids[:4, 3:7] = completions
    token_ids[4:, 3:7] = completions[::-1]
    prompt = np.zeros((8, 10), bool)
    prompt[:, :3] = True
    completion = np.zeros((8, 10), bool)
    completion[:, 3:7] = True
    return Rollouts(token_ids, prompt, completion, [""] * 8,
                    np.repeat([0, 1], 4))


def _sequence_logps(model, x):
    return (np.asarray(model._logps(x)) * x["completion_mask"]).sum(axis=1)


def test_one_rewarded_completion_rises_and_the_others_fall():
    lm = _lora_lm()
    model = RLCausalLM(lm, rewards=lambda p, c, **k: [0.0] * len(c),
                       rollout=ROLLOUT, beta=0.04, num_iterations=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    # One completion per group earns the reward: the first of group 1, the
    # third of group 2.
    rewarded = [0, 6]
    rewards = np.zeros(8)
    rewards[rewarded] = 1.0
    x = _fixed_rollouts().training_inputs(group_advantages(rewards, 4))
    before = _sequence_logps(model, x)
    x.update(model.score(x))
    assert set(x) >= {"old_logps", "ref_logps"}
    # Adapters start at zero: policy = reference = sampling policy.
    np.testing.assert_allclose(x["ref_logps"], x["old_logps"], atol=1e-5)
    base = [v.numpy().copy() for v in lm.weights if "lora" not in v.path]
    for _ in range(8):
        logs = model.train_on_batch(x, return_dict=True)
    after = _sequence_logps(model, x)
    others = [i for i in range(8) if i not in rewarded]
    assert np.all(after[rewarded] > before[rewarded] + 0.5)
    assert np.all(after[others] < before[others])
    assert logs["kl"] > 0 and 0 <= logs["clip_fraction"] <= 1
    # Only the adapters moved; the reference (adapters off) did not.
    for old, variable in zip(base, [v for v in lm.weights if "lora" not in v.path]):
        np.testing.assert_array_equal(old, variable.numpy())
    np.testing.assert_allclose(model.score(x)["ref_logps"],
                               x["ref_logps"], atol=1e-5)


def _prompts(count=8):
    return arithmetic_prompts(count, seed=0, instruction="{a}+{b}=")


def _short(prompts, completions, **columns):
    return [1.0 / (1 + len(c)) for c in completions]


def test_rollouts_are_fixed_by_seed_and_step():
    model = RLCausalLM(_lora_lm(), [_short], rollout=ROLLOUT, seed=3)
    prompts = [r["prompt"] for r in _prompts(2)]
    first = model.generator().generate(prompts, step=5)
    again = model.generator().generate(prompts, step=5)
    other = model.generator().generate(prompts, step=6)
    np.testing.assert_array_equal(first.token_ids, again.token_ids)
    assert not np.array_equal(first.token_ids, other.token_ids)
    assert first.token_ids.shape == (8, 28)
    assert first.completion_mask.sum(axis=1).max() <= 4
    # A completion never overlaps its prompt.
    assert not np.any(first.completion_mask & first.prompt_mask)
    assert list(first.prompt_index) == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="more than max_prompt_length=24"):
        model.generator().generate(["x" * 40])


def test_fit_on_prompts_logs_metrics_samples_and_held_out_reward(tmp_path):
    model = RLCausalLM(_lora_lm(), [_short], rollout=ROLLOUT, loss_type="dapo",
                       advantage="rloo", num_iterations=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.samples_path = str(tmp_path / "samples.jsonl")
    held_out = _prompts(3)
    history = model.fit(PromptDataset(_prompts(), batch_size=2), epochs=2,
                        steps_per_epoch=2, validation_data=held_out, verbose=0)
    logs = history.history
    for key in ("loss", "reward", "reward__short", "reward_std", "kl",
                "clip_fraction", "completion_length", "zero_std_fraction",
                "generation_seconds", "logps_seconds", "update_seconds",
                "val_reward", "val_completion_length"):
        assert len(logs[key]) == 2, key
    assert int(model.optimizer.iterations.numpy()) == 2 * 2 * 2
    lines = [json.loads(line) for line in open(model.samples_path)]
    assert len(lines) == 2 * 2 * 2 * 4  # epochs, steps, prompts, G
    assert {line["step"] for line in lines} == {0, 1, 2, 3}
    metrics, samples = evaluate_rewards(model, held_out, batch_size=2)
    assert metrics["reward"] == pytest.approx(logs["val_reward"][-1])
    assert len(samples) == 3


def test_a_broken_reward_is_named_and_bad_arguments_are_clear():
    def broken(prompts, completions, **columns):
        return [float("nan")] * len(completions)

    model = RLCausalLM(_lora_lm(), [_short, broken], rollout=ROLLOUT, beta=0.0)
    model.compile(optimizer="adam")
    with pytest.raises(RewardError, match="reward 'broken' returned a non-finite"):
        model.fit(_prompts(2), epochs=1, steps_per_epoch=1, verbose=0)
    lm = tiny_causal_lm(sequence_length=16)
    with pytest.raises(ValueError, match="apply LoRA first"):
        RLCausalLM(lm, [_short])
    with pytest.raises(ValueError, match="loss_type must be one of"):
        RLCausalLM(lm, [_short], beta=0, loss_type="ppo")
    with pytest.raises(ValueError, match="compile takes loss='auto'"):
        RLCausalLM(lm, [_short], beta=0).compile(loss="mse")
