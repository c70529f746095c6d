"""The image encoder under a detector or segmenter: a feature pyramid.

keras-hub's RetinaNet and DeepLabV3 take any
`keras_hub.models.FeaturePyramidBackbone` (ResNet, EfficientNet,
MobileNet, CSPNet, HGNetV2 ...): its `pyramid_outputs` (`"P3"` is 8x
smaller than the image, `"P5"` 32x) feed the feature pyramid or the
atrous pooling. kft loads the encoder as `kft.build_classifier` loads a
keras-hub image backbone (a preset name, an `hf://` address, a local
directory, the converted `efficientnet_lite0_imagenet`, or an instance),
runs it at the task's image size, and names it `"image_encoder"`, the
name the model's anatomy records (it survives `.keras` save and load,
since the task's backbone saves the encoder's config).
"""

import keras
import keras_hub

from kft.backbones.image_presets import load_image_backbone

__all__ = ["ENCODER_NAME", "EncoderSpec", "load_encoder"]

ENCODER_NAME = "image_encoder"


class EncoderSpec:
    """A loaded encoder and what its preset says about pixels.

    Args:
        encoder: the `keras_hub.models.FeaturePyramidBackbone`.
        scale: the converter's `scale` (raw pixels times this) or None.
        offset: the converter's `offset` (added after scaling) or None.
    """

    def __init__(self, encoder, scale=None, offset=None):
        self.encoder = encoder
        self.scale = scale
        self.offset = offset

    @property
    def levels(self):
        """The pyramid levels the encoder exposes, e.g. `[1, 2, 3, 4, 5]`."""
        return sorted(int(key[1:]) for key in self.encoder.pyramid_outputs)


def _at_size(encoder, image_size):
    """The encoder rebuilt for `(height, width, 3)` inputs, same weights."""
    config = encoder.get_config()
    key = "image_shape" if "image_shape" in config else "input_shape"
    shape = (*image_size, 3)
    if key in config and tuple(config[key] or ()) == shape:
        return encoder
    if key not in config:
        raise ValueError(
            f"Cannot run {type(encoder).__name__} at image_size={image_size}: "
            "its config has no image_shape / input_shape.")
    config[key] = shape
    resized = type(encoder).from_config(config)
    resized.set_weights(encoder.get_weights())
    return resized


def load_encoder(backbone, *, weights, image_size):
    """Loads a feature-pyramid image encoder for a detector or segmenter.

    Args:
        backbone: a keras-hub image preset name, an `hf://` address, a
            local directory (keras-hub, Hugging Face or timm format), a
            short name of `kft.backbones.image_presets.IMAGE_PRESETS` (e.g.
            `"efficientnet_lite0_imagenet"`), or a
            `keras_hub.models.FeaturePyramidBackbone` instance (used with
            its weights).
        weights: False for random weights of the same architecture,
            True for the preset's.
        image_size: `(height, width)` the encoder runs at.

    Returns:
        An `EncoderSpec`; its encoder is named `"image_encoder"`.
    """
    if isinstance(backbone, keras.Model):
        encoder, converter = backbone, None
    elif isinstance(backbone, str):
        encoder, converter = load_image_backbone(backbone, load_weights=weights)
    else:
        raise ValueError(
            "backbone must be a keras-hub image preset name, an hf:// address, "
            "a local directory or a keras_hub.models.FeaturePyramidBackbone. "
            f"Received: backbone={backbone!r}")
    if not isinstance(encoder, keras_hub.models.FeaturePyramidBackbone):
        raise ValueError(
            f"{type(encoder).__name__} has no feature pyramid (pyramid_outputs),"
            " which detection and segmentation heads read. Use a keras-hub "
            "ResNet, EfficientNet, MobileNet, CSPNet or HGNetV2 backbone (e.g. "
            "'efficientnet_lite0_imagenet' after `kft convert efficientnet-lite0`"
            ").")
    encoder = _at_size(encoder, tuple(int(v) for v in image_size))
    encoder.name = ENCODER_NAME
    scale = getattr(converter, "scale", None)
    offset = getattr(converter, "offset", None)
    return EncoderSpec(encoder, scale=scale, offset=offset)
