"""From a recipe's sections to kft objects: data, model, evaluation.

Shared by `kft run` (the runner), `kft eval` and `kft export`; each
function turns one section into the library call a Keras script would
make, and library errors into `RecipeError`s that name the key.
"""

import contextlib
import os

import numpy as np

import kft.data as kft_data
from kft.augment import ImageAugmentation
from kft.backbones import families
from kft.backbones.image_presets import PresetUnavailableError
from kft.data.sft import read_records
from kft.lora.model import apply_lora
from kft.models.causal_lm import build_causal_lm
from kft.models.head_config import HeadConfig
from kft.models.heads import head_kind
from kft.models.image import PRESET_WEIGHTS
from kft.models.image import build_classifier
from kft.models.text import build_text_classifier
from kft.prompt.causal_lm import PromptTunedCausalLM
from kft.prompt.causal_lm import generate as prompt_generate
from kft.prompt.causal_lm import prompt_tune_causal_lm
from kft.prompt.layer import prompt_tune_classifier
from kft.recipes.errors import RecipeError
from kft.sft.model import SFTCausalLM
from kft.training import report
from kft.utils.offline import NetworkUnavailableError

__all__ = ["adapt", "augment_training_data", "causal_model", "evaluate",
           "evaluate_sft", "generate_samples", "image_data", "image_input_shape",
           "image_model", "load_arrays", "sft_data", "synthetic_data",
           "text_data", "text_model"]


def image_input_shape(config):
    """The image shape a recipe's image model (`model.backbone` or
    `model.preset`) takes."""
    model = config.model
    if model.input_shape:
        return tuple(model.input_shape)
    if model.preset is not None:
        return (*(model.image_size or (224, 224)), 3)
    packaged = families.get_packaged_weights(model.weights)
    if packaged:
        return tuple(packaged.input_shape)
    size = families.get_backbone(model.backbone).default_input_size
    return (size, size, 3)


def load_arrays(path, key):
    """`kft.data.load_npz`, with errors naming the recipe key."""
    try:
        return kft_data.load_npz(path)
    except ValueError as error:
        raise RecipeError(f"{key}: {error}") from None


def image_data(data_config, input_shape):
    """The `DataBundle` of an image recipe's `data:` section."""
    common = dict(batch_size=data_config.batch_size, shuffle=data_config.shuffle,
                  image_size=tuple(data_config.image_size or input_shape[:2]),
                  channels=input_shape[2])
    source = data_config.source
    if source in ("builtin", "numpy"):
        if source == "builtin":
            with _network_key("data.name"):
                (x, y), (x_val, y_val), names = kft_data.load_builtin(
                    data_config.name)
        else:
            x, y, x_val, y_val, names = load_arrays(data_config.path, "data.path")
        return kft_data.from_numpy(
            x, y, x_val=x_val, y_val=y_val,
            validation_split=data_config.validation_split,
            per_class=data_config.per_class, class_names=names,
            num_classes=len(names) if names else None, **common)
    if source == "image_folder":
        try:
            return kft_data.from_image_folder(
                data_config.path, validation_split=data_config.validation_split,
                on_bad_file=data_config.on_bad_file, **common)
        except ValueError as error:
            raise RecipeError(f"data.path: {error}") from None
    with _network_key("data.download"):
        return kft_data.from_tfds(
            data_config.name, data_dir=data_config.data_dir,
            train_split=data_config.train_split,
            val_split=data_config.val_split,
            download=data_config.download, **common)


@contextlib.contextmanager
def _network_key(key):
    """A download that cannot happen (offline, no network) is a recipe
    error naming `key`: one line, exit code 2."""
    try:
        yield
    except NetworkUnavailableError as error:
        raise RecipeError(f"{key}: {error}") from None


def text_data(data_config):
    """The `DataBundle` of a text recipe's `data:` section."""
    if data_config.source == "text_file":
        if not os.path.isfile(data_config.path):
            raise RecipeError(f"data.path: no such file {data_config.path!r}")
        try:
            texts, labels, names = kft_data.load_text_file(
                data_config.path, data_config.text_column,
                data_config.label_column)
        except ValueError as error:
            raise RecipeError(f"data.path: {error}") from None
        if data_config.per_class:
            labels_array = np.asarray(labels)
            keep = kft_data.subset_per_class(
                np.arange(len(labels)), labels_array, data_config.per_class)[0]
            texts = [texts[i] for i in keep]
            labels = labels_array[keep].tolist()
    else:
        topics = data_config.topics or kft_data.FORTUNES_TOPICS
        try:
            texts, labels, names = kft_data.load_fortunes(
                topics, data_dir=data_config.data_dir,
                per_topic=data_config.per_class)
        except ValueError as error:
            raise RecipeError(f"data.topics: {error}") from None
    return kft_data.from_texts(
        texts, labels, batch_size=data_config.batch_size,
        shuffle=data_config.shuffle,
        validation_split=data_config.validation_split, class_names=names)


