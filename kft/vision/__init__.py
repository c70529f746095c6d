"""Object detection and semantic segmentation fine-tuning.

`build_detector` (keras-hub RetinaNet) and `build_segmenter` (keras-hub
DeepLabV3+) put a pretrained keras-hub image encoder (a feature pyramid)
under a task head and record the model's anatomy, so kft's freezing,
unfreezing, rates, LoRA and BatchNorm policy work as for classifiers.
Around them: annotation readers (`kft.vision.annotations`), `tf.data`
pipelines with box- and mask-aware augmentation, an offline task built
from real images (`kft.vision.synthetic`) and COCO mAP / mean IoU
(`kft.vision.metrics`).
"""

from kft.vision.annotations import AnnotationError
from kft.vision.annotations import read_coco
from kft.vision.annotations import read_masks
from kft.vision.annotations import read_voc
from kft.vision.annotations import read_yolo
from kft.vision.augment import BoxAugmentation
from kft.vision.data import detection_dataset
from kft.vision.data import segmentation_dataset
from kft.vision.detector import Detector
from kft.vision.detector import build_detector
from kft.vision.encoder import load_encoder
from kft.vision.metrics import DetectionMetrics
from kft.vision.metrics import coco_map
from kft.vision.metrics import mean_iou
from kft.vision.segmenter import Segmenter
from kft.vision.segmenter import build_segmenter
from kft.vision.synthetic import fashion_scenes

__all__ = [
    "AnnotationError",
    "BoxAugmentation",
    "DetectionMetrics",
    "Detector",
    "Segmenter",
    "build_detector",
    "build_segmenter",
    "coco_map",
    "detection_dataset",
    "fashion_scenes",
    "load_encoder",
    "mean_iou",
    "read_coco",
    "read_masks",
    "read_voc",
    "read_yolo",
    "segmentation_dataset",
]
