"""GRPO / RLOO advantages, the clipped loss and the KL term against
numbers computed by hand."""

import math

import numpy as np
import pytest
from keras import ops

from kft.rl.objective import group_advantages
from kft.rl.objective import kl_penalty
from kft.rl.objective import policy_loss
from kft.rl.objective import rloo_advantages


def test_group_advantages_by_hand():
    # Group 1: mean 0.25, population std sqrt(0.25 * 0.75) = 0.4330.
    # Group 2: all equal -> 0 (no signal).
    advantages = group_advantages([1, 0, 0, 0, 0.5, 0.5, 0.5, 0.5], 4,
                                  epsilon=0.0)
    std = math.sqrt(0.25 * 0.75)
    np.testing.assert_allclose(advantages[:4], [0.75 / std] + [-0.25 / std] * 3,
                               rtol=1e-6)
    np.testing.assert_array_equal(advantages[4:], 0.0)
    # Dr. GRPO: centred only.
    np.testing.assert_allclose(group_advantages([3, 1], 2, scale=False), [1, -1])
    # The default epsilon keeps a zero-variance group finite.
    assert np.all(np.isfinite(group_advantages([2, 2], 2)))


def test_rloo_advantages_by_hand():
    # r_i minus the mean of the other three.
    np.testing.assert_allclose(rloo_advantages([1, 0, 0, 0], 4),
                               [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)
    np.testing.assert_allclose(rloo_advantages([4, 2, 0], 3), [3, 0, -3])
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages([1, 2], 1)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages([1, 2], 3)


LOGPS = [[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]]
OLD = [[-1.1, -2.0, -0.5], [-0.5, -1.0, -1.0]]
ADVANTAGES = [1.0, -1.0]
MASK = [[1, 1, 0], [1, 1, 1]]


def _hand_token_losses():
    # Row 0 (A = 1): ratios e^0.1 (inside the clip) and 1; token 3 masked.
    # Row 1 (A = -1): ratio e^-0.5 = 0.607 < 0.8: min(-0.607, -0.8) -> 0.8;
    # then ratios 1 -> loss 1.
    return [[-math.exp(0.1), -1.0], [0.8, 1.0, 1.0]]


def _loss(**kwargs):
    loss, stats = policy_loss(ops.array(LOGPS), ops.array(OLD),
                              ops.array(ADVANTAGES), ops.array(MASK), **kwargs)
    return float(loss), {k: float(v) for k, v in stats.items()}


def test_clipped_loss_by_hand_for_each_loss_type():
    row0, row1 = _hand_token_losses()
    grpo = (sum(row0) / 2 + sum(row1) / 3) / 2
    total = sum(row0) + sum(row1)
    loss, stats = _loss(loss_type="grpo")
    assert loss == pytest.approx(grpo, rel=1e-5)
    assert stats["clip_fraction"] == pytest.approx(1 / 5)  # row 1, token 1
    assert stats["kl"] == 0.0
    assert _loss(loss_type="dapo")[0] == pytest.approx(total / 5, rel=1e-5)
    assert _loss(loss_type="dr_grpo", max_completion_length=3)[0] == pytest.approx(
        total / (2 * 3), rel=1e-5)
    # A wider upper clip (DAPO's clip-higher) changes nothing here; a
    # narrower lower one does: e^-0.5 is inside [0.5, ...].
    loss, stats = _loss(epsilon_low=0.5)
    assert loss == pytest.approx((sum(row0) / 2 + (math.exp(-0.5) + 2) / 3) / 2,
                                 rel=1e-5)
    assert stats["clip_fraction"] == 0.0


def test_kl_penalty_by_hand():
    ref = [[-1.0, -1.0, -1.0]] * 2
    # k3 = e^(ref - logp) - (ref - logp) - 1: only row 0, token 2 differs
    # (ref - logp = 1): e - 2; token 3 (ref - logp = -0.5) is masked later.
    k3 = math.e - 2
    np.testing.assert_allclose(kl_penalty(ops.array(LOGPS), ops.array(ref)),
                               [[0, k3, math.exp(-0.5) + 0.5 - 1], [0, 0, 0]],
                               rtol=1e-6)
    row0, row1 = _hand_token_losses()
    loss, stats = _loss(ref_logps=ops.array(ref), beta=0.1)
    expected = ((row0[0] + row0[1] + 0.1 * k3) / 2 + sum(row1) / 3) / 2
    assert loss == pytest.approx(expected, rel=1e-5)
    assert stats["kl"] == pytest.approx(k3 / 5, rel=1e-5)  # masked token left out
    with pytest.raises(ValueError, match="ref_logps"):
        _loss(beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        _loss(loss_type="ppo")


def test_loss_gradient_is_advantage_weighted_at_ratio_one():
    import tensorflow as tf

    logps = tf.Variable([[-1.0, -1.0], [-2.0, -2.0]])
    with tf.GradientTape() as tape:
        loss, _ = policy_loss(logps, tf.stop_gradient(logps), ops.array([2.0, -1.0]),
                              ops.ones((2, 2)), loss_type="dapo")
    # d/dlogp of -ratio A / 4 tokens at ratio 1: -A / 4.
    np.testing.assert_allclose(tape.gradient(loss, logps),
                               [[-0.5, -0.5], [0.25, 0.25]], rtol=1e-6)
