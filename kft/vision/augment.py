"""Box- and mask-aware augmentation for detection and segmentation batches.

Keras' own image preprocessing layers move bounding boxes and
segmentation masks with the pixels (`keras.layers.RandomFlip`,
`RandomZoom`, `RandomTranslation` take `bounding_box_format=`; masks are
resampled with nearest-neighbour interpolation; a box that leaves the
image gets label -1). `BoxAugmentation` composes them in a `tf.data` map
and then tidies the boxes: those that left the image, or shrank below
`min_box_size` pixels, are dropped (label -1, box -1) and the remaining
boxes move to the front, as keras-hub's padded format expects.
"""

import dataclasses

import keras
import tensorflow as tf

__all__ = ["BoxAugmentation"]


@dataclasses.dataclass
class BoxAugmentation:
    """Random flips, scale, shift and colour that move boxes and masks too.

    Args:
        horizontal_flip: flip left-right with probability 0.5.
        vertical_flip: flip up-down with probability 0.5.
        zoom_range: scale the image by a factor in `[1 - z, 1 + z]`
            (zooming in crops; zooming out pads with zeros).
        shift_range: shift by up to this fraction of the width and height.
        brightness_range: add up to this fraction of 255 to the pixels.
        contrast_range: scale the contrast by `[1 - c, 1 + c]`.
        min_box_size: boxes narrower or lower than this (pixels) after
            the transform are dropped.
        bounding_box_format: the boxes' format (`"yxyx"` pixels by default).
        seed: seed of the random layers.

    Example:

    >>> augment = BoxAugmentation(horizontal_flip=True, zoom_range=0.2)
    >>> dataset = dataset.map(augment)  # doctest: +SKIP
    """

    horizontal_flip: bool = True
    vertical_flip: bool = False
    zoom_range: float = 0.0
    shift_range: float = 0.0
    brightness_range: float = 0.0
    contrast_range: float = 0.0
    min_box_size: float = 2.0
    bounding_box_format: str = "yxyx"
    seed: int | None = None
    # Keras layers hold seed variables: made once, outside any tf.function.
    _layers: tuple = dataclasses.field(default=(), init=False, repr=False,
                                       compare=False)

    def __post_init__(self):
        self._layers = (self.geometric_layers(), self.colour_layers())

    def geometric_layers(self):
        """New Keras layers that move pixels, boxes and masks."""
        fmt, seed = self.bounding_box_format, self.seed
        layers = []
        mode = "_and_".join(name for name, on in (
            ("horizontal", self.horizontal_flip),
            ("vertical", self.vertical_flip)) if on)
        if mode:
            layers.append(keras.layers.RandomFlip(
                mode, bounding_box_format=fmt, seed=seed))
        if self.zoom_range:
            z = float(self.zoom_range)
            layers.append(keras.layers.RandomZoom(
                (-z, z), fill_mode="constant", bounding_box_format=fmt,
                seed=seed))
        if self.shift_range:
            s = float(self.shift_range)
            layers.append(keras.layers.RandomTranslation(
                (-s, s), (-s, s), fill_mode="constant",
                bounding_box_format=fmt, seed=seed))
        return layers

    def colour_layers(self):
        """New Keras layers that change pixel values only."""
        layers = []
        if self.brightness_range:
            layers.append(keras.layers.RandomBrightness(
                float(self.brightness_range), value_range=(0, 255),
                seed=self.seed))
        if self.contrast_range:
            layers.append(keras.layers.RandomContrast(
                float(self.contrast_range), value_range=(0, 255),
                seed=self.seed))
        return layers

    def __call__(self, images, targets):
        """Augments one batch: `targets` is a detection dict `{"boxes",
        "labels"}` or a segmentation mask batch `(b, h, w, 1)`."""
        if isinstance(targets, dict):
            data = {"images": images, "bounding_boxes": dict(targets)}
        else:
            data = {"images": images, "segmentation_masks": targets}
        geometric, colour = self._layers
        for layer in geometric:
            data = layer(data, training=True)
        images = data["images"]
        for layer in colour:
            images = layer(images, training=True)
        images = tf.clip_by_value(images, 0.0, 255.0)
        if not isinstance(targets, dict):
            return images, tf.cast(data["segmentation_masks"], targets.dtype)
        return images, self.tidy_boxes(data["bounding_boxes"], targets)

    def tidy_boxes(self, boxes, original):
        """Drops boxes that left the image or became too small; kept boxes
        first, the rest `-1` (keras-hub's padding)."""
        coords = tf.cast(boxes["boxes"], "float32")
        labels = tf.cast(boxes["labels"], "float32")
        if self.bounding_box_format != "yxyx":
            raise ValueError("BoxAugmentation tidies 'yxyx' boxes. Received: "
                             f"bounding_box_format={self.bounding_box_format!r}")
        size = tf.minimum(coords[..., 2] - coords[..., 0],
                          coords[..., 3] - coords[..., 1])
        keep = (labels >= 0) & (size >= self.min_box_size)
        # A stable sort on "dropped" puts kept boxes first, in their order.
        order = tf.argsort(tf.cast(~keep, "int32"), axis=-1, stable=True)
        keep = tf.gather(keep, order, batch_dims=1)
        coords = tf.where(keep[..., None], tf.gather(coords, order, batch_dims=1),
                          -1.0)
        labels = tf.where(keep, tf.gather(labels, order, batch_dims=1), -1.0)
        return {"boxes": tf.cast(coords, original["boxes"].dtype),
                "labels": tf.cast(labels, original["labels"].dtype)}
