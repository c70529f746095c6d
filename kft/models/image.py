"""`build_classifier`: raw pixels -> preprocessing -> backbone -> head."""

import keras

from kft.backbones import blocks as backbones
from kft.backbones.anatomy import Anatomy
from kft.backbones.anatomy import RecordsAnatomy
from kft.backbones.freezing import freeze
from kft.backbones.image_presets import IMAGE_PRESETS
from kft.backbones.image_presets import is_keras_hub_image_source
from kft.backbones.image_presets import load_image_backbone
from kft.backbones.preprocessing import ImagePreprocessing
from kft.models.head_config import HeadConfig
from kft.models.heads import build_head

__all__ = ["BN_MODES", "Classifier", "PRESET_WEIGHTS", "build_classifier"]

BN_MODES = ("frozen", "train")


class _PresetWeights:
    """`weights` left out: a keras-hub preset brings its own weights; a
    `keras.applications` family starts from random weights (None)."""

    def __repr__(self):
        return "'preset'"


PRESET_WEIGHTS = _PresetWeights()


@keras.saving.register_keras_serializable(package="kft")
class Classifier(RecordsAnatomy, keras.Model):
    """A functional model that records its `kft.anatomy.Anatomy`.

    Built like any functional model (`Classifier(inputs, outputs,
    anatomy=...)`); the record is part of its config, so it survives
    `model.save` and `keras.saving.load_model(..., safe_mode=True)`.
    """

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        anatomy = config.pop("anatomy", None)
        model = super().from_config(config, custom_objects=custom_objects)
        model.anatomy = Anatomy.from_config(anatomy) if anatomy else None
        return model


def build_classifier(
    backbone,
    num_classes,
    *,
    weights=PRESET_WEIGHTS,
    input_shape=None,
    head=None,
    bn="frozen",
    name=None,
    **backbone_kwargs,
):
    """Builds a fine-tunable classifier around a pretrained backbone.

    The model takes raw pixels in [0, 255] (the backbone family's
    preprocessing is a layer inside it), runs the backbone as a nested
    model named `"backbone"`, and ends in a head whose layers are named
    `head_*`. The backbone starts frozen; train the head first, then
    unfreeze (`kft.unfreeze`, `kft.fine_tune` stages).

    Args:
        backbone: a family name from `kft.list_backbones()`
            (`keras.applications`), or a keras-hub image backbone: a
            keras-hub preset name (`"resnet_50_imagenet"`), an `hf://`
            address (`"hf://timm/resnet18.a1_in1k"`), a local directory in
            keras-hub, Hugging Face or timm format, a short name of
            `kft.backbones.image_presets.IMAGE_PRESETS`, or a
            `keras_hub.models.Backbone` (then pass `image_converter=` too).
            A keras-hub backbone's image converter (resize, rescale,
            mean/std) is the model's preprocessing layer.
        num_classes: number of classes (1 for a binary head, the number
            of targets for regression).
        weights: for a family: `"imagenet"`, `None` (random, the default),
            the name of weights that ship with kft
            (`kft.backbones.list_packaged_weights()`), or a path to a
            weights file of the same backbone without top. For a keras-hub
            preset: left out, the preset's weights; `None`, the same
            architecture with random weights.
        input_shape: `(height, width, channels)`; defaults to the family's
            size (or the packaged weights' size) with 3 channels.
        head: a `kft.heads.HeadConfig` or a dict such as
            `{"hidden": [128], "dropout": 0.5, "kind": "multiclass"}`.
        bn: `"frozen"` (default) calls the backbone with `training=False`,
            so BatchNorm statistics never move, even after unfreezing (the
            Keras transfer-learning advice); `"train"` lets BatchNorm layers
            that are trainable update their statistics, as fastai does.
        name: model name; defaults to `"<backbone>_classifier"`.
        **backbone_kwargs: passed to the family constructor, e.g.
            `alpha=0.35` for MobileNet. For keras-hub backbones:
            `image_converter=` (a `keras_hub.layers.ImageConverter`) to
            replace the preset's, `image_size=(h, w)` to run the backbone
            at another size than the preset's (the converter resizes).

    Returns:
        A functional `keras.Model` (a `kft.models.Classifier`, which
        records what it is: `kft.describe(model)`) with its backbone frozen.

    Example:

    >>> model = build_classifier("mobilenet_v2", 3, input_shape=(32, 32, 3),
    ...                          alpha=0.35)
    >>> model.get_layer("backbone").trainable
    False
    """
    _check_arguments(num_classes, bn)
    if not isinstance(backbone, str) or backbone not in backbones.list_backbones():
        if is_keras_hub_image_source(backbone):
            return _build_keras_hub_classifier(
                backbone, num_classes, weights=weights, input_shape=input_shape,
                head=head, bn=bn, name=name, **backbone_kwargs)
        raise ValueError(
            f"Unknown backbone {backbone!r}. Known backbones: "
            f"{', '.join(backbones.list_backbones())}; or a keras-hub image "
            "preset name, an hf:// address, a local directory, a short name "
            f"of {sorted(IMAGE_PRESETS)}, or a keras_hub.models.Backbone.")
    if weights is PRESET_WEIGHTS:
        weights = None
    family = backbones.get_backbone(backbone)
    packaged = backbones.get_packaged_weights(weights)
    if input_shape is None and packaged is not None:
        input_shape = packaged.input_shape

    # === Layers ===
    base = backbones.build_backbone(
        family.name, weights=weights, input_shape=input_shape, **backbone_kwargs
    )
    freeze(base)
    preprocessing = ImagePreprocessing(family.preprocessing, name="preprocessing")

    # === Functional Model ===
    inputs = keras.Input(shape=base.input_shape[1:], name="image")
    x = preprocessing(inputs)
    if bn == "frozen":
        x = base(x, training=False)
    else:
        x = base(x)
    head = HeadConfig.from_value(head)
    outputs = build_head(x, num_classes, head)

    # === Config ===
    anatomy = Anatomy(task="image_classifier", backbone=base.name,
                      family=family.name, head_kind=head.kind,
                      batch_norm=bn)
    return Classifier(inputs, outputs, anatomy=anatomy,
                      name=name or f"{family.name}_classifier")


