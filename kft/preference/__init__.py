"""Preference tuning of causal LMs: DPO and its family (cDPO, robust DPO,
IPO, hinge, SimPO, ORPO, KTO) with `PreferenceCausalLM` (`model`), on the
batches of `kft.data.preference_dataset`, with the losses of
`kft.losses.preference`.

Imports: `kft.backbones`, `kft.data`, `kft.lora`, `kft.losses`.
"""

from kft._lazy import attach

_EXPORTS = {
    "copy_causal_lm": "kft.preference.model",
    "PreferenceCausalLM": "kft.preference.model",
    "REFERENCES": "kft.preference.model",
}
__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
