"""Supervised fine-tuning (SFT) of causal LMs.

`SFTCausalLM(lm)` (`model`) trains a keras-hub causal LM on the batches of
`kft.data.sft_dataset` (`kft.data.sft`, `kft.data.chat`: records, chat
templates, truncation, packing), with the loss on the completion only and
packed rows under a block-diagonal causal mask. The data functions are
re-exported here, so `kft.sft.sft_examples` and `kft.sft.render_chat` keep
their names.

Imports: `kft.backbones`, `kft.data`, `kft.losses`.
"""

from kft._lazy import attach

_EXPORTS = {
    "block_causal_mask": "kft.sft.model",
    "chat_template": "kft.data.chat",
    "FORMATS": "kft.data.sft",
    "packed_logits": "kft.sft.model",
    "PACKING_FAMILIES": "kft.backbones.packing",
    "read_records": "kft.data.sft",
    "render_chat": "kft.data.chat",
    "ROLES": "kft.data.chat",
    "sft_dataset": "kft.data.sft",
    "sft_examples": "kft.data.sft",
    "SFTCausalLM": "kft.sft.model",
    "SFTStats": "kft.data.sft",
    "TRUNCATIONS": "kft.data.sft",
}
__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
