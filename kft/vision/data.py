"""`tf.data` pipelines for detection and segmentation.

Detection batches are `(images, {"boxes", "labels"})`: float32 pixels in
[0, 255] at the model's size, `yxyx` pixel boxes padded to `max_boxes`
with -1 (keras-hub's format). Segmentation batches are `(images, masks)`
with int32 masks `(b, h, w, 1)`. Images are resized to `image_size`
(boxes scale with them; masks use nearest neighbour). Augmentation (a
`kft.vision.BoxAugmentation`) runs on batches after shuffling.
"""

import numpy as np
import tensorflow as tf

__all__ = ["detection_dataset", "pad_boxes", "segmentation_dataset"]


def pad_boxes(annotations, max_boxes=None):
    """`(boxes, labels)` arrays `(n, max_boxes, 4)` / `(n, max_boxes)`
    padded with -1, from a list of `ImageAnnotation` (in their pixels)."""
    most = max((len(a.labels) for a in annotations), default=0)
    max_boxes = max_boxes or max(most, 1)
    boxes = -np.ones((len(annotations), max_boxes, 4), "float32")
    labels = -np.ones((len(annotations), max_boxes), "float32")
    for i, item in enumerate(annotations):
        count = min(len(item.labels), max_boxes)
        boxes[i, :count] = item.boxes[:count]
        labels[i, :count] = item.labels[:count]
    return boxes, labels


def _decode(path, size):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                               expand_animations=False)
    return tf.image.resize(tf.cast(image, "float32"), size)


def _scale_boxes(boxes, from_hw, size):
    scale = tf.constant([size[0], size[1], size[0], size[1]], "float32") / tf.cast(
        tf.concat([from_hw, from_hw], 0), "float32")
    return tf.where(boxes >= 0, boxes * scale, boxes)


def _finish(dataset, batch_size, shuffle, seed, augment, count):
    if shuffle:
        dataset = dataset.shuffle(min(count, 2048), seed=seed,
                                  reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if augment is not None:
        dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def detection_dataset(source, *, image_size, batch_size=8, max_boxes=None,
                      augment=None, shuffle=True, seed=None):
    """A batched detection dataset from annotations or arrays.

    Args:
        source: a list of `kft.vision.annotations.ImageAnnotation` (files
            are read and resized), or a dict of arrays `{"images": (n, h,
            w, 3), "boxes": (n, m, 4) yxyx pixels, "labels": (n, m)}`
            padded with -1 (as `kft.vision.synthetic` makes them).
        image_size: `(height, width)` of the batches.
        batch_size: images per batch.
        max_boxes: boxes per image after padding (default: the most any
            image has).
        augment: a `kft.vision.BoxAugmentation` or None.
        shuffle: shuffle the images each epoch.
        seed: shuffle seed.

    Returns:
        A `tf.data.Dataset` of `(images, {"boxes", "labels"})`.
    """
    size = tuple(int(v) for v in image_size)
    if isinstance(source, dict):
        images = np.asarray(source["images"])
        boxes = np.asarray(source["boxes"], "float32")
        labels = np.asarray(source["labels"], "float32")
        hw = np.array(images.shape[1:3], "int32")
        dataset = tf.data.Dataset.from_tensor_slices((images, boxes, labels))
        dataset = dataset.map(lambda x, b, y: (
            tf.image.resize(tf.cast(x, "float32"), size),
            {"boxes": _scale_boxes(b, hw, size), "labels": y}))
        return _finish(dataset, batch_size, shuffle, seed, augment, len(images))
    annotations = list(source)
    boxes, labels = pad_boxes(annotations, max_boxes)
    paths = [a.image for a in annotations]
    hws = np.array([(a.height, a.width) for a in annotations], "int32")
    dataset = tf.data.Dataset.from_tensor_slices((paths, hws, boxes, labels))
    dataset = dataset.map(lambda p, hw, b, y: (
        _decode(p, size), {"boxes": _scale_boxes(b, hw, size), "labels": y}),
        num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(dataset, batch_size, shuffle, seed, augment, len(paths))


def _decode_mask(path, size, ignore_value):
    mask = tf.io.decode_png(tf.io.read_file(path), channels=1)
    mask = tf.image.resize(mask, size, method="nearest")
    mask = tf.cast(mask, "int32")
    return tf.where(mask == ignore_value, 0, mask)


def segmentation_dataset(source, *, image_size, batch_size=8, augment=None,
                         shuffle=True, seed=None, ignore_value=255):
    """A batched segmentation dataset from image / mask files or arrays.

    Args:
        source: `[(image_path, mask_path), ...]` (as
            `kft.vision.annotations.read_masks` pairs them), or a dict
            `{"images": (n, h, w, 3), "masks": (n, h, w) or (n, h, w, 1)}`.
        image_size: `(height, width)` of the batches.
        batch_size: images per batch.
        augment: a `kft.vision.BoxAugmentation` or None.
        shuffle: shuffle each epoch.
        seed: shuffle seed.
        ignore_value: a mask value read as background (VOC's 255).

    Returns:
        A `tf.data.Dataset` of `(images, masks)`, masks int32 `(b, h, w, 1)`.
    """
    size = tuple(int(v) for v in image_size)
    if isinstance(source, dict):
        images = np.asarray(source["images"])
        masks = np.asarray(source["masks"], "int32")
        if masks.ndim == 3:
            masks = masks[..., None]
        dataset = tf.data.Dataset.from_tensor_slices((images, masks))
        dataset = dataset.map(lambda x, m: (
            tf.image.resize(tf.cast(x, "float32"), size),
            tf.cast(tf.image.resize(m, size, method="nearest"), "int32")))
        return _finish(dataset, batch_size, shuffle, seed, augment, len(images))
    pairs = list(source)
    dataset = tf.data.Dataset.from_tensor_slices(
        ([p for p, _ in pairs], [m for _, m in pairs]))
    dataset = dataset.map(lambda p, m: (_decode(p, size),
                                        _decode_mask(m, size, ignore_value)),
                          num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(dataset, batch_size, shuffle, seed, augment, len(pairs))
