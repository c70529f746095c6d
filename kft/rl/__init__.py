"""Reinforcement learning from verifiable rewards for keras-hub causal LMs:
GRPO (and Dr. GRPO, DAPO) and RLOO, with LoRA.

- `kft.rl.rewards`: reward functions (TRL's signature) and the registry of
  built-ins recipes name.
- `kft.rl.objective`: advantages, the clipped ratio loss, the KL term.
- `kft.rl.rollout`: sampled completions with keras-hub's cached generation.
- `kft.rl.model`: `RLCausalLM`, whose `fit` trains on prompts.
- `kft.rl.trainer`: the loop behind `fit`, and held-out reward.
- `kft.rl.data`: `PromptDataset` and the two-digit addition task.
"""

from kft.rl.data import PromptDataset
from kft.rl.data import arithmetic_prompts
from kft.rl.data import render_prompts
from kft.rl.data import split_prompts
from kft.rl.model import RLCausalLM
from kft.rl.objective import group_advantages
from kft.rl.objective import policy_loss
from kft.rl.objective import rloo_advantages
from kft.rl.rewards import REWARDS
from kft.rl.rewards import RewardError
from kft.rl.rewards import RewardSpec
from kft.rl.rewards import get_reward
from kft.rl.rewards import register_reward
from kft.rl.rewards import score_rewards
from kft.rl.rollout import RolloutConfig
from kft.rl.rollout import RolloutGenerator
from kft.rl.trainer import evaluate_rewards

__all__ = ["REWARDS", "PromptDataset", "RLCausalLM", "RewardError", "RewardSpec",
           "RolloutConfig", "RolloutGenerator", "arithmetic_prompts",
           "evaluate_rewards", "get_reward", "group_advantages", "policy_loss",
           "register_reward", "render_prompts", "rloo_advantages",
           "score_rewards", "split_prompts"]
