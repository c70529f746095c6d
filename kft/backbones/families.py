"""Backbone families: one table entry per `keras.applications` family.

Each entry holds what kft needs to know about a family, in one place (as
fastai's `model_meta` does): its constructor, the preprocessing it
expects, its default and minimum input size, and how to split its layers
into ordered blocks for freezing and per-block learning rates. The table
is plain data (no Keras import), so recipes validate without TensorFlow;
`kft.backbones` builds the models.
"""

import dataclasses
import os
import re
from collections.abc import Callable

__all__ = [
    "BackboneFamily",
    "BlockSplitter",
    "KERAS_HUB_SPLITTERS",
    "PREPROCESSING_MODES",
    "PackagedWeights",
    "get_backbone",
    "get_packaged_weights",
    "list_backbones",
    "list_packaged_weights",
    "register_backbone",
]

PREPROCESSING_MODES = ("tf", "torch", "caffe", "none")


def _layers(model):
    """A model's layers without its InputLayers (named by class, so this
    module needs no Keras import)."""
    return [layer for layer in model.layers
            if type(layer).__name__ != "InputLayer"]


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
        containers: regexes (full match) naming layers whose sublayers are
            split instead of the layer itself (a keras-hub ViT keeps its
            transformer blocks inside one `vit_encoder` layer).
    """

    patterns: tuple = ()
    top: str | None = None
    boundary: str | None = None
    containers: tuple = ()

    def _key(self, name):
        for pattern in self.patterns:
            match = re.match(pattern, name)
            if match:
                return match.group(1)
        if self.top and re.match(self.top, name):
            return "top"
        return None

    def _visit(self, model):
        for layer in _layers(model):
            if any(re.fullmatch(c, layer.name) for c in self.containers):
                # Only reached with a built model, so Keras is loaded.
                from kft._keras_internals import child_layers

                yield from child_layers(layer)
            else:
                yield layer

    def split(self, model):
        blocks = {}
        current = "stem"
        boundary_count = 0
        for layer in self._visit(model):
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
        names = [layer.name for layer in _layers(model)]
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
            `include_top`, `weights`, `input_shape` and keyword arguments,
            returning a `keras.Model`; or the name of one in
            `keras.applications` (resolved when a backbone is built, so
            the table is read without importing Keras).
        preprocessing: an `ImagePreprocessing` mode.
        default_input_size: the size the family was trained at.
        min_input_size: the smallest height/width it accepts.
        splitter: a `BlockSplitter`.
    """

    name: str
    constructor: Callable | str
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
        # kft/assets/, beside the packages (package data of `kft`).
        package = os.path.dirname(os.path.dirname(__file__))
        return os.path.join(package, "assets", self.filename)


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



# === Registry ===

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

# keras-hub image backbones, by class name: their blocks. The preset's own
# image converter does their preprocessing (`kft.backbones.image_presets`).
KERAS_HUB_SPLITTERS = {
    "ResNetBackbone": BlockSplitter(
        patterns=(r"^(stack\d+_block\d+)_",), top=r"^post_(bn|relu)$"),
    "EfficientNetBackbone": _EFFICIENTNET,
    "ViTBackbone": BlockSplitter(
        patterns=(r"^(transformer_block_\d+)$",), top=r"^ln$",
        containers=(r"vit_encoder",)),
    # DINOv2 names its parts after the backbone ("backbone_encoder" once
    # kft names it "backbone" and it is reloaded).
    # kft.models.audio.whisper_encoder: the Whisper encoder alone (a convolution
    # stem, transformer_encoder_layer_i, encoder_layer_norm).
    "WhisperBackbone": BlockSplitter(
        patterns=(r"^(transformer_encoder_layer_\d+)$",),
        top=r"^encoder_layer_norm$"),
    # kft.models.audio.moonshine_encoder: the Moonshine encoder alone (the conv
    # stem conv1..gelu_after_conv3 with the rotary embedding, then
    # encoder_block_i, encoder_final_layer_norm).
    "MoonshineBackbone": BlockSplitter(
        patterns=(r"^(encoder_block_\d+)$",),
        top=r"^encoder_final_layer_norm$"),
    "DINOV2Backbone": BlockSplitter(
        patterns=(r"^(layers_\d+)$",), top=r"^(\w+_)?layernorm$",
        containers=(r"(\w+_)?encoder",)),
}

# name, constructor, preprocessing, default size, min size, splitter
_FAMILIES = [
    ("mobilenet", "MobileNet", "tf", 224, 32, _MOBILENET_V1),
    ("mobilenet_v2", "MobileNetV2", "tf", 224, 32, _MOBILENET_V2),
    ("mobilenet_v3_small", "MobileNetV3Small", "none", 224, 32, _MOBILENET_V3),
    ("mobilenet_v3_large", "MobileNetV3Large", "none", 224, 32, _MOBILENET_V3),
    ("resnet50", "ResNet50", "caffe", 224, 32, _RESNET),
    ("resnet101", "ResNet101", "caffe", 224, 32, _RESNET),
    ("resnet152", "ResNet152", "caffe", 224, 32, _RESNET),
    ("resnet50_v2", "ResNet50V2", "tf", 224, 32, _RESNET),
    ("resnet101_v2", "ResNet101V2", "tf", 224, 32, _RESNET),
    ("resnet152_v2", "ResNet152V2", "tf", 224, 32, _RESNET),
    ("efficientnet_b0", "EfficientNetB0", "none", 224, 32, _EFFICIENTNET),
    ("efficientnet_b1", "EfficientNetB1", "none", 240, 32, _EFFICIENTNET),
    ("efficientnet_b2", "EfficientNetB2", "none", 260, 32, _EFFICIENTNET),
    ("efficientnet_b3", "EfficientNetB3", "none", 300, 32, _EFFICIENTNET),
    ("efficientnet_b4", "EfficientNetB4", "none", 380, 32, _EFFICIENTNET),
    ("efficientnet_v2_b0", "EfficientNetV2B0", "none", 224, 32, _EFFICIENTNET),
    ("efficientnet_v2_b1", "EfficientNetV2B1", "none", 240, 32, _EFFICIENTNET),
    ("efficientnet_v2_b2", "EfficientNetV2B2", "none", 260, 32, _EFFICIENTNET),
    ("efficientnet_v2_b3", "EfficientNetV2B3", "none", 300, 32, _EFFICIENTNET),
    ("efficientnet_v2_s", "EfficientNetV2S", "none", 384, 32, _EFFICIENTNET),
    ("vgg16", "VGG16", "caffe", 224, 32, _VGG_XCEPTION),
    ("vgg19", "VGG19", "caffe", 224, 32, _VGG_XCEPTION),
    ("xception", "Xception", "tf", 299, 71, _VGG_XCEPTION),
    ("inception_v3", "InceptionV3", "tf", 299, 75, _INCEPTION),
    ("densenet121", "DenseNet121", "torch", 224, 32, _DENSENET),
    ("densenet169", "DenseNet169", "torch", 224, 32, _DENSENET),
    ("densenet201", "DenseNet201", "torch", 224, 32, _DENSENET),
    ("convnext_tiny", "ConvNeXtTiny", "none", 224, 32, _CONVNEXT),
    ("convnext_small", "ConvNeXtSmall", "none", 224, 32, _CONVNEXT),
]


for _name, _ctor, _prep, _size, _min, _splitter in _FAMILIES:
    register_backbone(_name, _ctor, _prep, _size, _min, _splitter)
