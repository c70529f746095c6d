"""keras-hub image backbones: a preset's backbone and its image converter.

`kft.build_classifier` takes, beside the `keras.applications` families of
`kft.list_backbones()`, any image backbone keras-hub loads: a keras-hub
preset name (`"resnet_50_imagenet"`, `"vit_base_patch16_224_imagenet"`),
an `hf://` address (`"hf://timm/resnet18.a1_in1k"`), a local directory in
keras-hub, Hugging Face or timm format, a short name of `IMAGE_PRESETS`,
or a `keras_hub.models.Backbone` instance. The preset's image converter
(resize, rescale, mean/std) goes inside the model, so it still takes raw
pixels in [0, 255].
"""

import os

from kft.utils.offline import NetworkUnavailableError
from kft.utils.offline import require_preset

__all__ = [
    "IMAGE_PRESETS",
    "PresetDownloadError",
    "PresetUnavailableError",
    "is_keras_hub_image_source",
    "load_image_backbone",
    "resolve_image_preset",
]


class PresetUnavailableError(RuntimeError):
    """A keras-hub preset could not be loaded (no network, no file)."""


class PresetDownloadError(PresetUnavailableError, NetworkUnavailableError):
    """A keras-hub preset to download, offline or without a network."""


def _efficientnet_lite0_path():
    from kft.convert.assets import converted_path

    return converted_path("efficientnet-lite0", "efficientnet_lite0_imagenet",
                          PresetUnavailableError)


# Short names for checkpoints converted from pip packages; anything else
# goes to keras-hub as a preset name, `hf://` address or directory.
IMAGE_PRESETS = {"efficientnet_lite0_imagenet": _efficientnet_lite0_path}


def resolve_image_preset(preset):
    """A short name of `IMAGE_PRESETS` -> its local path; others unchanged."""
    resolver = IMAGE_PRESETS.get(str(preset))
    return resolver() if resolver else str(preset)


def _keras_hub_image_presets():
    import keras_hub

    return set(keras_hub.models.ImageClassifier.presets)


def is_keras_hub_image_source(backbone):
    """Whether `backbone` names a keras-hub image backbone (not a
    `keras.applications` family): a `keras_hub.models.Backbone`, an
    `IMAGE_PRESETS` name, `hf://` / `kaggle://`, a directory, or a keras-hub
    image preset name."""
    if not isinstance(backbone, str):
        from kft.backbones.anatomy import is_keras_hub_backbone

        return is_keras_hub_backbone(backbone)
    return (backbone in IMAGE_PRESETS
            or backbone.startswith(("hf://", "kaggle://"))
            or os.path.isdir(backbone)
            or backbone in _keras_hub_image_presets())


def load_image_backbone(source, load_weights=True):
    """`(backbone, image_converter)` of a keras-hub image preset.

    Args:
        source: see the module docstring.
        load_weights: load the preset's weights; False builds the same
            architecture with random weights.

    Returns:
        A `keras_hub.models.Backbone` and its `keras_hub.layers.ImageConverter`
        (None when the preset has none).

    Raises:
        PresetUnavailableError: one sentence saying what to pass instead.
        PresetDownloadError: a preset to download, offline or without a
            network (in seconds; also a `kft.utils.offline.NetworkUnavailableError`).
    """
    import keras_hub

    path = resolve_image_preset(source)
    require_preset(
        path, "a local directory in keras-hub, Hugging Face or timm format "
        "(e.g. 'efficientnet_lite0_imagenet' after `kft convert "
        "efficientnet-lite0`)", what="the keras-hub image preset",
        error=PresetDownloadError)
    try:
        backbone = keras_hub.models.Backbone.from_preset(
            path, load_weights=load_weights)
    except Exception as error:
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        where = ("the directory" if os.path.isdir(path) else "keras-hub preset")
        raise PresetUnavailableError(
            f"Could not load {where} {path!r} as an image backbone (no network "
            "here?). Pass a local directory in keras-hub, Hugging Face or timm "
            "format instead (e.g. 'efficientnet_lite0_imagenet' after `kft "
            f"convert efficientnet-lite0`). Cause: {cause}") from None
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(path)
    except (ValueError, FileNotFoundError):
        converter = None
    return backbone, converter
