"""Backbone registry: one table entry per `keras.applications` family.

Each entry holds what kft needs to know about a family, in one place (as
fastai's `model_meta` does): how to construct it without its top, the
preprocessing it expects, its default and minimum input size, and how to
split its layers into ordered blocks for freezing and per-block learning
rates.
"""

import dataclasses
import os
import re
from collections.abc import Callable

import keras

from kft.preprocessing import PREPROCESSING_MODES

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


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded or found."""


@dataclasses.dataclass(frozen=True)
class BlockSplitter:
    """Splits a backbone's layers into ordered, named blocks.

    Layers are visited in the order the backbone lists them (input to
    output). A layer whose name matches one of `patterns` belongs to the
    block named by the pattern's first group; a layer matching `top`
    belongs to the block `"top"`; a layer whose name fully matches
    `boundary` closes the block it is in (used by Inception, whose layers
    have automatic names and whose blocks end in `mixedN` layers). Any
    other layer joins the block of the layer before it, or `"stem"` when
    no block has started yet.

    Args:
        patterns: regexes searched at the start of layer names.
        top: regex for layers after the last block (final conv, norm).
        boundary: regex that ends a block at the matching layer.
    """

    patterns: tuple = ()
    top: str | None = None
    boundary: str | None = None

    def _key(self, name):
        for pattern in self.patterns:
            match = re.match(pattern, name)
            if match:
                return match.group(1)
        if self.top and re.match(self.top, name):
            return "top"
        return None

    def split(self, model):
        blocks = {}
        current = "stem"
        boundary_count = 0
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if self.boundary:
                blocks.setdefault(f"block_{boundary_count}", []).append(layer)
                if re.fullmatch(self.boundary, layer.name):
                    blocks[layer.name] = blocks.pop(f"block_{boundary_count}")
                    boundary_count += 1
                continue
            key = self._key(layer.name)
            if key is not None:
                current = key
            blocks.setdefault(current, []).append(layer)
        if self.boundary and f"block_{boundary_count}" in blocks:
            blocks["top"] = blocks.pop(f"block_{boundary_count}")
        return list(blocks.items())

    def score(self, model):
        """Share of the model's layer names this splitter recognises."""
        names = [
            layer.name
            for layer in model.layers
            if not isinstance(layer, keras.layers.InputLayer)
        ]
        if not names:
            return 0.0
        if self.boundary:
            hits = sum(bool(re.fullmatch(self.boundary, n)) for n in names)
            return 0.5 if hits >= 2 else 0.0
        return sum(self._key(n) not in (None, "top") for n in names) / len(
            names
        )


@dataclasses.dataclass(frozen=True)
class BackboneFamily:
    """What kft knows about one backbone family.

    Args:
        name: registry name, e.g. `"mobilenet_v2"`.
        constructor: a `keras.applications` style function taking
            `include_top`, `weights`, `input_shape`, `name` and keyword
            arguments, returning a `keras.Model`.
        preprocessing: an `ImagePreprocessing` mode.
        default_input_size: the size the family was trained at.
        min_input_size: the smallest height/width it accepts.
        splitter: a `BlockSplitter`.
    """

    name: str
    constructor: Callable
    preprocessing: str
    default_input_size: int
    min_input_size: int
    splitter: BlockSplitter


@dataclasses.dataclass(frozen=True)
class PackagedWeights:
    """Pretrained backbone weights that ship inside kft (offline use)."""

    name: str
    family: str
    filename: str
    backbone_kwargs: dict
    input_shape: tuple
    description: str

    @property
    def path(self):
        return os.path.join(os.path.dirname(__file__), "assets", self.filename)


_REGISTRY = {}

_PACKAGED_WEIGHTS = {
    "fashion_mnist": PackagedWeights(
        name="fashion_mnist",
        family="mobilenet_v2",
        filename="mobilenet_v2_035_fashion_mnist.weights.h5",
        backbone_kwargs={"alpha": 0.35},
        input_shape=(32, 32, 3),
        description=(
            "MobileNetV2 alpha=0.35 trained by kft on 6 Fashion-MNIST "
            "classes at 32x32 (scripts/pretrain_quickstart_backbone.py)"
        ),
    ),
}


