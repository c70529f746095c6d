"""`build_detector`: keras-hub's RetinaNet on a kft image encoder.

The model is a `keras_hub.models.RetinaNetObjectDetector` (feature
pyramid, focal loss, anchor matching, non-max suppression: keras-hub's)
that also records its `kft.anatomy.Anatomy`, so `kft.freeze`,
`kft.unfreeze(last_n_blocks=...)`, `kft.callbacks.GradualUnfreezing`,
discriminative rates, LoRA and the frozen BatchNorm policy treat its
encoder as they treat a classifier's backbone. Its preprocessor (a
keras-hub `RetinaNetObjectDetectorPreprocessor`) rescales raw pixels in
[0, 255] inside `fit`, `evaluate` and `predict`, and resizes boxes with
the images.

Boxes are `{"boxes": (batch, max_boxes, 4), "labels": (batch,
max_boxes)}` in `bounding_box_format` (default `"yxyx"`, pixels), padded
with label -1, as keras-hub and `kft.vision.detection_dataset` give them.
"""

import keras
import keras_hub

from kft.backbones.anatomy import Anatomy
from kft.backbones.anatomy import RecordsAnatomy
from kft.backbones.freezing import freeze
from kft.vision.encoder import ENCODER_NAME
from kft.vision.encoder import load_encoder

__all__ = ["Detector", "build_detector"]

BN_MODES = ("frozen", "train")


@keras.saving.register_keras_serializable(package="kft")
class Detector(RecordsAnatomy, keras_hub.models.RetinaNetObjectDetector):
    """A keras-hub RetinaNet that records its `kft.anatomy.Anatomy`.

    Args:
        anatomy: an `Anatomy` (or its config); kept in `get_config`, so it
            survives `model.save` / `keras.saving.load_model`.
        **kwargs: `keras_hub.models.RetinaNetObjectDetector` arguments.
    """

    # kft.fine_tune compiles it with loss="auto": the task's own losses.
    computes_own_loss = True

    def compile(self, optimizer="auto", loss="auto", metrics=None, **kwargs):
        """`RetinaNetObjectDetector.compile`, also taking `loss=`.

        Args:
            optimizer: as for `keras.Model.compile` (`"auto"`: Adam 5e-5).
            loss: `"auto"` (Huber for boxes, focal loss for classes) or a
                dict `{"bbox_regression": ..., "cls_logits": ...}`.
            metrics: must be None (keras-hub computes none in the graph;
                `kft.vision.metrics.DetectionMetrics` gives COCO mAP).
            **kwargs: passed on (`box_loss=`, `classification_loss=`, ...).
        """
        if isinstance(loss, dict):
            kwargs.setdefault("box_loss", loss.get("bbox_regression", "auto"))
            kwargs.setdefault("classification_loss",
                              loss.get("cls_logits", "auto"))
        elif loss != "auto":
            raise ValueError(
                "A detector's loss is 'auto' or a dict with keys "
                f"'bbox_regression' and 'cls_logits'. Received: loss={loss!r}")
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)



def _check(num_classes, bn, levels):
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) \
            or num_classes < 1:
        raise ValueError("num_classes must be an integer >= 1. Received: "
                         f"num_classes={num_classes!r}")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}. Received: bn={bn!r}")
    if (len(levels) != 2 or levels[0] > levels[1] or levels[0] < 2):
        raise ValueError("levels must be (min_level, max_level) with "
                         f"2 <= min_level <= max_level. Received: levels={levels}")


def _anchors_and_decoder(bounding_box_format, levels, anchor_size,
                         confidence_threshold):
    """keras-hub's anchor generator (3 scales, aspect ratios 1/2, 1, 2) and
    non-max suppression (IoU 0.5, up to 100 boxes)."""
    anchors = keras_hub.layers.AnchorGenerator(
        bounding_box_format, min_level=levels[0], max_level=levels[1],
        num_scales=3, aspect_ratios=[0.5, 1.0, 2.0], anchor_size=anchor_size)
    decoder = keras_hub.layers.NonMaxSuppression(
        bounding_box_format, from_logits=True, iou_threshold=0.5,
        confidence_threshold=float(confidence_threshold), max_detections=100)
    return anchors, decoder