def augment_training_data(train, augmentation, seed):
    """Applies a recipe's `augmentation:` to the training batches (image
    augmentation, or waveform augmentation for an audio recipe)."""
    import tensorflow as tf

    from kft.augment import AudioAugmentation
    from kft.recipes.data_config import AudioAugmentationConfig

    if isinstance(augmentation, AudioAugmentationConfig):
        return AudioAugmentation(**augmentation.model_dump(), seed=seed).map(train)
    layer = ImageAugmentation(**augmentation.model_dump(), seed=seed).layer()
    return train.map(lambda x, y: (layer(x, training=True), y),
                     num_parallel_calls=tf.data.AUTOTUNE)


def synthetic_data(config, input_shape):
    """Random images (or texts, with `input_shape=()`) of the recipe's
    shape, 2 or 3 classes, for `--smoke`."""
    head = HeadConfig.from_value(config.model.head)
    classes = 2 if head.kind == "binary" else 3
    rng = np.random.default_rng(config.seed)
    n = 4 * classes
    names = [f"class_{i}" for i in range(classes)]
    if input_shape == ():
        words = ["alpha", "beta", "gamma", "delta", "data", "model", "text"]
        texts = [" ".join(rng.choice(words, 6)) for _ in range(n)]
        return kft_data.from_texts(
            texts, np.arange(n) % classes, batch_size=config.data.batch_size,
            validation_split=0.25, class_names=names)
    x = rng.uniform(0, 255, (n, *input_shape)).astype("float32")
    y = np.arange(n) % classes
    return kft_data.from_numpy(x, y, x_val=x[:classes], y_val=y[:classes],
                               batch_size=config.data.batch_size,
                               class_names=names)


def image_model(config, num_classes, input_shape):
    """The image classifier of a recipe's `model:` (a `keras.applications`
    backbone or a keras-hub preset), adapted as `lora:` says."""
    model_config = config.model
    if model_config.preset is not None:
        return adapt(config, _preset_classifier(model_config, num_classes,
                                                input_shape))
    with _network_key("model.weights"):
        model = build_classifier(
            model_config.backbone, num_classes,
            weights=model_config.weights, input_shape=input_shape,
            head=model_config.head, bn=model_config.bn,
            **model_config.backbone_kwargs)
    return adapt(config, model)


def text_model(config, num_classes, load_weights=True):
    """The keras-hub text classifier of `model.text`, adapted as `lora:` /
    `prompt_tuning:` say (`load_weights=False`: random weights)."""
    model_config = config.model
    try:
        model = build_text_classifier(
            model_config.text, num_classes,
            sequence_length=model_config.sequence_length,
            weights="preset" if load_weights else None)
    except (RuntimeError, ValueError) as error:
        raise RecipeError(f"model.text: {error}") from None
    return adapt(config, model)


def _preset_classifier(model_config, num_classes, input_shape):
    weights = PRESET_WEIGHTS if model_config.weights == "preset" else None
    extra = ({"image_size": model_config.image_size}
             if model_config.image_size else {})
    try:
        return build_classifier(
            model_config.preset, num_classes, weights=weights,
            input_shape=input_shape, head=model_config.head, bn=model_config.bn,
            **extra)
    except (PresetUnavailableError, ValueError) as error:
        raise RecipeError(f"model.preset: {error}") from None


def causal_model(config):
    """The recipe's causal LM (LoRA applied) inside `kft.sft.SFTCausalLM`,
    the Keras model that trains on SFT batches and shares its weights; with
    `prompt_tuning:`, a `PromptTunedCausalLM` (the base frozen)."""
    model_config = config.model
    try:
        lm = build_causal_lm(model_config.causal_lm,
                             sequence_length=model_config.sequence_length,
                             quantize=model_config.quantize,
                             remat=model_config.remat)
    except (RuntimeError, ValueError, FileNotFoundError) as error:
        raise RecipeError(f"model.causal_lm: {error}") from None
    if config.lora is not None:
        lora = config.lora
        if "trainable" not in lora.model_fields_set:
            # A causal LM has no head: nothing but the adapters trains.
            lora = lora.model_copy(update={"trainable": []})
        try:
            apply_lora(lm, lora)
        except ValueError as error:
            raise RecipeError(_lora_error(error)) from None
    if config.prompt_tuning is not None:
        prompt = config.prompt_tuning
        try:  # the base frozen; only the virtual tokens train
            return prompt_tune_causal_lm(lm, prompt.num_virtual_tokens,
                                         prompt.init_text, seed=config.seed)
        except ValueError as error:
            raise RecipeError(f"prompt_tuning: {error}") from None
    return SFTCausalLM(lm)