def register_backbone(
    name,
    constructor,
    preprocessing,
    default_input_size=224,
    min_input_size=32,
    splitter=None,
):
    """Adds a backbone family to the registry.

    Args:
        name: the family name used by `build_classifier` and recipes.
        constructor: function with the `keras.applications` signature.
        preprocessing: one of `"tf"`, `"torch"`, `"caffe"`, `"none"`.
        default_input_size: the input size used when none is given.
        min_input_size: the smallest accepted height and width.
        splitter: a `BlockSplitter`; blocks are then `stem` + `top` only
            when omitted.

    Returns:
        The registered `BackboneFamily`.

    Raises:
        ValueError: if the name is taken or the preprocessing is unknown.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(
            "Backbone names are lowercase letters, digits and underscores. "
            f"Received: name={name!r}"
        )
    if name in _REGISTRY:
        raise ValueError(
            f"A backbone named {name!r} is already registered. Pick another "
            "name."
        )
    if preprocessing not in PREPROCESSING_MODES:
        raise ValueError(
            f"Unknown preprocessing for backbone {name!r}. Expected one of "
            f"{PREPROCESSING_MODES}. Received: preprocessing={preprocessing!r}"
        )
    family = BackboneFamily(
        name=name,
        constructor=constructor,
        preprocessing=preprocessing,
        default_input_size=int(default_input_size),
        min_input_size=int(min_input_size),
        splitter=splitter or BlockSplitter(),
    )
    _REGISTRY[name] = family
    return family


def list_backbones():
    """Returns the registered backbone family names, sorted."""
    return sorted(_REGISTRY)


def list_packaged_weights():
    """Returns the names of the weights that ship inside kft."""
    return sorted(_PACKAGED_WEIGHTS)


def get_packaged_weights(name):
    """Returns the `PackagedWeights` called `name`, or None."""
    return _PACKAGED_WEIGHTS.get(name) if isinstance(name, str) else None


def get_backbone(name):
    """Returns the `BackboneFamily` registered under `name`."""
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown backbone {name!r}. Known backbones: "
            f"{', '.join(list_backbones())}."
        )
    return _REGISTRY[name]


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
    if weights in _PACKAGED_WEIGHTS:
        packaged = _PACKAGED_WEIGHTS[weights]
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
    try:
        backbone = family.constructor(
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
        if keras_weights != "imagenet":
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


def _splitter_for(backbone):
    splitters = {id(f.splitter): f.splitter for f in _REGISTRY.values()}
    best = max(splitters.values(), key=lambda s: s.score(backbone))
    if best.score(backbone) == 0.0:
        return BlockSplitter()
    return best


def named_backbone_blocks(backbone):
    """Returns the backbone's layers as ordered `(block_name, layers)` pairs.

    The family is recognised from the layer names (MobileNetV2
    `block_N`, ResNet and DenseNet `convN_blockM`, EfficientNet
    `blockNx`, VGG and Xception `blockN`, Inception `mixedN`, ...).
    Blocks run from input to output; the stem comes first and the layers
    after the last block (final conv / norm) form a `"top"` block.
    """
    if isinstance(backbone, keras.Model):
        try:
            backbone = backbone.get_layer("backbone")
        except ValueError:
            pass
    return _splitter_for(backbone).split(backbone)


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

_MOBILENET_V1 = BlockSplitter(patterns=(r"^conv_(?:dw|pw|pad)_(\d+)",))
_MOBILENET_V2 = BlockSplitter(
    patterns=(r"^(block_\d+)_",), top=r"^(Conv_1|out_relu)"
)
_MOBILENET_V3 = BlockSplitter(
    patterns=(r"^(expanded_conv(?:_\d+)?)_",), top=r"^conv_1(_bn)?$"
)
_RESNET = BlockSplitter(
    patterns=(r"^(conv\d+_block\d+)_",), top=r"^post_(bn|relu)$"
)
_DENSENET = BlockSplitter(
    patterns=(r"^(conv\d+_block\d+)_", r"^(pool\d+)_(?:bn|relu|conv)"),
    top=r"^(bn|relu)$",
)
_EFFICIENTNET = BlockSplitter(patterns=(r"^(block\d+[a-z])_",), top=r"^top_")
_VGG_XCEPTION = BlockSplitter(patterns=(r"^(block\d+)_",))
_INCEPTION = BlockSplitter(boundary=r"mixed\d+")
_CONVNEXT = BlockSplitter(
    patterns=(
        # ConvNeXt prefixes its layer names with the model name.
        r"^\w*?(stage_\d+_block_\d+)_",
        r"^\w*?(downsampling_block_\d+)",
    ),
    top=r"^layer_normalization",
)

# name, constructor, preprocessing, default size, min size, splitter
_FAMILIES = [
    ("mobilenet", _A.MobileNet, "tf", 224, 32, _MOBILENET_V1),
    ("mobilenet_v2", _A.MobileNetV2, "tf", 224, 32, _MOBILENET_V2),
    ("mobilenet_v3_small", _A.MobileNetV3Small, "none", 224, 32, _MOBILENET_V3),
    ("mobilenet_v3_large", _A.MobileNetV3Large, "none", 224, 32, _MOBILENET_V3),
    ("resnet50", _A.ResNet50, "caffe", 224, 32, _RESNET),
    ("resnet101", _A.ResNet101, "caffe", 224, 32, _RESNET),
    ("resnet152", _A.ResNet152, "caffe", 224, 32, _RESNET),
    ("resnet50_v2", _A.ResNet50V2, "tf", 224, 32, _RESNET),
    ("resnet101_v2", _A.ResNet101V2, "tf", 224, 32, _RESNET),
    ("resnet152_v2", _A.ResNet152V2, "tf", 224, 32, _RESNET),
    ("efficientnet_b0", _A.EfficientNetB0, "none", 224, 32, _EFFICIENTNET),
    ("efficientnet_b1", _A.EfficientNetB1, "none", 240, 32, _EFFICIENTNET),
    ("efficientnet_b2", _A.EfficientNetB2, "none", 260, 32, _EFFICIENTNET),
    ("efficientnet_b3", _A.EfficientNetB3, "none", 300, 32, _EFFICIENTNET),
    ("efficientnet_b4", _A.EfficientNetB4, "none", 380, 32, _EFFICIENTNET),
    ("efficientnet_v2_b0", _A.EfficientNetV2B0, "none", 224, 32, _EFFICIENTNET),
    ("efficientnet_v2_b1", _A.EfficientNetV2B1, "none", 240, 32, _EFFICIENTNET),
    ("efficientnet_v2_b2", _A.EfficientNetV2B2, "none", 260, 32, _EFFICIENTNET),
    ("efficientnet_v2_b3", _A.EfficientNetV2B3, "none", 300, 32, _EFFICIENTNET),
    ("efficientnet_v2_s", _A.EfficientNetV2S, "none", 384, 32, _EFFICIENTNET),
    ("vgg16", _A.VGG16, "caffe", 224, 32, _VGG_XCEPTION),
    ("vgg19", _A.VGG19, "caffe", 224, 32, _VGG_XCEPTION),
    ("xception", _A.Xception, "tf", 299, 71, _VGG_XCEPTION),
    ("inception_v3", _A.InceptionV3, "tf", 299, 75, _INCEPTION),
    ("densenet121", _A.DenseNet121, "torch", 224, 32, _DENSENET),
    ("densenet169", _A.DenseNet169, "torch", 224, 32, _DENSENET),
    ("densenet201", _A.DenseNet201, "torch", 224, 32, _DENSENET),
    ("convnext_tiny", _A.ConvNeXtTiny, "none", 224, 32, _CONVNEXT),
    ("convnext_small", _A.ConvNeXtSmall, "none", 224, 32, _CONVNEXT),
]

for _name, _ctor, _prep, _size, _min, _splitter in _FAMILIES:
    register_backbone(_name, _ctor, _prep, _size, _min, _splitter)
