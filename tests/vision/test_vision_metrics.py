"""COCO mAP (pycocotools) and mean IoU on known answers."""

import numpy as np
import pytest

pytest.importorskip("pycocotools", reason="pip install 'kft[vision]'")

from kft.vision.metrics import coco_map  # noqa: E402
from kft.vision.metrics import mean_iou  # noqa: E402

TRUTH = {
    "boxes": np.array([[[10, 10, 50, 50], [60, 60, 90, 100]],
                       [[0, 0, 30, 30], [-1, -1, -1, -1]]], "float32"),
    "labels": np.array([[0, 1], [2, -1]], "float32"),
}


def _predicted(boxes, labels, scores=None):
    boxes = np.asarray(boxes, "float32")
    labels = np.asarray(labels, "float32")
    scores = np.ones_like(labels) if scores is None else np.asarray(scores)
    return {"boxes": boxes, "labels": labels, "confidence": scores,
            "num_detections": (labels >= 0).sum(1)}


def test_perfect_detections_score_one():
    scores = coco_map(TRUTH, _predicted(TRUTH["boxes"], TRUTH["labels"]), 3)
    assert scores["map"] == pytest.approx(1.0)
    assert scores["map50"] == pytest.approx(1.0)


def test_a_box_off_by_a_third_counts_at_iou_half_only_if_it_overlaps_enough():
    boxes = TRUTH["boxes"].copy()
    boxes[0, 0] = [10, 20, 50, 60]  # IoU with the truth: 30*40/(50*40) = 0.6
    scores = coco_map(TRUTH, _predicted(boxes, TRUTH["labels"]), 3)
    assert scores["map50"] == pytest.approx(1.0)
    assert scores["map"] < 0.9


def test_wrong_classes_score_zero():
    labels = np.array([[1, 0], [0, -1]], "float32")
    scores = coco_map(TRUTH, _predicted(TRUTH["boxes"], labels), 3)
    assert scores["map"] == pytest.approx(0.0)
    nothing = _predicted(np.zeros((2, 1, 4)), -np.ones((2, 1)))
    assert coco_map(TRUTH, nothing, 3)["map50"] == 0.0


def test_mean_iou_of_known_masks():
    truth = np.array([[[0, 0, 1, 1]]])
    assert mean_iou(truth, truth, 2) == pytest.approx(1.0)
    # Class 0: 2 right of 3 claimed -> IoU 2/3; class 1: 1 of 2 -> 1/2.
    predicted = np.array([[[0, 0, 0, 1]]])
    assert mean_iou(truth, predicted, 2) == pytest.approx((2 / 3 + 1 / 2) / 2)
    logits = np.eye(2)[predicted]
    assert mean_iou(truth, logits, 2) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_the_detection_callback_writes_val_map_into_the_history(tmp_path):
    from vision_fixtures import SIZE
    from vision_fixtures import background_files
    from vision_fixtures import tiny_encoder
    from vision_fixtures import toy_garments

    import kft
    from kft.vision import build_detector
    from kft.vision import synthetic
    from kft.vision.data import detection_dataset
    from kft.vision.metrics import DetectionMetrics

    scenes = synthetic.fashion_scenes(
        4, image_size=SIZE, objects=(1, 2), scale=(0.45, 0.7),
        garments=toy_garments(), backgrounds=background_files(tmp_path))
    data = detection_dataset(scenes, image_size=(SIZE, SIZE), batch_size=4,
                             shuffle=False)
    model = build_detector(tiny_encoder(), 3, image_size=(SIZE, SIZE),
                           levels=(3, 5), head_conv_layers=1)
    history = kft.fine_tune(model, data, stages=[{"epochs": 1}], verbose=0,
                            callbacks=[DetectionMetrics(data, 3)])
    values = history[0].history
    assert 0.0 <= values["val_map"][0] <= values["val_map50"][0] <= 1.0
