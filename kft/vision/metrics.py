"""Detection and segmentation metrics from well-kept evaluators.

COCO mAP comes from `pycocotools` (the COCO project's own evaluator,
`pip install "kft[vision]"`), fed in memory; mean IoU from
`keras.metrics.MeanIoU`. `DetectionMetrics` is a callback that adds
`val_map` (mAP@[.5:.95]) and `val_map50` (mAP@.5) to the epoch's logs, so
they reach `history.csv`, `metrics.json` and early stopping.
"""

import contextlib
import io

import keras
import numpy as np

__all__ = ["DetectionMetrics", "coco_map", "mean_iou", "predict_detections",
           "predict_padded"]


def _coco():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError(
            "COCO mAP needs pycocotools: pip install 'kft[vision]' (or "
            "pip install pycocotools).") from None
    return COCO, COCOeval


def _xywh(box):
    y1, x1, y2, x2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _ground_truth(boxes, labels, num_classes):
    images, annotations = [], []
    for i, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
        images.append({"id": i})
        for box, label in zip(image_boxes, image_labels):
            if label < 0:
                continue
            x, y, w, h = _xywh(box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i,
                "category_id": int(label), "bbox": [x, y, w, h],
                "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c} for c in range(num_classes)]}


def _detections(predictions):
    rows = []
    counts = predictions.get("num_detections")
    for i, (boxes, labels, scores) in enumerate(zip(
            predictions["boxes"], predictions["labels"],
            predictions["confidence"])):
        n = int(counts[i]) if counts is not None else len(labels)
        for box, label, score in zip(boxes[:n], labels[:n], scores[:n]):
            # An untrained head can decode to inf / NaN boxes: not detections.
            if label < 0 or not np.all(np.isfinite(box)):
                continue
            rows.append([i, *_xywh(box), float(score), int(label)])
    return np.array(rows, "float64").reshape(-1, 7)


def coco_map(ground_truth, predictions, num_classes):
    """COCO box mAP of predictions against padded ground truth.

    Args:
        ground_truth: `{"boxes": (n, m, 4) yxyx pixels, "labels": (n, m)}`
            padded with label -1 (a `kft.vision` dataset's targets).
        predictions: `{"boxes", "labels", "confidence", "num_detections"}`
            as a keras-hub detector's `predict` returns them.
        num_classes: number of classes.

    Returns:
        `{"map": mAP@[.5:.95], "map50": mAP@.5, "map75": mAP@.75}` in
        [0, 1] (0 where nothing was detected; -1 where no box exists).
    """
    COCO, COCOeval = _coco()
    truth = COCO()
    truth.dataset = _ground_truth(np.asarray(ground_truth["boxes"]),
                                  np.asarray(ground_truth["labels"]),
                                  num_classes)
    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
        rows = _detections({k: np.asarray(v) for k, v in predictions.items()})
        if not len(rows) or not truth.dataset["annotations"]:
            empty = 0.0 if truth.dataset["annotations"] else -1.0
            return {"map": empty, "map50": empty, "map75": empty}
        evaluation = COCOeval(truth, truth.loadRes(rows), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    return {"map": float(stats[0]), "map50": float(stats[1]),
            "map75": float(stats[2])}


def predict_detections(model, data):
    """`(ground_truth, predictions)` over a detection dataset, as numpy.

    Args:
        model: a keras-hub object detector (`kft.vision.build_detector`).
        data: a batched dataset of `(images, {"boxes", "labels"})`.
    """
    truth = {"boxes": [], "labels": []}
    images = []
    for batch, targets in data:
        images.append(np.asarray(batch))
        for key in truth:
            truth[key].append(np.asarray(targets[key]))
    width = max(b.shape[1] for b in truth["boxes"])

    def pad(array):
        extra = [(0, 0), (0, width - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
        return np.pad(array, extra, constant_values=-1)

    truth = {k: np.concatenate([pad(a) for a in v]) for k, v in truth.items()}
    found = predict_padded(model, np.concatenate(images), len(images[0]))
    return truth, found


def predict_padded(model, images, batch_size):
    """`model.predict` in batches of exactly `batch_size` (the last one
    padded, its extra outputs dropped).

    keras-hub's non-max suppression needs a static batch size, and Keras'
    predict function relaxes its input shape to `None` once it sees a
    second batch size (a short last batch): then it fails.
    """
    count = len(images)
    extra = (-count) % batch_size
    if extra:
        padding = np.zeros((extra, *images.shape[1:]), images.dtype)
        images = np.concatenate([images, padding])
    # keras-hub's predict runs the preprocessor and decodes (NMS).
    found = model.predict(images, batch_size=batch_size, verbose=0)
    return keras.tree.map_structure(lambda v: np.asarray(v)[:count], found)


def mean_iou(masks, predicted, num_classes):
    """Mean intersection over union of class-id masks (keras.metrics.MeanIoU).

    Args:
        masks: true class ids, `(n, h, w)` or `(n, h, w, 1)`.
        predicted: class ids of the same shape, or logits `(n, h, w, c)`.
        num_classes: number of classes, background included.
    """
    predicted = np.asarray(predicted)
    masks = np.asarray(masks).reshape(predicted.shape[:3])
    if predicted.ndim == 4 and predicted.shape[-1] == num_classes:
        predicted = predicted.argmax(-1)
    metric = keras.metrics.MeanIoU(num_classes)
    metric.update_state(masks.reshape(-1), predicted.reshape(-1))
    return float(metric.result())


class DetectionMetrics(keras.callbacks.Callback):
    """Adds COCO `val_map` and `val_map50` to the logs at each epoch's end.

    Put it before callbacks that read the logs (CSV logger, early
    stopping, checkpoints): Keras hands every callback the same logs.

    Args:
        data: a batched validation dataset of `(images, {"boxes",
            "labels"})`.
        num_classes: number of classes.
        every: evaluate every `every` epochs (and at the last epoch).
    """

    def __init__(self, data, num_classes, every=1):
        super().__init__()
        self.data = data
        self.num_classes = int(num_classes)
        self.every = int(every)

    def on_train_begin(self, logs=None):
        self.last = {}

    def on_epoch_end(self, epoch, logs=None):
        epochs = (self.params or {}).get("epochs")
        if (epoch + 1) % self.every and epoch + 1 != epochs:
            if logs is not None and self.last:
                logs.update(self.last)
            return
        truth, found = predict_detections(self.model, self.data)
        scores = coco_map(truth, found, self.num_classes)
        self.last = {"val_map": scores["map"], "val_map50": scores["map50"]}
        if logs is not None:
            logs.update(self.last)