def build_detector(
    backbone,
    num_classes,
    *,
    weights=True,
    image_size=(256, 256),
    levels=(3, 7),
    head_conv_layers=4,
    head_norm=True,
    anchor_size=4.0,
    confidence_threshold=0.05,
    bn="frozen",
    image_converter=None,
    bounding_box_format="yxyx",
    name=None,
):
    """Builds a RetinaNet object detector around a pretrained encoder.

    The encoder starts frozen (train the feature pyramid and heads first,
    then unfreeze its blocks), and with `bn="frozen"` its BatchNorm layers
    stay in inference mode whatever unfreezes, as in `kft.build_classifier`.

    Args:
        backbone: a keras-hub image backbone with a feature pyramid: a
            preset name, an `hf://` address, a local directory, a short
            name of `kft.backbones.image_presets.IMAGE_PRESETS`
            (`"efficientnet_lite0_imagenet"`), or a
            `keras_hub.models.FeaturePyramidBackbone`.
        num_classes: number of object classes (no background class).
        weights: True: the preset's weights; False: the same architecture
            with random weights (the "from scratch" baseline). Ignored for
            an instance.
        image_size: `(height, width)` of the model's input.
        levels: `(min_level, max_level)` of the feature pyramid; levels
            above the encoder's last come from extra convolutions.
        head_conv_layers: convolutions (256 filters) in each prediction
            head before its output; keras-hub's default is 4.
        head_norm: batch norm in the feature pyramid, group norm in the
            heads (keras-hub's `use_fpn_batch_norm`,
            `use_prediction_head_norm`). Without them, fresh heads on an
            EfficientNet's 1280-channel top level start at a loss near 900.
        anchor_size: anchors at level `l` have side `anchor_size * 2**l`
            pixels (times 1, 2^(1/3), 2^(2/3); aspect ratios 1/2, 1, 2).
            With the default 4, level 3 anchors are 32 pixels: lower it
            for smaller objects (a box matches an anchor at IoU >= 0.5).
        confidence_threshold: `predict` keeps detections scoring at least
            this (COCO evaluations use 0.05; keras-hub's default 0.5 hides
            a young detector's boxes from mAP).
        bn: `"frozen"` or `"train"`, as in `kft.build_classifier`.
        image_converter: a `keras_hub.layers.RetinaNetImageConverter`;
            default: the preset's scale and offset (1/255 without one).
        bounding_box_format: the boxes' format in the data and predictions.
        name: the model's name.

    Returns:
        A `kft.vision.Detector` with its encoder frozen.

    Example:

    >>> model = build_detector("efficientnet_lite0_imagenet", 10,
    ...                        image_size=(128, 128))  # doctest: +SKIP
    >>> kft.describe(model).family  # doctest: +SKIP
    'EfficientNetBackbone'
    """
    levels = tuple(int(v) for v in levels)
    _check(num_classes, bn, levels)
    size = tuple(int(v) for v in image_size)
    spec = load_encoder(backbone, weights=weights, image_size=size)

    # === Layers ===
    freeze(spec.encoder)
    pyramid = keras_hub.models.RetinaNetBackbone(
        image_encoder=spec.encoder, min_level=levels[0], max_level=levels[1],
        use_p5=True, use_fpn_batch_norm=bool(head_norm), image_shape=(*size, 3))
    converter = image_converter or keras_hub.layers.RetinaNetImageConverter(
        image_size=size, scale=spec.scale if spec.scale is not None else 1 / 255,
        offset=spec.offset, bounding_box_format=bounding_box_format)
    preprocessor = keras_hub.models.RetinaNetObjectDetectorPreprocessor(
        image_converter=converter)
    anchors, decoder = _anchors_and_decoder(
        bounding_box_format, levels, anchor_size, confidence_threshold)

    # === Config ===
    anatomy = Anatomy(task="object_detector", backbone=ENCODER_NAME,
                      family=type(spec.encoder).__name__,
                      head_kind="multilabel", logits=True, batch_norm=bn)

    # === Functional Model ===
    return Detector(
        backbone=pyramid, num_classes=num_classes, preprocessor=preprocessor,
        bounding_box_format=bounding_box_format, anchor_generator=anchors,
        prediction_decoder=decoder,
        pre_logits_num_conv_layers=int(head_conv_layers),
        use_prediction_head_norm=bool(head_norm), anatomy=anatomy,
        name=name or f"{type(spec.encoder).__name__.lower()}_detector")
