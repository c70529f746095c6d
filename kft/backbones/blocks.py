"""Backbones: build a registered family's network, split it into blocks.

The family table (constructor, preprocessing, input sizes, block
splitter) lives in `kft.families`; this module builds the Keras models.
"""

import os

import keras

from kft._keras_internals import before_keras_download
from kft.backbones.anatomy import backbone_blocks_of
from kft.backbones.anatomy import split_backbone
from kft.backbones.families import BackboneFamily
from kft.backbones.families import BlockSplitter
from kft.backbones.families import PackagedWeights
from kft.backbones.families import get_backbone
from kft.backbones.families import get_packaged_weights
from kft.backbones.families import list_backbones
from kft.backbones.families import list_packaged_weights
from kft.backbones.families import register_backbone
from kft.utils import offline

__all__ = [
    "BackboneFamily",
    "BlockSplitter",
    "PackagedWeights",
    "WeightsUnavailableError",
    "backbone_blocks",
    "build_backbone",
    "get_backbone",
    "get_packaged_weights",
    "list_backbones",
    "list_packaged_weights",
    "named_backbone_blocks",
    "register_backbone",
]


class WeightsUnavailableError(offline.NetworkUnavailableError):
    """Pretrained weights could not be downloaded or found."""


def _resolve_weights(family, weights, input_shape, backbone_kwargs):
    """Returns (keras_weights, local_file) for a `weights` argument."""
    if weights is None or weights == "imagenet":
        if weights == "imagenet" and input_shape[-1] != 3:
            raise ValueError(
                "weights='imagenet' needs 3 input channels (RGB). Received: "
                f"input_shape={tuple(input_shape)}. Convert grayscale "
                "images to RGB, or use weights=None."
            )
        return weights, None
    if not isinstance(weights, str):
        raise ValueError(
            "weights must be 'imagenet', None, the name of packaged weights "
            f"({', '.join(list_packaged_weights())}) or a path to a weights "
            f"file. Received: weights={weights!r}"
        )
    packaged = get_packaged_weights(weights)
    if packaged is not None:
        if packaged.family != family.name:
            raise ValueError(
                f"Packaged weights {weights!r} are for backbone "
                f"{packaged.family!r}, not {family.name!r}."
            )
        for key, value in packaged.backbone_kwargs.items():
            if backbone_kwargs.get(key, value) != value:
                raise ValueError(
                    f"Packaged weights {weights!r} need {key}={value!r}. "
                    f"Received: {key}={backbone_kwargs[key]!r}"
                )
        backbone_kwargs.update(packaged.backbone_kwargs)
        return None, packaged.path
    if not os.path.exists(weights):
        raise ValueError(
            f"weights={weights!r} is neither 'imagenet', None, the name of "
            f"packaged weights ({', '.join(list_packaged_weights())}) nor an "
            "existing file."
        )
    return None, weights


def build_backbone(family_name, weights=None, input_shape=None, **kwargs):
    """Builds a family's backbone without its top, named `"backbone"`.

    Args:
        family_name: a name from `list_backbones()`.
        weights: `"imagenet"`, `None`, the name of packaged weights
            (see `list_packaged_weights()`), or a path to a weights file
            (`.weights.h5` or `.h5`) saved from the same architecture.
        input_shape: `(height, width, channels)`; defaults to the family's
            default size with 3 channels.
        **kwargs: passed to the constructor (e.g. `alpha=0.35`).

    Returns:
        A `keras.Model` that takes preprocessed images.
    """
    family = get_backbone(family_name)
    if input_shape is None:
        size = family.default_input_size
        input_shape = (size, size, 3)
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            "input_shape must be (height, width, channels). Received: "
            f"input_shape={input_shape}"
        )
    if min(input_shape[:2]) < family.min_input_size:
        raise ValueError(
            f"Backbone {family.name!r} needs inputs of at least "
            f"{family.min_input_size}x{family.min_input_size}. Received: "
            f"input_shape={input_shape}"
        )
    keras_weights, local_file = _resolve_weights(
        family, weights, input_shape, kwargs
    )

    def check(url):  # only when the weights are not in Keras' cache
        offline.require_network(
            f"the ImageNet weights of backbone {family.name!r}",
            "weights=None (random), or a weights file saved where there is a "
            f"network (build_classifier({family.name!r}, ..., "
            "weights='/path/to/weights.h5'))", url=url,
            error=WeightsUnavailableError)

    try:
        constructor = family.constructor
        if isinstance(constructor, str):
            constructor = getattr(keras.applications, constructor)
        with before_keras_download(check):
            backbone = constructor(
                include_top=False,
                weights=keras_weights,
                input_shape=input_shape,
                **kwargs,
            )
        # Renamed after construction: EfficientNetV2 looks its block
        # arguments up by the name it is given.
        backbone.name = "backbone"
    except TypeError as error:
        raise ValueError(
            f"Backbone {family.name!r} does not accept these arguments: "
            f"{kwargs}. ({error})"
        ) from None
    except Exception as error:
        if keras_weights != "imagenet" or isinstance(
                error, WeightsUnavailableError):
            raise
        raise WeightsUnavailableError(
            f"Could not get the ImageNet weights of backbone "
            f"{family.name!r} (no network here?). Download them once where "
            "there is a network (Keras caches them in ~/.keras/models), or "
            "pass a local file: build_classifier("
            f"{family.name!r}, ..., weights='/path/to/weights.h5'). "
            f"Cause: {str(error).splitlines()[0] if str(error) else error}"
        ) from None
    if local_file is not None:
        try:
            backbone.load_weights(local_file)
        except Exception as error:
            raise ValueError(
                f"Could not load weights file {local_file!r} into backbone "
                f"{family.name!r} with {kwargs or 'default arguments'}: it "
                "must come from the same architecture without its top. "
                f"Cause: {str(error).splitlines()[0]}"
            ) from None
    return backbone


def named_backbone_blocks(backbone):
    """Returns the backbone's layers as ordered `(block_name, layers)` pairs.

    The family is recognised from the layer names (MobileNetV2
    `block_N`, ResNet and DenseNet `convN_blockM`, EfficientNet
    `blockNx`, VGG and Xception `blockN`, Inception `mixedN`, ...); a
    kft model's own record names it. Blocks run from input to output;
    the stem comes first and the layers after the last block (final conv
    / norm) form a `"top"` block.
    """
    from_model = isinstance(backbone, keras.Model) and any(
        layer.name == "backbone" for layer in backbone.layers)
    if from_model:
        return backbone_blocks_of(backbone)
    return split_backbone(backbone)


def backbone_blocks(backbone):
    """Returns the backbone's layers as ordered blocks, input to output.

    Args:
        backbone: a backbone model, or a kft model that holds one as its
            layer `"backbone"`.

    Returns:
        A list of blocks, each a list of `keras.layers.Layer`.

    Example:

    >>> model = build_classifier("vgg16", 2, input_shape=(32, 32, 3))
    >>> len(backbone_blocks(model))
    5
    """
    return [layers for _, layers in named_backbone_blocks(backbone)]


# === Registry ===

_A = keras.applications
