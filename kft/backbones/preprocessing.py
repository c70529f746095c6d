"""The image preprocessing a backbone family expects, as a Keras layer.

A kft model takes raw pixels in [0, 255]. The layer below turns them into
what the pretrained backbone was trained on, so the classic
wrong-preprocessing bug (feeding [0, 1] pixels to a network trained on
[-1, 1]) cannot happen.
"""

import keras
from keras import ops

from kft.backbones.families import PREPROCESSING_MODES

__all__ = ["ImagePreprocessing", "PREPROCESSING_MODES"]

# Channel statistics of ImageNet, in RGB order, as used by
# `keras.applications.imagenet_utils.preprocess_input`.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)



@keras.saving.register_keras_serializable(package="kft")
class ImagePreprocessing(keras.layers.Layer):
    """Maps raw RGB pixels in [0, 255] to a backbone family's input range.

    The modes are those of `keras.applications.imagenet_utils`:

    - `"tf"`: scale to [-1, 1] (MobileNet, MobileNetV2, ResNetV2,
      Xception, Inception).
    - `"torch"`: scale to [0, 1], then normalise each channel with the
      ImageNet mean and standard deviation (DenseNet).
    - `"caffe"`: RGB to BGR, then subtract the ImageNet mean of each
      channel, no scaling (ResNet, VGG).
    - `"none"`: pass through; the backbone preprocesses inside itself
      (EfficientNet, EfficientNetV2, MobileNetV3, ConvNeXt).

    With a channel count other than 3 (only possible with `weights=None`),
    `"torch"` and `"caffe"` use the mean of the three channel statistics.

    Args:
        mode: one of `"tf"`, `"torch"`, `"caffe"`, `"none"`.

    Example:

    >>> layer = ImagePreprocessing("tf")
    >>> float(layer(keras.ops.full((1, 2, 2, 3), 255.0))[0, 0, 0, 0])
    1.0
    """

    def __init__(self, mode="tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(
                f"Unknown preprocessing mode. Expected one of "
                f"{PREPROCESSING_MODES}. Received: mode={mode!r}"
            )
        self.mode = mode

    def build(self, input_shape):
        channels = input_shape[-1]
        if self.mode == "torch":
            mean, std = _IMAGENET_MEAN, _IMAGENET_STD
            if channels != 3:
                mean = (sum(mean) / 3,) * channels
                std = (sum(std) / 3,) * channels
            self._mean = ops.convert_to_tensor([m * 255.0 for m in mean])
            self._std = ops.convert_to_tensor([s * 255.0 for s in std])
        elif self.mode == "caffe":
            mean = _CAFFE_MEAN_BGR
            if channels != 3:
                mean = (sum(mean) / 3,) * channels
            self._mean = ops.convert_to_tensor(mean)
        self._channels = channels

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.cast(self._mean, self.compute_dtype)
            std = ops.cast(self._std, self.compute_dtype)
            return (x - mean) / std
        if self.mode == "caffe":
            if self._channels == 3:
                x = ops.flip(x, axis=-1)
            return x - ops.cast(self._mean, self.compute_dtype)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode})
        return config
