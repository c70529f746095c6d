"""Losses for causal LMs, each a Keras loss or a function of log-probabilities.

- `causal_lm`: `CausalLMLoss`, the next-token cross-entropy computed in
  chunks of positions (no float32 copy of the whole logits), and the
  answers' summed log-probabilities;
- `preference`: the DPO family's losses (`LOSSES` by name).

Imports: Keras only.
"""

from kft._lazy import attach

_EXPORTS = {
    "causal_lm_loss_and_metrics": "kft.losses.causal_lm",
    "CausalLMLoss": "kft.losses.causal_lm",
    "chunked_sparse_cross_entropy": "kft.losses.causal_lm",
    "LOSSES": "kft.losses.preference",
    "PreferenceLoss": "kft.losses.preference",
}
__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
