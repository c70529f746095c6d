"""The real SmolLM2-135M-Instruct (large): the packaged recipe's prompts fit
its max_prompt_length, and rollouts of chat prompts decode to text that the
recipe's rewards score."""

import os

import numpy as np
import pytest
import yaml

from kft.models.causal_lm import build_causal_lm
from kft.recipes.loader import resolve_recipe_path
from kft.rl import RolloutConfig
from kft.rl import RolloutGenerator
from kft.rl import arithmetic_prompts
from kft.rl import get_reward
from kft.rl import render_prompts
from kft.rl import score_rewards


def _smollm2_dir():
    assets = os.environ.get("KFT_ASSETS", os.path.expanduser("~/.cache/kft/assets"))
    return os.path.join(assets, "smollm2_135m_instruct")


@pytest.mark.large
def test_smollm2_rollouts_of_the_packaged_recipes_prompts():
    pytest.importorskip("jinja2")
    if not os.path.isfile(os.path.join(_smollm2_dir(), "config.json")):
        pytest.skip(f"SmolLM2 not converted in {_smollm2_dir()}: run "
                    "kft convert smollm2")
    with open(resolve_recipe_path("grpo_smollm2_lora")) as f:
        recipe = yaml.safe_load(f)
    rl = recipe["rl"]
    lm = build_causal_lm(_smollm2_dir())
    records = render_prompts(lm, arithmetic_prompts(recipe["data"]["max_examples"]))
    config = RolloutConfig(num_generations=2, max_new_tokens=6,
                           max_prompt_length=rl["max_prompt_length"])
    generator = RolloutGenerator(lm, config)
    # Every prompt of the recipe fits (encode refuses a longer one).
    generator.encode([r["prompt"] for r in records])
    rollouts = generator.generate([r["prompt"] for r in records[:2]], step=0)
    assert rollouts.completion_mask.sum(axis=1).max() <= 6
    assert all(isinstance(c, str) and "<|im" not in c for c in rollouts.completions)
    rewards = [get_reward(r["name"], **r["options"]) for r in rl["rewards"]]
    total, per_reward = score_rewards(
        rewards, [r["prompt"] for r in records[:2] for _ in range(2)],
        rollouts.completions,
        {"answer": [r["answer"] for r in records[:2] for _ in range(2)]},
        weights=[r["weight"] for r in rl["rewards"]])
    assert total.shape == (4,) and np.all((0 <= total) & (total <= 1))
    assert set(per_reward) == {"format", "length", "exact_answer"}
