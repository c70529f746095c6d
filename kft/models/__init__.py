"""Model builders: a pretrained backbone, its preprocessing inside, a head.

- `image`: `build_classifier` (keras.applications, keras-hub, timm);
- `text`: `build_text_classifier` (keras-hub BERT-class presets);
- `audio`: `build_audio_classifier` (raw waveforms in: Whisper, Moonshine);
- `causal_lm`: `build_causal_lm` (keras-hub causal LMs, int8 / int4);
- `heads`, `head_config`: the classification heads and `HeadConfig`.

Add a kind of model here. Imports: `kft.backbones`, `kft.data`,
`kft.prompt`, `kft.utils`.
"""

from kft._lazy import attach

_EXPORTS = {
    "BN_MODES": "kft.models.image",
    "build_audio_classifier": "kft.models.audio",
    "build_causal_lm": "kft.models.causal_lm",
    "build_classifier": "kft.models.image",
    "build_text_classifier": "kft.models.text",
    "Classifier": "kft.models.image",
    "HeadConfig": "kft.models.head_config",
    "PRESET_WEIGHTS": "kft.models.image",
    "resolve_text_preset": "kft.models.text",
    "TEXT_PRESETS": "kft.models.text",
}
__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
