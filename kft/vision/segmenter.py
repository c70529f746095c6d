"""`build_segmenter`: keras-hub's DeepLabV3+ on a kft image encoder.

The model is a `keras_hub.models.DeepLabV3ImageSegmenter` (atrous
spatial pyramid pooling on one pyramid level, a low-level decoder branch,
per-pixel logits: keras-hub's) that also records its
`kft.anatomy.Anatomy`, so freezing, gradual unfreezing, per-block rates,
LoRA and the BatchNorm policy treat its encoder as a classifier's
backbone. Its preprocessor rescales raw pixels in [0, 255] inside `fit`,
`evaluate` and `predict`.

Masks are `(batch, height, width, 1)` integer class ids, 0 the
background, as `kft.vision.segmentation_dataset` gives them.
"""

import keras
import keras_hub

from kft.backbones.anatomy import Anatomy
from kft.backbones.anatomy import RecordsAnatomy
from kft.backbones.freezing import freeze
from kft.vision.detector import BN_MODES
from kft.vision.encoder import ENCODER_NAME
from kft.vision.encoder import load_encoder

__all__ = ["Segmenter", "build_segmenter"]


@keras.saving.register_keras_serializable(package="kft")
class Segmenter(RecordsAnatomy, keras_hub.models.DeepLabV3ImageSegmenter):
    """A keras-hub DeepLabV3 segmenter that records its `Anatomy` and
    reports mean IoU.

    Args:
        anatomy: an `Anatomy` (or its config), kept in `get_config`.
        **kwargs: `keras_hub.models.DeepLabV3ImageSegmenter` arguments.
    """

    # kft.fine_tune compiles it with loss="auto": the task's own losses.
    computes_own_loss = True

    def compile(self, optimizer="auto", loss="auto", metrics="auto", **kwargs):
        """`DeepLabV3ImageSegmenter.compile`; `metrics="auto"` (or None):
        pixel accuracy and `keras.metrics.MeanIoU` over all classes, so
        `history.csv` has `mean_iou` / `val_mean_iou`.

        Args:
            optimizer: as for `keras.Model.compile`.
            loss: `"auto"`: sparse categorical cross-entropy (masks of
                class ids), or any Keras loss.
            metrics: `"auto"`, None (the same) or a list of metrics.
            **kwargs: passed to `keras.Model.compile`.
        """
        # keras-hub's Task.__init__ compiles before num_classes is set.
        num_classes = getattr(self, "num_classes", None)
        if loss == "auto":
            # kft's masks hold class ids (keras-hub's "auto" expects one-hot).
            loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=getattr(self, "activation", None) in (None, "linear"))
        if metrics in ("auto", None) and num_classes:
            metrics = [
                keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                keras.metrics.MeanIoU(num_classes, sparse_y_true=True,
                                      sparse_y_pred=False, name="mean_iou"),
            ]
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics,
                        **kwargs)



def _pooling_levels(available, pooling_level):
    """(pooling key, low-level key or None, upsampling size)."""
    if pooling_level not in available:
        raise ValueError(f"pooling_level={pooling_level} is not a level of the "
                         f"encoder's pyramid {available}.")
    low = 2 if 2 in available and pooling_level > 2 else None
    upsampling = 2 ** (pooling_level - low) if low else 2 ** pooling_level
    return f"P{pooling_level}", (f"P{low}" if low else None), upsampling


def build_segmenter(
    backbone,
    num_classes,
    *,
    weights=True,
    image_size=(256, 256),
    pooling_level=4,
    dilation_rates=(6, 12, 18),
    bn="frozen",
    image_converter=None,
    name=None,
):
    """Builds a DeepLabV3+ semantic segmenter around a pretrained encoder.

    The encoder starts frozen; with `bn="frozen"` its BatchNorm layers stay
    in inference mode whatever unfreezes.

    Args:
        backbone: as for `kft.vision.build_detector`: a keras-hub image
            backbone with a feature pyramid (preset, directory,
            `"efficientnet_lite0_imagenet"`, or an instance).
        num_classes: number of classes, background (id 0) included.
        weights: True: the preset's weights; False: random weights.
        image_size: `(height, width)` of the model's input.
        pooling_level: the pyramid level the atrous pooling reads (4: 16x
            smaller than the image); level 2, when the encoder has it,
            feeds the decoder.
        dilation_rates: the atrous pooling's dilation rates.
        bn: `"frozen"` or `"train"`, as in `kft.build_classifier`.
        image_converter: a `keras_hub.layers.DeepLabV3ImageConverter`;
            default: the preset's scale and offset (1/255 without one).
        name: the model's name.

    Returns:
        A `kft.vision.Segmenter` with its encoder frozen; its outputs are
        per-pixel logits `(batch, height, width, num_classes)`.

    Example:

    >>> model = build_segmenter("efficientnet_lite0_imagenet", 11,
    ...                         image_size=(128, 128))  # doctest: +SKIP
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) \
            or num_classes < 2:
        raise ValueError("num_classes (background included) must be an "
                         f"integer >= 2. Received: num_classes={num_classes!r}")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}. Received: bn={bn!r}")
    size = tuple(int(v) for v in image_size)
    spec = load_encoder(backbone, weights=weights, image_size=size)
    pooling, low, upsampling = _pooling_levels(spec.levels, int(pooling_level))

    # === Layers ===
    freeze(spec.encoder)
    decoder = keras_hub.models.DeepLabV3Backbone(
        image_encoder=spec.encoder, spatial_pyramid_pooling_key=pooling,
        upsampling_size=upsampling, dilation_rates=list(dilation_rates),
        low_level_feature_key=low, image_shape=(*size, 3))
    converter = image_converter or keras_hub.layers.DeepLabV3ImageConverter(
        image_size=size, scale=spec.scale if spec.scale is not None else 1 / 255,
        offset=spec.offset)
    preprocessor = keras_hub.models.DeepLabV3ImageSegmenterPreprocessor(
        image_converter=converter)

    # === Config ===
    anatomy = Anatomy(task="image_segmenter", backbone=ENCODER_NAME,
                      family=type(spec.encoder).__name__,
                      head_kind="multiclass", logits=True, batch_norm=bn)

    # === Functional Model ===
    return Segmenter(
        backbone=decoder, num_classes=num_classes, preprocessor=preprocessor,
        anatomy=anatomy,
        name=name or f"{type(spec.encoder).__name__.lower()}_segmenter")
