"""The recipe's `rl:` section and its prompt sources (Keras-free: `kft
validate` checks them without loading TensorFlow)."""

import difflib
import sys
from typing import Literal

from pydantic import Field

from kft.utils.validation import Strict

__all__ = ["BUILTIN_REWARDS", "RL_SOURCES", "RLConfig", "RewardConfig",
           "check_rl"]

RL_SOURCES = ("prompt_file", "arithmetic")
# kft.rl.rewards.REWARDS' built-ins, named here without importing Keras (a
# test keeps them equal). Rewards registered in Python are accepted too.
BUILTIN_REWARDS = ("exact_answer", "format", "length")


class RewardConfig(Strict):
    """One reward of `rl.rewards`: a registered reward's `name`, its
    `weight` in the total, and the options its factory takes (`pattern`
    for `format` / `exact_answer`, `max_words` or `max_chars` for
    `length`)."""

    name: str
    weight: float = 1.0
    options: dict[str, str | int | float | bool] = {}


class RLConfig(Strict):
    """`rl:` reinforcement learning from verifiable rewards
    (`kft.rl.RLCausalLM`) on prompts: `data.source` `arithmetic` (two-digit
    addition, `max_examples` prompts) or `prompt_file` (JSON-lines records
    with a `prompt` and the columns the rewards read).

    `algorithm`: `grpo` (group-normalised advantages) or `rloo` (the
    leave-one-out baseline). `loss_type`: `grpo`, `dr_grpo` or `dapo`.
    `rewards`: registered rewards only (never code). `num_generations`
    completions per prompt (`data.batch_size` prompts per step), sampled at
    `temperature` / `top_p`, at most `max_new_tokens` each after prompts of
    at most `max_prompt_length` tokens. `beta`: the KL penalty to the
    reference (the base with the LoRA adapters off). `epsilon` (and
    `epsilon_high`): the ratio's clip. `num_iterations`: optimizer steps per
    batch of rollouts. `chat`: render prompts with the model's chat
    template. `eval_batch_size`: held-out prompts per greedy generation.
    """

    algorithm: Literal["grpo", "rloo"] = "grpo"
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    rewards: list[RewardConfig] = Field(min_length=1)
    num_generations: int = Field(default=8, ge=2)
    max_new_tokens: int = Field(default=64, ge=1)
    max_prompt_length: int = Field(default=96, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    beta: float = Field(default=0.04, ge=0)
    epsilon: float = Field(default=0.2, gt=0)
    epsilon_high: float | None = Field(default=None, gt=0)
    num_iterations: int = Field(default=1, ge=1)
    chat: bool = True
    eval_batch_size: int = Field(default=8, ge=1)


def _registered_rewards():
    names = list(BUILTIN_REWARDS)
    module = sys.modules.get("kft.rl.rewards")  # rewards registered in Python
    if module is not None:
        names += [n for n in module.REWARDS if n not in names]
    return names


def check_rl(recipe):
    """Checks a `RecipeConfig`'s `rl:` section against its data and
    adapters.

    Raises:
        ValueError: naming the key, the value and what is allowed.
    """
    rl, data = recipe.rl, recipe.data
    if rl is None:
        if data.source in RL_SOURCES:
            raise ValueError(f"data.source {data.source!r} holds prompts for "
                             "reinforcement learning; add an rl: section")
        return recipe
    if data.source not in RL_SOURCES:
        raise ValueError(f"rl: trains on prompts, data.source one of "
                         f"{list(RL_SOURCES)}; received {data.source!r}")
    if recipe.preference is not None or recipe.prompt_tuning is not None:
        raise ValueError("rl: goes with lora: (or full fine-tuning), not with "
                         "preference: or prompt_tuning:")
    if rl.beta > 0 and recipe.lora is None:
        raise ValueError("rl.beta > 0 penalises the KL to the base with the "
                         "LoRA adapters off, and this recipe has no lora:; add "
                         "lora: or set rl.beta: 0")
    known = _registered_rewards()
    for i, reward in enumerate(rl.rewards):
        if reward.name not in known:
            close = difflib.get_close_matches(reward.name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"rl.rewards[{i}].name {reward.name!r} is not a "
                             f"registered reward {known}{hint}")
    if data.packing:
        raise ValueError("data.packing: prompts are not packed; set "
                         "data.packing: false")
    return recipe
