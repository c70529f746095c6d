"""Classification runs: image (`model.backbone` / `model.preset`), text
(`model.text`) and audio (`model.audio`) classifiers."""

import os

from kft import data as kft_data
from kft.models.heads import head_kind
from kft.models.heads import loss_and_metrics
from kft.models.heads import outputs_logits
from kft.recipes import audio as recipe_audio
from kft.recipes import builders
from kft.recipes.errors import RecipeError
from kft.recipes.methods import audio_method
from kft.recipes.methods import method_stages
from kft.recipes.tasks.base import Task

__all__ = ["AudioClassification", "ClassifierTask", "ImageClassification",
           "TextClassification"]


def _random_weights(config):
    """The recipe with `model.weights: null` (a smoke run or a resume,
    which loads its own checkpoint)."""
    model = config.model.model_copy(update={"weights": None})
    return config.model_copy(update={"model": model})


class ClassifierTask(Task):
    """A classifier: the confusion matrix and per-class report in its
    evaluation."""

    def evaluate(self, model, data, class_names, output_dir, prefix=""):
        return builders.evaluate(model, data, class_names, output_dir, prefix)


class ImageClassification(ClassifierTask):
    """A `keras.applications` backbone (`model.backbone`) or a keras-hub
    image preset (`model.preset`) with kft's head."""

    name = "image_classification"

    def matches(self, config):
        return config.model.backbone is not None or config.model.preset is not None

    def input_shape(self, config):
        return builders.image_input_shape(config)

    def build_data(self, config, input_shape, smoke):
        if smoke:
            return builders.synthetic_data(config, input_shape)
        return builders.image_data(config.data, input_shape)

    def build_model(self, config, bundle, input_shape, load_weights):
        if not load_weights:
            config = _random_weights(config)
        return builders.image_model(config, bundle.num_classes, input_shape)

    def data_from_path(self, path, config, input_shape):
        batch_size = config.data.batch_size
        if os.path.isdir(path):
            return kft_data.from_image_folder(
                path, image_size=input_shape[:2], channels=input_shape[2],
                batch_size=batch_size, validation_split=0.0)
        if not os.path.isfile(path):
            raise RecipeError(f"--data: no such file or folder {path!r}")
        x, y, x_val, y_val, names = builders.load_arrays(path, "--data")
        if x_val is not None:
            x, y = x_val, y_val
        bundle = kft_data.from_numpy(
            x, y, batch_size=batch_size, shuffle=False,
            image_size=input_shape[:2], channels=input_shape[2],
            class_names=names, num_classes=len(names) if names else None)
        return kft_data.DataBundle(None, bundle.train, bundle.class_names,
                                   bundle.input_shape)


class TextClassification(ClassifierTask):
    """A keras-hub text classifier (`model.text`), raw strings in."""

    name = "text_classification"

    def matches(self, config):
        return config.model.text is not None

    def smoke_config(self, config):
        return config  # a checkpoint of its own; random weights on resume

    def build_data(self, config, input_shape, smoke):
        if smoke:
            return builders.synthetic_data(config, ())
        return builders.text_data(config.data)

    def build_model(self, config, bundle, input_shape, load_weights):
        return builders.text_model(config, bundle.num_classes, load_weights)

    def eval_input_shape(self, config, model):
        return ()

    def evaluate_run(self, run_dir, config, model, data_path=None):
        # keras-hub models come back compiled with their own defaults.
        loss, metrics = loss_and_metrics(head_kind(model),
                                         from_logits=outputs_logits(model))
        model.compile(loss=loss, metrics=metrics)
        return super().evaluate_run(run_dir, config, model, data_path)

    def data_from_path(self, path, config, input_shape):
        if not os.path.isfile(path):
            raise RecipeError(f"--data: no such file {path!r}")
        try:
            texts, labels, names = kft_data.load_text_file(
                path, config.data.text_column, config.data.label_column)
        except ValueError as error:
            raise RecipeError(f"--data: {error}") from None
        bundle = kft_data.from_texts(
            texts, labels, batch_size=config.data.batch_size,
            validation_split=0.0, shuffle=False, class_names=names)
        return kft_data.DataBundle(None, bundle.train, bundle.class_names, ())

    def method_changes(self, method, epochs, base):
        return method_stages(method, epochs, True)


class AudioClassification(ClassifierTask):
    """A Whisper or Moonshine encoder (`model.audio`) with kft's head, raw
    waveforms in."""

    name = "audio_classification"

    def matches(self, config):
        return config.model.audio is not None

    def input_shape(self, config):
        return (recipe_audio.clip_samples(config.model),)

    def build_data(self, config, input_shape, smoke):
        if smoke:
            return recipe_audio.synthetic_audio(config, input_shape[0])
        return recipe_audio.audio_data(config.data, input_shape[0],
                                       config.model.sample_rate)

    def build_model(self, config, bundle, input_shape, load_weights):
        if not load_weights:
            config = _random_weights(config)
        model = recipe_audio.audio_classifier(config.model, bundle.num_classes)
        return builders.adapt(config, model)

    def eval_input_shape(self, config, model):
        return self.input_shape(config)  # the model takes any length

    def data_from_path(self, path, config, input_shape):
        return recipe_audio.audio_data_from_path(
            path, input_shape[0], config.model.sample_rate,
            config.data.batch_size)

    def method_changes(self, method, epochs, base):
        return audio_method(method, epochs)
