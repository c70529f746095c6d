"""Preference losses on sequence log-probabilities, in `keras.ops`.

Each loss is written once, from its paper, on per-example log-probabilities
of the answers (the sum over the answer's tokens, `logps`; its length,
`lengths`, where the loss normalises by it) and returns per-example losses
and rewards; `PreferenceCausalLM` averages the losses over the batch.
With `h = (logp_c - logp_r) - (ref_c - ref_r)`, the log-ratio margin of the
policy over the reference:

- `dpo`: `-(1-e) log s(b h) - e log s(-b h)`, `e = label_smoothing` (0:
  DPO, Rafailov et al. 2023, eq. 7; else cDPO, Mitchell 2023).
- `robust`: `(-(1-e) log s(b h) + e log s(-b h)) / (1 - 2e)` (rDPO,
  Chowdhury et al. 2024, eq. 8).
- `ipo`: `(h - 1 / (2 b))^2` (Azar et al. 2023, eq. 17).
- `hinge`: `max(0, 1 - b h)` (SLiC-HF, Zhao et al. 2023).
- `simpo`: `-log s(b (logp_c / n_c - logp_r / n_r) - g)`, no reference
  (Meng et al. 2024, eq. 6).
- `orpo`: `-logp_c / n_c - b log s(log odds_c - log odds_r)`, the odds
  `p / (1 - p)` of the per-token mean probability, no reference (Hong et
  al. 2024, eqs. 6-7).
- `kto`: `w_d (1 - s(b (r - z)))` for a desirable answer, `w_u (1 - s(b
  (z - r)))` for an undesirable one, `r = logp - ref`, `z` the batch's KL
  estimate (Ethayarajh et al. 2024, eq. 8).

(`s` is the sigmoid, `b` is `beta`.) Rewards, as TRL reports them:
`b (logp - ref)` with a reference, `b logp / n` without. The losses keep
their inputs' dtype (the model passes float32).
"""

import dataclasses

from keras import ops

__all__ = ["LOSSES", "PreferenceLoss", "dpo_loss", "hinge_loss", "ipo_loss",
           "kto_loss", "orpo_loss", "robust_dpo_loss", "simpo_loss"]


def _log_sigmoid(x):
    # log s(x) = -softplus(-x): finite for large |x| in both directions.
    return -ops.softplus(-x)


def dpo_loss(logps, reference, *, beta=0.1, label_smoothing=0.0):
    """DPO (sigmoid), with cDPO's label smoothing.

    Args:
        logps: `(B, 2)` policy log-probabilities of chosen, rejected.
        reference: `(B, 2)` the reference's.
        beta: the KL penalty's inverse temperature.
        label_smoothing: the probability `e` that a label is flipped
            (cDPO); 0 is DPO.

    Returns:
        `(B,)` losses.

    Example:

    ```python
    losses = dpo_loss(keras.ops.array([[-1.0, -2.0]]),
                      keras.ops.array([[-1.0, -1.0]]), beta=1.0)
    # h = (-1 + 2) - 0 = 1: the loss is -log(sigmoid(1)) = 0.3133
    ```
    """
    margin = beta * _margin(logps, reference)
    return (-(1.0 - label_smoothing) * _log_sigmoid(margin)
            - label_smoothing * _log_sigmoid(-margin))


def robust_dpo_loss(logps, reference, *, beta=0.1, label_smoothing=0.0):
    """Robust DPO (rDPO): an unbiased loss under label noise `e < 1/2`.

    Arguments as `dpo_loss`; `label_smoothing` is the noise rate.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError("The robust loss needs 0 <= label_smoothing < 0.5. "
                         f"Received: label_smoothing={label_smoothing!r}")
    margin = beta * _margin(logps, reference)
    return ((-(1.0 - label_smoothing) * _log_sigmoid(margin)
             + label_smoothing * _log_sigmoid(-margin))
            / (1.0 - 2.0 * label_smoothing))


def ipo_loss(logps, reference, *, beta=0.1):
    """IPO: the squared distance of the log-ratio margin from `1 / (2 beta)`
    (on summed log-probabilities, as the paper; TRL averages them per
    token)."""
    return ops.square(_margin(logps, reference) - 1.0 / (2.0 * beta))


def hinge_loss(logps, reference, *, beta=0.1):
    """SLiC's hinge on the log-ratio margin: `max(0, 1 - beta h)`."""
    return ops.relu(1.0 - beta * _margin(logps, reference))