def _check_arguments(num_classes, bn):
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise ValueError(
            f"num_classes must be an integer >= 1. Received: "
            f"num_classes={num_classes!r}"
        )
    if num_classes < 1:
        raise ValueError(
            f"num_classes must be >= 1. Received: num_classes={num_classes}"
        )
    if bn not in BN_MODES:
        raise ValueError(
            f"bn must be one of {BN_MODES}. Received: bn={bn!r}"
        )


def _build_keras_hub_classifier(source, num_classes, *, weights, input_shape,
                                head, bn, name, image_converter=None,
                                image_size=None):
    """`build_classifier` on a keras-hub image backbone (see there)."""
    if weights not in (PRESET_WEIGHTS, None):
        raise ValueError(
            "A keras-hub backbone brings its preset's weights: leave weights "
            f"out, or pass weights=None for random ones. Received: weights={weights!r}")
    if isinstance(source, str):
        base, converter = load_image_backbone(source,
                                              load_weights=weights is not None)
    else:
        base, converter = source, None
    converter = image_converter or converter
    if converter is None:
        raise ValueError(
            f"Backbone {type(base).__name__} comes without an image converter: "
            "pass image_converter=keras_hub.layers.ImageConverter(image_size="
            "..., scale=..., offset=...) so the model takes raw pixels.")
    if image_size is not None:
        converter.image_size = tuple(int(v) for v in image_size)
    freeze(base)
    base.name = "backbone"
    size = tuple(converter.image_size or (224, 224))
    input_shape = tuple(input_shape) if input_shape else (*size, 3)

    # === Functional Model ===
    inputs = keras.Input(shape=input_shape, name="image")
    x = converter(inputs)
    x = base(x, training=False) if bn == "frozen" else base(x)
    head = HeadConfig.from_value(head)
    outputs = build_head(x, num_classes, head)

    # === Config ===
    family = type(base).__name__
    anatomy = Anatomy(task="image_classifier", backbone=base.name,
                      family=family, head_kind=head.kind, batch_norm=bn)
    return Classifier(inputs, outputs, anatomy=anatomy,
                      name=name or f"{family.removesuffix('Backbone').lower()}"
                                   "_classifier")
