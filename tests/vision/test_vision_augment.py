"""Box- and mask-aware augmentation: boxes follow the pixels exactly."""

import numpy as np
import tensorflow as tf

from kft.vision import synthetic
from kft.vision.augment import BoxAugmentation
from kft.vision.data import detection_dataset
from kft.vision.data import segmentation_dataset

SIZE = 64


def _painted(boxes_per_image):
    """Images whose channel k is 255 exactly inside box k (yxyx pixels)."""
    n, m = len(boxes_per_image), len(boxes_per_image[0])
    images = np.zeros((n, SIZE, SIZE, 3), "float32")
    for i, boxes in enumerate(boxes_per_image):
        for k, (y1, x1, y2, x2) in enumerate(boxes):
            images[i, y1:y2, x1:x2, k] = 255
    boxes = np.array(boxes_per_image, "float32")
    labels = np.tile(np.arange(m, dtype="float32"), (n, 1))
    return images, {"boxes": boxes, "labels": labels}


def _extent(channel):
    """The yxyx box of the pixels above half intensity, or None."""
    rows = np.nonzero((channel > 127).any(axis=1))[0]
    cols = np.nonzero((channel > 127).any(axis=0))[0]
    if not len(rows):
        return None
    return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], "float32")


def test_flip_and_scale_move_known_boxes_to_the_transformed_truth():
    rng = np.random.default_rng(0)
    starts = rng.integers(12, 30, size=(16, 2, 2))
    boxes = [[[y, x, y + 16, x + 20] for y, x in pair] for pair in starts]
    images, targets = _painted(boxes)
    augment = BoxAugmentation(horizontal_flip=True, vertical_flip=True,
                              zoom_range=0.3, seed=3)
    out_images, out = augment(tf.constant(images), {
        k: tf.constant(v) for k, v in targets.items()})
    out_images, out = np.asarray(out_images), {k: np.asarray(v) for k, v in out.items()}
    flipped = 0
    for i in range(len(images)):
        for slot in range(2):
            label = int(out["labels"][i, slot])
            truth = _extent(out_images[i, ..., label])
            assert truth is not None
            # Within a pixel: the painted edge is resampled bilinearly.
            np.testing.assert_allclose(out["boxes"][i, slot], truth, atol=1.01)
        flipped += not np.allclose(out["boxes"][i, 0], targets["boxes"][i, 0])
    assert flipped >= 8  # the transforms really ran


def test_a_box_that_leaves_the_image_is_dropped_and_the_rest_move_up():
    # Slot 0: a small box at the left edge; slot 1: a box in the middle.
    boxes = [[[20, 0, 30, 6], [24, 24, 40, 40]]] * 32
    images, targets = _painted(boxes)
    augment = BoxAugmentation(horizontal_flip=False, shift_range=0.3, seed=1)
    out_images, out = augment(tf.constant(images), {
        k: tf.constant(v) for k, v in targets.items()})
    out_images, out = np.asarray(out_images), {k: np.asarray(v) for k, v in out.items()}
    dropped = kept = 0
    for i in range(len(images)):
        edge = _extent(out_images[i, ..., 0])
        width = 0 if edge is None else min(edge[2] - edge[0], edge[3] - edge[1])
        if width >= 3:
            kept += 1
            assert list(out["labels"][i]) == [0, 1]
        elif edge is None:  # (a 1-2 pixel sliver may go either way)
            dropped += 1
            assert list(out["labels"][i]) == [1, -1]
            np.testing.assert_array_equal(out["boxes"][i, 1], [-1, -1, -1, -1])
            np.testing.assert_allclose(out["boxes"][i, 0],
                                       _extent(out_images[i, ..., 1]), atol=1.01)
    assert dropped and kept


