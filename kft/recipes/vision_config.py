"""The recipe's `vision:` section and the detection / segmentation data
sources (Keras-free: `kft validate` checks them without TensorFlow)."""

from typing import Literal

from pydantic import Field

from kft.utils.validation import Strict

__all__ = ["BoxAugmentationConfig", "ScenesConfig", "VISION_SOURCES",
           "VisionConfig", "check_vision"]

# fashion_scenes: kft.vision.synthetic (garments on real photos); the
# others read annotation files (kft.vision.annotations).
VISION_SOURCES = ("fashion_scenes", "coco", "voc", "yolo", "mask_folder")
_DETECTION_SOURCES = ("fashion_scenes", "coco", "voc", "yolo")
_SEGMENTATION_SOURCES = ("fashion_scenes", "mask_folder")


class ScenesConfig(Strict):
    """`vision.scenes`: the `fashion_scenes` source
    (`kft.vision.synthetic.fashion_scenes`): `train` / `val` image counts,
    garments per image, a garment's side as a fraction of the image's."""

    train: int = Field(default=1000, ge=1)
    val: int = Field(default=200, ge=1)
    objects: tuple[int, int] = (1, 3)
    scale: tuple[float, float] = (0.25, 0.55)


class BoxAugmentationConfig(Strict):
    """`vision.augment`: `kft.vision.BoxAugmentation` arguments (boxes and
    masks move with the pixels)."""

    horizontal_flip: bool = True
    vertical_flip: bool = False
    zoom_range: float = Field(default=0.0, ge=0, lt=1)
    shift_range: float = Field(default=0.0, ge=0, lt=1)
    brightness_range: float = Field(default=0.0, ge=0, le=1)
    contrast_range: float = Field(default=0.0, ge=0, le=1)
    min_box_size: float = Field(default=2.0, ge=0)


class VisionConfig(Strict):
    """`vision:` object detection (`task: detect`, keras-hub RetinaNet via
    `kft.vision.build_detector`) or semantic segmentation (`task: segment`,
    DeepLabV3+ via `kft.vision.build_segmenter`) on `model.preset`'s
    encoder at `model.image_size`.

    `class_names`: the classes of `voc` / `yolo` data (COCO files and
    `fashion_scenes` name their own); for `mask_folder`, the names of
    mask values 0 (background), 1, ... `levels`, `head_conv_layers`,
    `anchor_size`: the detector's; `pooling_level`: the segmenter's.
    `augment`: box- and mask-aware augmentation of the training batches
    (null: none). `map_every`: COCO mAP on the validation data every this
    many epochs (`val_map`, `val_map50` in `history.csv`).
    """

    task: Literal["detect", "segment"]
    class_names: list[str] | None = None
    scenes: ScenesConfig = ScenesConfig()
    augment: BoxAugmentationConfig | None = BoxAugmentationConfig()
    levels: tuple[int, int] = (3, 7)
    head_conv_layers: int = Field(default=4, ge=1)
    anchor_size: float = Field(default=4.0, gt=0)
    pooling_level: int = Field(default=4, ge=2, le=5)
    map_every: int = Field(default=1, ge=1)


def check_vision(recipe):
    """Cross-section rules of a vision recipe; a `ValueError` naming the
    keys otherwise."""
    source = recipe.data.source
    vision = recipe.vision
    if vision is None:
        if source in VISION_SOURCES:
            raise ValueError(f"data.source {source!r} feeds a detection or "
                             "segmentation model: add a vision: section")
        return
    allowed = (_DETECTION_SOURCES if vision.task == "detect"
               else _SEGMENTATION_SOURCES)
    if source not in allowed:
        raise ValueError(f"vision.task {vision.task!r} trains on data.source "
                         f"one of {list(allowed)}; received {source!r}")
    if recipe.model.preset is None:
        raise ValueError("vision: needs model.preset (a keras-hub image "
                         "backbone with a feature pyramid, e.g. "
                         "efficientnet_lite0_imagenet)")
    if recipe.augmentation is not None:
        raise ValueError("augmentation: does not move boxes or masks; give "
                         "vision.augment instead")
    if source in ("voc", "yolo", "mask_folder") and not vision.class_names:
        raise ValueError(f"data.source {source!r} needs vision.class_names")
    if source in ("coco", "voc", "yolo", "mask_folder") and not recipe.data.data_dir:
        raise ValueError(f"data.source {source!r} needs data.data_dir (the "
                         "image folder)")
    if recipe.prompt_tuning is not None:
        raise ValueError("prompt_tuning: adapts text models, not vision:")