def simpo_loss(logps, lengths, *, beta=2.0, gamma=0.5):
    """SimPO: reference-free, length-normalised, with a target margin.

    Args:
        logps: `(B, 2)` summed log-probabilities of chosen, rejected.
        lengths: `(B, 2)` answer tokens of each.
        beta: the reward scale.
        gamma: the target reward margin.

    Returns:
        `(B,)` losses.
    """
    mean = logps / lengths
    return -_log_sigmoid(beta * (mean[:, 0] - mean[:, 1]) - gamma)


def _log1mexp(x):
    """`log(1 - exp(x))` for `x < 0`, stable at both ends (Maechler 2012);
    each branch gets inputs in its own range, so neither yields NaN
    gradients."""
    x = ops.minimum(x, -1e-12)
    near = ops.maximum(x, -0.6931471805599453)
    far = ops.minimum(x, -0.6931471805599453)
    return ops.where(x > -0.6931471805599453, ops.log(-ops.expm1(near)),
                     ops.log1p(-ops.exp(far)))


def orpo_loss(logps, lengths, *, beta=0.1):
    """ORPO: the chosen answer's NLL plus `beta` times the odds-ratio loss.

    Args:
        logps: `(B, 2)` summed log-probabilities of chosen, rejected.
        lengths: `(B, 2)` answer tokens of each.
        beta: `lambda`, the weight of the odds-ratio term.

    Returns:
        `(B,)` losses: `-logp_c / n_c - beta log s(log_odds)`, the odds of
        the per-token mean log-probability (TRL averages the NLL over all
        chosen tokens of the batch instead of per example).
    """
    mean = logps / lengths
    log_odds = ((mean[:, 0] - mean[:, 1])
                - (_log1mexp(mean[:, 0]) - _log1mexp(mean[:, 1])))
    return -mean[:, 0] - beta * _log_sigmoid(log_odds)


def kto_loss(logps, reference, desirable, kl, *, beta=0.1,
             desirable_weight=1.0, undesirable_weight=1.0):
    """KTO: each answer's reward against the batch's KL reference point.

    Args:
        logps: `(B,)` policy log-probabilities of the answers.
        reference: `(B,)` the reference's.
        desirable: `(B,)` 1.0 for a desirable answer, 0.0 otherwise.
        kl: the reference point `z`, a scalar (the caller clamps it at 0
            and stops its gradient, as the paper).
        beta: the value function's scale.
        desirable_weight: `lambda_D`, the weight of desirable answers.
        undesirable_weight: `lambda_U`, the weight of undesirable ones.

    Returns:
        `(B,)` losses.
    """
    reward = logps - reference
    good = desirable_weight * (1.0 - ops.sigmoid(beta * (reward - kl)))
    bad = undesirable_weight * (1.0 - ops.sigmoid(beta * (kl - reward)))
    return desirable * good + (1.0 - desirable) * bad


def _margin(logps, reference):
    return (logps[:, 0] - logps[:, 1]) - (reference[:, 0] - reference[:, 1])


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    """What a preference loss needs and how it scores rewards.

    Attributes:
        function: the loss function above.
        beta: its default `beta`.
        reference: whether it compares with a reference model.
        unpaired: whether it trains on unpaired (labelled) data.
        options: the keyword arguments it takes besides `beta`.
    """

    function: object
    beta: float
    reference: bool = True
    unpaired: bool = False
    options: tuple = ()


# The registry: `PreferenceCausalLM(loss=NAME)`, the recipe's
# `preference.loss`. Defaults of beta are the papers' (SimPO: 2.0).
LOSSES = {
    "dpo": PreferenceLoss(dpo_loss, 0.1, options=("label_smoothing",)),
    "robust": PreferenceLoss(robust_dpo_loss, 0.1, options=("label_smoothing",)),
    "ipo": PreferenceLoss(ipo_loss, 0.1),
    "hinge": PreferenceLoss(hinge_loss, 0.1),
    "simpo": PreferenceLoss(simpo_loss, 2.0, reference=False, options=("gamma",)),
    "orpo": PreferenceLoss(orpo_loss, 0.1, reference=False),
    "kto": PreferenceLoss(kto_loss, 0.1, unpaired=True,
                          options=("desirable_weight", "undesirable_weight")),
}
