"""Prompt tuning: trainable virtual tokens in front of a frozen keras-hub
backbone (Lester et al. 2021).

- `layer`: `PromptTuning`, `prompt_tune` (encoders such as BERT) and
  `prompt_tune_classifier`;
- `causal_lm`: `prompt_tune_causal_lm`, `PromptTunedCausalLM`, prompt files.

Imports: `kft.backbones`, `kft.sft`, `kft.utils`.
"""

from kft._lazy import attach

_EXPORTS = {
    "load_prompt": "kft.prompt.causal_lm",
    "prompt_tune": "kft.prompt.layer",
    "prompt_tune_causal_lm": "kft.prompt.causal_lm",
    "prompt_tune_classifier": "kft.prompt.layer",
    "PromptTunedCausalLM": "kft.prompt.causal_lm",
    "PromptTuning": "kft.prompt.layer",
    "save_prompt": "kft.prompt.causal_lm",
}
__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
