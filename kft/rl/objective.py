"""The GRPO / RLOO objective: advantages, the clipped ratio, the KL term.

For a prompt with `G` sampled completions and their rewards `r_1..r_G`:

- `group` advantages (GRPO, Shao et al. 2024): `(r_i - mean(r)) /
  (std(r) + eps)`, the population std of the group, as TRL computes it;
  `scale=False` leaves the std out (Dr. GRPO, Liu et al. 2025).
- `rloo` advantages (Ahmadian et al. 2024): `r_i - mean_{j != i} r_j`, the
  leave-one-out baseline, `= G / (G - 1) (r_i - mean(r))`.

Per completion token `t`, with `ratio = exp(logp - old_logp)`:

    loss_t = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)
             + beta (exp(ref - logp) - (ref - logp) - 1)

(the KL term is Schulman's `k3` estimator of KL(policy || reference),
as in the GRPO paper and TRL). The token losses become one number as
TRL's `loss_type` says:

- `grpo`: each sequence's mean over its tokens, then the mean over
  sequences.
- `dapo`: the mean over every completion token of the batch (Yu et al.
  2025; DAPO also raises `eps_high`, e.g. 0.28).
- `dr_grpo`: the sum over every token divided by `sequences *
  max_completion_length`, a constant (Dr. GRPO).

Everything here is `keras.ops` (advantages also take NumPy arrays).
"""

import numpy as np
from keras import ops

__all__ = ["ADVANTAGES", "LOSS_TYPES", "group_advantages", "kl_penalty",
           "policy_loss", "rloo_advantages"]

ADVANTAGES = ("group", "rloo")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def _groups(rewards, group_size):
    rewards = np.asarray(rewards, "float64")
    if group_size < 1 or rewards.size % group_size:
        raise ValueError(f"{rewards.size} rewards do not split into groups of "
                         f"{group_size}")
    return rewards.reshape(-1, group_size)


def group_advantages(rewards, group_size, scale=True, epsilon=1e-4):
    """GRPO's group-normalised advantages.

    Args:
        rewards: `(N,)` rewards, each prompt's `group_size` completions
            next to each other.
        group_size: completions per prompt (`G`).
        scale: divide by the group's std (`False`: Dr. GRPO).
        epsilon: added to the std.

    Returns:
        float32 `(N,)`.

    Example:

    >>> group_advantages([1.0, 0.0, 0.0, 0.0], 4, epsilon=0.0).round(4)
    array([ 1.7321, -0.5774, -0.5774, -0.5774], dtype=float32)
    """
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale:
        scale = groups.std(axis=1, keepdims=True) + epsilon
        # A group whose rewards are all equal has advantages 0, even at
        # epsilon 0.
        centred = np.divide(centred, scale, out=np.zeros_like(centred),
                            where=scale > 0)
    return centred.reshape(-1).astype("float32")


def rloo_advantages(rewards, group_size):
    """RLOO's leave-one-out advantages: each reward minus the mean of the
    other `G - 1` rewards of its group.

    Example:

    >>> rloo_advantages([1.0, 0.0, 0.0, 0.0], 4).round(4)
    array([ 1.    , -0.3333, -0.3333, -0.3333], dtype=float32)
    """
    groups = _groups(rewards, group_size)
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt. "
                         f"Received: group_size={group_size}")
    others = (groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1).astype("float32")


def kl_penalty(logps, ref_logps):
    """Per-token `k3` estimate of KL(policy || reference):
    `exp(ref - logp) - (ref - logp) - 1` (>= 0, 0 where they agree)."""
    delta = ref_logps - logps
    return ops.exp(delta) - delta - 1.0


def _aggregate(token_losses, mask, loss_type, max_completion_length):
    if loss_type == "grpo":
        per_sequence = (ops.sum(token_losses * mask, axis=-1)
                        / ops.maximum(ops.sum(mask, axis=-1), 1.0))
        return ops.mean(per_sequence)
    if loss_type == "dapo":
        return ops.sum(token_losses * mask) / ops.maximum(ops.sum(mask), 1.0)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type='dr_grpo' divides by "
                             "max_completion_length; give it")
        sequences = ops.cast(ops.shape(mask)[0], "float32")
        return ops.sum(token_losses * mask) / (sequences * max_completion_length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}. Received: "
                     f"loss_type={loss_type!r}")


def policy_loss(logps, old_logps, advantages, mask, ref_logps=None, *,
                beta=0.0, epsilon_low=0.2, epsilon_high=None, loss_type="grpo",
                max_completion_length=None):
    """The clipped policy-gradient loss with a KL penalty.

    Args:
        logps: `(N, T)` the policy's log-probabilities of the completion
            tokens (differentiable).
        old_logps: `(N, T)` the same under the policy that sampled them
            (no gradient).
        advantages: `(N,)` one advantage per completion.
        mask: `(N, T)` 1 on completion tokens.
        ref_logps: `(N, T)` the reference's; needed when `beta > 0`.
        beta: the KL penalty's weight.
        epsilon_low: the ratio's lower clip, `1 - epsilon_low`.
        epsilon_high: the upper clip, `1 + epsilon_high` (default
            `epsilon_low`).
        loss_type: `"grpo"`, `"dapo"` or `"dr_grpo"` (module docstring).
        max_completion_length: `dr_grpo`'s constant.

    Returns:
        `(loss, stats)`: a scalar, and `{"kl": mean token KL, "clip_fraction":
        the share of tokens whose ratio was clipped}` (no gradient).
    """
    mask = ops.cast(mask, "float32")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    advantages = ops.expand_dims(ops.cast(advantages, "float32"), -1)
    ratio = ops.exp(logps - ops.stop_gradient(old_logps))
    clipped = ops.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    token_losses = -ops.minimum(ratio * advantages, clipped * advantages)
    tokens = ops.maximum(ops.sum(mask), 1.0)
    kl = ops.zeros(())
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps (the reference's "
                             "log-probabilities)")
        token_kl = kl_penalty(logps, ops.stop_gradient(ref_logps))
        token_losses = token_losses + beta * token_kl
        kl = ops.sum(ops.stop_gradient(token_kl) * mask) / tokens
    elif ref_logps is not None:
        kl = ops.sum(kl_penalty(ops.stop_gradient(logps), ref_logps)
                     * mask) / tokens
    was_clipped = ops.logical_or(
        ops.logical_and(ratio < 1.0 - epsilon_low, advantages < 0),
        ops.logical_and(ratio > 1.0 + epsilon_high, advantages > 0))
    clip_fraction = ops.sum(ops.cast(was_clipped, "float32") * mask) / tokens
    loss = _aggregate(token_losses, mask, loss_type, max_completion_length)
    return loss, {"kl": kl, "clip_fraction": ops.stop_gradient(clip_fraction)}
