"""kft.losses.preference: each loss against its paper's formula by hand, and
DPO (loss and gradients) against TRL's formula."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from kft.losses.preference import LOSSES
from kft.losses.preference import dpo_loss
from kft.losses.preference import hinge_loss
from kft.losses.preference import ipo_loss
from kft.losses.preference import kto_loss
from kft.losses.preference import orpo_loss
from kft.losses.preference import robust_dpo_loss
from kft.losses.preference import simpo_loss

# Fixed log-probabilities: (chosen, rejected) per example, float64.
LOGPS = np.array([[-5.0, -7.0], [-3.0, -2.5], [-10.0, -10.0], [-1.0, -30.0]])
REFERENCE = np.array([[-5.5, -6.0], [-3.2, -2.0], [-9.0, -11.0], [-2.0, -20.0]])
LENGTHS = np.array([[4.0, 6.0], [2.0, 3.0], [5.0, 5.0], [1.0, 12.0]])


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def margins():
    """h = (pi_c - pi_r) - (ref_c - ref_r), by hand: 1.5, 0.7, -2, 11."""
    return [(c - r) - (rc - rr) for (c, r), (rc, rr) in zip(LOGPS, REFERENCE)]


def check(losses, expected):
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=0, atol=1e-6)


def test_margins_by_hand():
    np.testing.assert_allclose(margins(), [1.5, 0.7, -2.0, 11.0], atol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dpo_and_cdpo(smoothing):
    beta = 0.1
    expected = [-(1 - smoothing) * math.log(sigmoid(beta * h))
                - smoothing * math.log(sigmoid(-beta * h)) for h in margins()]
    check(dpo_loss(LOGPS, REFERENCE, beta=beta, label_smoothing=smoothing),
          expected)
    # h = 1.5, beta = 0.1: -log s(0.15), a number to compare with by eye.
    if smoothing == 0:
        assert abs(expected[0] - 0.620957047789532) < 1e-12


def test_robust_dpo():
    beta, eps = 0.5, 0.2
    expected = [(-(1 - eps) * math.log(sigmoid(beta * h))
                 + eps * math.log(sigmoid(-beta * h))) / (1 - 2 * eps)
                for h in margins()]
    check(robust_dpo_loss(LOGPS, REFERENCE, beta=beta, label_smoothing=eps),
          expected)
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        robust_dpo_loss(LOGPS, REFERENCE, label_smoothing=0.5)


def test_ipo_and_hinge():
    beta = 0.25
    check(ipo_loss(LOGPS, REFERENCE, beta=beta),
          [(h - 1 / (2 * beta)) ** 2 for h in margins()])  # (1.5 - 2)^2 = 0.25 first
    check(hinge_loss(LOGPS, REFERENCE, beta=beta),
          [max(0.0, 1 - beta * h) for h in margins()])  # 0.625, 0.825, 1.5, 0


def test_simpo():
    beta, gamma = 2.0, 0.5
    expected = [-math.log(sigmoid(beta * (c / nc - r / nr) - gamma))
                for (c, r), (nc, nr) in zip(LOGPS, LENGTHS)]
    check(simpo_loss(LOGPS, LENGTHS, beta=beta, gamma=gamma), expected)


def test_orpo():
    beta = 0.1

    def log_odds(mean):
        return mean - math.log(1 - math.exp(mean))

    expected = [-c / nc - beta * math.log(sigmoid(log_odds(c / nc)
                                                  - log_odds(r / nr)))
                for (c, r), (nc, nr) in zip(LOGPS, LENGTHS)]
    check(orpo_loss(LOGPS, LENGTHS, beta=beta), expected)


def test_orpo_is_finite_near_probability_one_and_zero():
    logps = tf.Variable([[-1e-7, -60.0], [-0.69, -0.70]], dtype="float64")
    with tf.GradientTape() as tape:
        loss = ops.sum(orpo_loss(logps, np.ones((2, 2))))
    gradient = tape.gradient(loss, logps)
    assert np.isfinite(loss.numpy()) and np.all(np.isfinite(gradient.numpy()))


def test_kto():
    beta, kl, w_d, w_u = 0.5, 0.3, 1.0, 1.5
    logps, reference = LOGPS[:, 0], REFERENCE[:, 0]
    desirable = np.array([1.0, 0.0, 1.0, 0.0])
    expected = []
    for p, r, good in zip(logps, reference, desirable):
        reward = p - r
        expected.append(w_d * (1 - sigmoid(beta * (reward - kl))) if good
                        else w_u * (1 - sigmoid(beta * (kl - reward))))
    check(kto_loss(logps, reference, desirable, kl, beta=beta,
                   desirable_weight=w_d, undesirable_weight=w_u), expected)


# === TRL's formulas, in numpy (trl/trainer/dpo_trainer.py `dpo_loss`,
# kto_trainer.py `kto_loss`, cpo_trainer.py SimPO), mean over the batch ===


def _logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def trl_dpo(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type,
            label_smoothing=0.0):
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = (-_logsigmoid(beta * logits) * (1 - label_smoothing)
                  - _logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "robust":
        losses = (-_logsigmoid(beta * logits) * (1 - label_smoothing)
                  + _logsigmoid(-beta * logits) * label_smoothing) / (
                      1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1 - beta * logits)
    else:  # ipo
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses.mean()


def trl_kto(chosen, ref_chosen, rejected, ref_rejected, kl, beta):
    chosen_losses = 1 - 1 / (1 + np.exp(-beta * ((chosen - ref_chosen) - kl)))
    rejected_losses = 1 - 1 / (1 + np.exp(-beta * (kl - (rejected - ref_rejected))))
    return np.concatenate([chosen_losses, rejected_losses]).mean()


def trl_simpo(chosen_mean, rejected_mean, beta, gamma):
    logits = (chosen_mean - rejected_mean) - gamma / beta
    return (-_logsigmoid(beta * logits)).mean()


def numeric_gradient(function, x, step=1e-6):
    """Central differences of a float64 numpy function."""
    gradient = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += step
        down[index] -= step
        gradient[index] = (function(up) - function(down)) / (2 * step)
    return gradient


@pytest.mark.parametrize("name, loss_type, smoothing", [
    ("dpo", "sigmoid", 0.0), ("dpo", "sigmoid", 0.1), ("robust", "robust", 0.1),
    ("hinge", "hinge", 0.0), ("ipo", "ipo", 0.0)])
def test_loss_and_gradients_equal_trl(name, loss_type, smoothing):
    beta = 0.1 if name != "hinge" else 0.2
    kwargs = {"label_smoothing": smoothing} if smoothing else {}

    def trl(logps):
        return trl_dpo(logps[:, 0], logps[:, 1], REFERENCE[:, 0], REFERENCE[:, 1],
                       beta, loss_type, smoothing)

    variable = tf.Variable(LOGPS)
    with tf.GradientTape() as tape:
        ours = ops.mean(LOSSES[name].function(variable, REFERENCE, beta=beta,
                                              **kwargs))
    gradient = tape.gradient(ours, variable).numpy()
    assert abs(float(ours) - trl(LOGPS)) < 1e-6
    np.testing.assert_allclose(gradient, numeric_gradient(trl, LOGPS), atol=1e-6)
    assert np.abs(gradient).max() > 1e-3  # the gradients are not all zero


def test_kto_and_simpo_equal_trl():
    beta, kl = 0.1, 0.4
    desirable = np.array([1.0, 1.0, 0.0, 0.0])
    ours = ops.mean(kto_loss(LOGPS[:, 0], REFERENCE[:, 0], desirable, kl, beta=beta))
    good, bad = desirable == 1, desirable == 0
    theirs = trl_kto(LOGPS[good, 0], REFERENCE[good, 0], LOGPS[bad, 0],
                     REFERENCE[bad, 0], kl, beta)
    assert abs(float(ours) - theirs) < 1e-6
    mean = LOGPS / LENGTHS
    ours = ops.mean(simpo_loss(LOGPS, LENGTHS, beta=2.0, gamma=0.5))
    assert abs(float(ours) - trl_simpo(mean[:, 0], mean[:, 1], 2.0, 0.5)) < 1e-6


def test_float32_inputs_keep_float32():
    losses = dpo_loss(LOGPS.astype("float32"), REFERENCE.astype("float32"))
    assert keras.backend.standardize_dtype(losses.dtype) == "float32"


def test_registry_says_what_each_loss_needs():
    assert set(LOSSES) == {"dpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto"}
    assert [n for n, spec in LOSSES.items() if not spec.reference] == ["simpo",
                                                                      "orpo"]
    assert [n for n, spec in LOSSES.items() if spec.unpaired] == ["kto"]
    assert LOSSES["simpo"].beta == 2.0 and LOSSES["dpo"].beta == 0.1
