"""The random image transforms `ImageAugmentationLayer` composes:
brightness scale, channel shift and one affine warp (rotation, shift,
shear, zoom, flips), each a serializable Keras layer that draws from its
own seed generator, or from a stateless seed inside `tf.data`."""

import math

import keras
import tensorflow as tf

__all__ = ["RandomAffine", "RandomBrightnessScale", "RandomChannelShift",
           "random_uniform"]


def random_uniform(shape, low, high, generator, seed, offset, dtype="float32"):
    """`keras.random.uniform` from the layer's generator or, given a `(2,)`
    int32 seed tensor (tf.data pipelines), TensorFlow's stateless op, so
    batches can be augmented in parallel and still reproducibly."""
    if seed is None:
        return keras.random.uniform(shape, low, high, seed=generator, dtype=dtype)
    return tf.random.stateless_uniform(
        shape, seed + tf.constant([0, offset], tf.int32), minval=low,
        maxval=high, dtype=dtype)


@keras.saving.register_keras_serializable(package="kft")
class RandomBrightnessScale(keras.layers.Layer):
    """Multiplies each image by a factor drawn from `[low, high]`, as the
    legacy `brightness_range` did (PIL's Brightness enhance), clipped to
    `[0, 255]`. Active only when `training=True`."""

    def __init__(self, low, high, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.low, self.high, self.seed = float(low), float(high), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True, seed=None):
        if not training:
            return images
        batch = keras.ops.shape(images)[0]
        factor = random_uniform((batch, 1, 1, 1), self.low, self.high,
                          self.seed_generator, seed, 1, self.compute_dtype)
        return keras.ops.clip(images * factor, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"low": self.low, "high": self.high, "seed": self.seed})
        return config


@keras.saving.register_keras_serializable(package="kft")
class RandomChannelShift(keras.layers.Layer):
    """Adds one intensity drawn from `[-intensity, intensity]` to every
    channel of an image, clipped to the image's own range, as the legacy
    `channel_shift_range` did. Active only when `training=True`."""

    def __init__(self, intensity, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.intensity, self.seed = float(intensity), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True, seed=None):
        if not training:
            return images
        batch = keras.ops.shape(images)[0]
        shift = random_uniform((batch, 1, 1, 1), -self.intensity, self.intensity,
                         self.seed_generator, seed, 1, self.compute_dtype)
        low = keras.ops.min(images, axis=(1, 2, 3), keepdims=True)
        high = keras.ops.max(images, axis=(1, 2, 3), keepdims=True)
        return keras.ops.minimum(keras.ops.maximum(images + shift, low), high)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"intensity": self.intensity, "seed": self.seed})
        return config


@keras.saving.register_keras_serializable(package="kft")
class RandomAffine(keras.layers.Layer):
    """Rotation, shift, shear, zoom and flips as one resampling per image.

    The legacy `ImageDataGenerator` composed its geometric transforms into
    one matrix and resampled once; chaining `RandomRotation`,
    `RandomTranslation`, `RandomShear`, `RandomZoom` and `RandomFlip`
    resamples the image once per layer. This layer draws every parameter
    per image, composes the matrices (rotation, shift, shear, zoom, about
    the image centre, as the legacy class did) and calls
    `keras.ops.image.affine_transform` once. Active only when
    `training=True`.

    Args:
        rotation: max angle in degrees.
        shift: `(height, width)`: each a max shift as a fraction of the
            size (uniform in `[-s, s]`), or a tuple of fractions to choose
            from.
        shear: max shear angle in degrees.
        zoom: `(low, high)` zoom factors per axis (> 1 zooms out).
        horizontal_flip: random horizontal flips.
        vertical_flip: random vertical flips.
        fill_mode, fill_value: for points outside the input.
        seed: random seed.
    """

    def __init__(self, rotation=0.0, shift=(0.0, 0.0), shear=0.0,
                 zoom=(1.0, 1.0), horizontal_flip=False, vertical_flip=False,
                 fill_mode="nearest", fill_value=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rotation = float(rotation)
        self.shift = tuple(
            tuple(float(c) for c in s) if isinstance(s, (list, tuple)) else float(s)
            for s in shift)
        self.shear = float(shear)
        self.zoom = tuple(float(z) for z in zoom)
        self.horizontal_flip = bool(horizontal_flip)
        self.vertical_flip = bool(vertical_flip)
        self.fill_mode = fill_mode
        self.fill_value = float(fill_value)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _uniform(self, batch, low, high, seed, offset):
        return random_uniform((batch,), low, high, self.seed_generator, seed, offset)

    def _shift(self, batch, spec, seed, offset):
        if isinstance(spec, tuple):
            if seed is None:
                pick = keras.random.randint((batch,), 0, len(spec),
                                            seed=self.seed_generator)
            else:
                pick = tf.random.stateless_uniform(
                    (batch,), seed + tf.constant([0, offset], tf.int32),
                    minval=0, maxval=len(spec), dtype=tf.int32)
            return keras.ops.take(keras.ops.convert_to_tensor(spec), pick)
        return self._uniform(batch, -spec, spec, seed, offset)

    def _flip(self, batch, enabled, seed, offset):
        if not enabled:
            return keras.ops.ones((batch,))
        coin = self._uniform(batch, 0, 1, seed, offset)
        return keras.ops.where(coin < 0.5, -1.0, 1.0)

    def call(self, images, training=True, seed=None):
        if not training:
            return images
        ops = keras.ops
        shape = ops.shape(images)
        batch = shape[0]
        height = ops.cast(shape[1], "float32")
        width = ops.cast(shape[2], "float32")
        theta = self._uniform(batch, -self.rotation, self.rotation, seed, 1) \
            * (math.pi / 180)
        shear = self._uniform(batch, -self.shear, self.shear, seed, 2) * (math.pi / 180)
        ty = self._shift(batch, self.shift[0], seed, 3) * height
        tx = self._shift(batch, self.shift[1], seed, 4) * width
        zy = self._uniform(batch, *self.zoom, seed, 5)
        zx = self._uniform(batch, *self.zoom, seed, 6)
        fx = self._flip(batch, self.horizontal_flip, seed, 7)
        fy = self._flip(batch, self.vertical_flip, seed, 8)
        cos, sin = ops.cos(theta), ops.sin(theta)
        # A maps an output point (about the centre) to its input point:
        # rotation @ shear @ zoom @ flip, as (x, y) = (column, row).
        a00 = cos * zx * fx
        a01 = (-cos * ops.sin(shear) - sin * ops.cos(shear)) * zy * fy
        a10 = sin * zx * fx
        a11 = (-sin * ops.sin(shear) + cos * ops.cos(shear)) * zy * fy
        cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        b0 = cx + tx - a00 * cx - a01 * cy
        b1 = cy + ty - a10 * cx - a11 * cy
        zero = ops.zeros_like(a00)
        transform = ops.stack([a00, a01, b0, a10, a11, b1, zero, zero], axis=1)
        return ops.image.affine_transform(
            images, transform, interpolation="bilinear",
            fill_mode=self.fill_mode, fill_value=self.fill_value)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({
            "rotation": self.rotation, "shift": self.shift, "shear": self.shear,
            "zoom": self.zoom, "horizontal_flip": self.horizontal_flip,
            "vertical_flip": self.vertical_flip, "fill_mode": self.fill_mode,
            "fill_value": self.fill_value, "seed": self.seed,
        })
        return config