def test_masks_move_with_the_pixels():
    images, targets = _painted([[[10, 8, 40, 30]]] * 8)
    masks = (images[..., :1] > 0).astype("int32") * 2
    augment = BoxAugmentation(horizontal_flip=True, zoom_range=0.3,
                              shift_range=0.2, seed=5)
    out_images, out_masks = augment(tf.constant(images), tf.constant(masks))
    painted = np.asarray(out_images)[..., 0] > 127
    labelled = np.asarray(out_masks)[..., 0] == 2
    assert out_masks.dtype == tf.int32
    assert set(np.unique(out_masks)) <= {0, 2}  # nearest: no blended ids
    iou = (painted & labelled).sum() / max((painted | labelled).sum(), 1)
    assert iou > 0.9


def test_colour_changes_leave_boxes_and_keep_pixels_in_range():
    images, targets = _painted([[[10, 8, 40, 30]]] * 4)
    augment = BoxAugmentation(horizontal_flip=False, brightness_range=0.3,
                              contrast_range=0.3, seed=0)
    out_images, out = augment(tf.constant(images), {
        k: tf.constant(v) for k, v in targets.items()})
    np.testing.assert_array_equal(np.asarray(out["boxes"]), targets["boxes"])
    assert not np.allclose(np.asarray(out_images), images)
    assert float(tf.reduce_min(out_images)) >= 0
    assert float(tf.reduce_max(out_images)) <= 255


def test_pipelines_resize_boxes_with_images_and_augment_in_the_map(tmp_path):
    from vision_fixtures import background_files
    from vision_fixtures import toy_garments

    scenes = synthetic.fashion_scenes(
        6, image_size=96, objects=(2, 2), scale=(0.3, 0.4), seed=1,
        garments=toy_garments(), backgrounds=background_files(tmp_path))
    data = detection_dataset(scenes, image_size=(48, 48), batch_size=6,
                             shuffle=False)
    images, targets = next(iter(data))
    assert images.shape == (6, 48, 48, 3)
    kept = scenes["labels"] >= 0
    np.testing.assert_allclose(np.asarray(targets["boxes"])[kept],
                               scenes["boxes"][kept] / 2)
    augmented = detection_dataset(scenes, image_size=(48, 48), batch_size=6,
                                  augment=BoxAugmentation(seed=0), shuffle=False)
    _, moved = next(iter(augmented))
    assert moved["boxes"].shape == targets["boxes"].shape
    masks = segmentation_dataset(scenes, image_size=(48, 48), batch_size=3,
                                 augment=BoxAugmentation(seed=0))
    images, labels = next(iter(masks))
    assert labels.shape == (3, 48, 48, 1) and labels.dtype == tf.int32


def test_synthetic_boxes_are_the_tight_extent_of_their_masks(tmp_path):
    from vision_fixtures import background_files
    from vision_fixtures import toy_garments

    scenes = synthetic.fashion_scenes(
        10, image_size=64, objects=(1, 1), scale=(0.4, 0.6), seed=2,
        garments=toy_garments(), backgrounds=background_files(tmp_path))
    again = synthetic.fashion_scenes(
        10, image_size=64, objects=(1, 1), scale=(0.4, 0.6), seed=2,
        garments=toy_garments(), backgrounds=background_files(tmp_path))
    np.testing.assert_array_equal(scenes["images"], again["images"])
    for i in range(10):
        label = int(scenes["labels"][i, 0])
        where = scenes["masks"][i] == label + 1
        rows, cols = np.nonzero(where.any(1))[0], np.nonzero(where.any(0))[0]
        np.testing.assert_array_equal(
            scenes["boxes"][i, 0], [rows[0], cols[0], rows[-1] + 1, cols[-1] + 1])


def test_background_photos_hold_out_whole_files(tmp_path):
    from vision_fixtures import background_files

    files = background_files(tmp_path, count=5)
    train = synthetic.background_photos("train", directories=(str(tmp_path),))
    val = synthetic.background_photos("val", directories=(str(tmp_path),))
    assert not set(train) & set(val) and val
    assert set(files) <= set(train) | set(val)
