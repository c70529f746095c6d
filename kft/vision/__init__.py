"""Object detection and semantic segmentation fine-tuning.

`build_detector` (keras-hub RetinaNet) and `build_segmenter` (keras-hub
DeepLabV3+) put a pretrained keras-hub image encoder (a feature pyramid)
under a task head and record the model's anatomy, so kft's freezing,
unfreezing, rates, LoRA and BatchNorm policy work as for classifiers.
"""

from kft.vision.detector import Detector
from kft.vision.detector import build_detector
from kft.vision.encoder import load_encoder
from kft.vision.segmenter import Segmenter
from kft.vision.segmenter import build_segmenter

__all__ = [
    "Detector",
    "Segmenter",
    "build_detector",
    "build_segmenter",
    "load_encoder",
]