def sft_data(config, lm):
    """The `DataBundle` of an SFT recipe: held-out split, batches from
    `kft.data.sft_dataset` (the model's tokenizer is needed, so it comes
    after the model)."""
    data_config = config.data
    try:
        if data_config.source == "wordnet_glosses":
            records = kft_data.load_wordnet_glosses(
                data_config.path, max_examples=data_config.max_examples,
                seed=config.seed)
        else:
            records = read_records(data_config.path)
            if data_config.max_examples:
                records = records[:data_config.max_examples]
    except (OSError, ValueError) as error:
        raise RecipeError(f"data.path: {error}") from None
    held = int(round(len(records) * data_config.validation_split))
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(records))
    val = [records[i] for i in order[:held]]
    train = [records[i] for i in order[held:]]
    options = dict(format=data_config.format, batch_size=data_config.batch_size,
                   packing=data_config.packing, truncation=data_config.truncation,
                   seed=config.seed)
    try:
        train_ds = kft_data.sft_dataset(train, lm, shuffle=data_config.shuffle,
                                        **options)
        val_ds = (kft_data.sft_dataset(val, lm, shuffle=False, **options)
                  if val else None)
    except ValueError as error:
        raise RecipeError(f"data: {error}") from None
    return kft_data.DataBundle(train_ds, val_ds, [], ())


def evaluate_sft(model, data):
    """Held-out completion NLL (mean over weighted tokens), perplexity and
    token accuracy of an `SFTCausalLM`."""
    import math

    result = model.evaluate(data, verbose=0, return_dict=True)
    loss = float(result["loss"])
    return {"loss": round(loss, 5), "perplexity": round(math.exp(min(loss, 50)), 4),
            "accuracy": round(float(result.get("accuracy", float("nan"))), 5)}


def generate_samples(lm, generate):
    """Greedy completions of the recipe's `generate:` prompts (`[]` if none).

    `lm` is a keras-hub `CausalLM`, or a `PromptTunedCausalLM`, whose
    virtual tokens go before every prompt (`kft.prompt_causal.generate`).
    """
    if generate is None:
        return []
    if isinstance(lm, PromptTunedCausalLM):
        def complete(prompt):
            return prompt_generate(lm, prompt, max_length=generate.max_length)
    else:
        lm.compile(sampler="greedy")

        def complete(prompt):
            return lm.generate(prompt, max_length=generate.max_length)
    return [{"prompt": prompt, "completion": complete(prompt)[len(prompt):]}
            for prompt in generate.prompts]


def _lora_error(error):
    """`apply_lora`'s error under the recipe key it is about."""
    key = "lora.targets" if "target" in str(error).lower() else "lora"
    return f"{key}: {error}"


def adapt(config, model):
    """Prompt tuning or LoRA, as the recipe's sections say."""
    if config.prompt_tuning is not None:
        prompt = config.prompt_tuning
        try:
            model = prompt_tune_classifier(model, prompt.num_virtual_tokens,
                                           prompt.init_text)
        except ValueError as error:
            raise RecipeError(f"prompt_tuning: {error}") from None
    if config.lora is not None:
        try:
            apply_lora(model, config.lora)
        except ValueError as error:
            raise RecipeError(_lora_error(error)) from None
    return model


def evaluate(model, data, class_names, output_dir, prefix=""):
    """Metrics, and for classifiers the confusion matrix (with its plot)
    and a per-class report, on `data`."""
    evaluation = model.evaluate(data, return_dict=True, verbose=0)
    evaluation = {k: float(v) for k, v in evaluation.items()}
    kind = head_kind(model)
    if kind in ("multiclass", "binary"):
        classes = class_names if kind == "multiclass" else class_names[:2]
        matrix = report.confusion_matrix(model, data, len(classes))
        report.plot_confusion_matrix(
            matrix, classes,
            os.path.join(output_dir, "plots", f"{prefix}confusion_matrix.png"),
        )
        evaluation["confusion_matrix"] = matrix.tolist()
        evaluation["per_class"] = report.classification_report(matrix, classes)
    return evaluation
