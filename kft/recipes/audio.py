"""Audio recipes: `model.audio` and the audio data sources as kft calls.

`kft run`, `kft eval` and `kft compare` reach these through
`kft.recipes.builders`: the model is `kft.build_audio_classifier`, the
data `kft.data.from_audio_folder` (`source: audio_folder`) or
`kft.data.speech.from_espeak_words` (`source: espeak_words`), with clips
at the model's `sample_rate`, cut or padded to its `max_seconds`.
Library errors become `RecipeError`s naming the recipe key.
"""

import os

import numpy as np

from kft.backbones.image_presets import PresetUnavailableError
from kft.data.arrays import DataBundle
from kft.data.audio import from_audio_folder
from kft.data.speech import SpeechSynthesisError
from kft.data.speech import from_espeak_words
from kft.models.audio import build_audio_classifier
from kft.models.head_config import HeadConfig
from kft.models.image import PRESET_WEIGHTS
from kft.recipes.errors import RecipeError

__all__ = ["audio_classifier", "audio_data", "audio_data_from_path",
           "clip_samples", "synthetic_audio"]


def clip_samples(model_config):
    """Samples per clip: `max_seconds` at `sample_rate`."""
    return int(round(model_config.max_seconds * model_config.sample_rate))


def audio_classifier(model_config, num_classes):
    """`kft.build_audio_classifier` as `model:` describes it."""
    weights = PRESET_WEIGHTS if model_config.weights == "preset" else None
    try:
        return build_audio_classifier(
            model_config.audio, num_classes, sample_rate=model_config.sample_rate,
            max_seconds=model_config.max_seconds, pooling=model_config.pooling,
            head=model_config.head, weights=weights, bn=model_config.bn)
    except (PresetUnavailableError, ValueError) as error:
        message = str(error)
        key = ("model.max_seconds" if "max_seconds must" in message else
               "model.head" if "not in head" in message else "model.audio")
        raise RecipeError(f"{key}: {message}") from None


def audio_data(data_config, num_samples, sample_rate):
    """The `DataBundle` of an audio source: `(waves, labels)` batches of
    `num_samples` samples at `sample_rate`."""
    common = dict(sample_rate=sample_rate, max_seconds=num_samples / sample_rate,
                  batch_size=data_config.batch_size, shuffle=data_config.shuffle)
    if data_config.source == "audio_folder":
        try:
            return from_audio_folder(
                data_config.path, validation_split=data_config.validation_split,
                on_bad_file=data_config.on_bad_file, **common)
        except ValueError as error:
            raise RecipeError(f"data.path: {error}") from None
    try:
        return from_espeak_words(
            data_config.words, data_config.voices, data_config.val_voices,
            data_config.speeds, data_config.pitches, root=data_config.path,
            **common)
    except SpeechSynthesisError as error:
        raise RecipeError(f"data.source: {error}") from None
    except (OSError, ValueError) as error:
        raise RecipeError(f"data: {error}") from None


def audio_data_from_path(path, num_samples, sample_rate, batch_size):
    """A folder of class folders of `.wav` files, all of it for evaluation
    (`kft eval RUN_DIR --data FOLDER`)."""
    if not os.path.isdir(path):
        raise RecipeError(f"--data: an audio run takes a folder of class "
                          f"folders of .wav files. Received: {path!r}")
    try:
        bundle = from_audio_folder(
            path, sample_rate=sample_rate, max_seconds=num_samples / sample_rate,
            validation_split=0.0, batch_size=batch_size, shuffle=False)
    except ValueError as error:
        raise RecipeError(f"--data: {error}") from None
    return DataBundle(None, bundle.train, bundle.class_names, bundle.input_shape,
                      skipped_files=bundle.skipped_files)


def synthetic_audio(config, num_samples):
    """Random tones in noise, 2 or 3 classes, for `--smoke` (no files, no
    espeak-ng)."""
    import tensorflow as tf

    classes = 2 if HeadConfig.from_value(config.model.head).kind == "binary" else 3
    rng = np.random.default_rng(config.seed)
    n = 4 * classes
    y = (np.arange(n) % classes).astype("int32")
    t = np.arange(num_samples) / config.model.sample_rate
    x = 0.3 * np.sin(2 * np.pi * (300.0 + 400.0 * y[:, None]) * t)
    x = (x + 0.05 * rng.normal(size=x.shape)).astype("float32")
    batch = config.data.batch_size

    def dataset(xs, ys):
        return tf.data.Dataset.from_tensor_slices((xs, ys)).batch(batch)

    return DataBundle(dataset(x, y), dataset(x[:classes], y[:classes]),
                      [f"class_{i}" for i in range(classes)], (num_samples,))
