"""kft: fine-tune pretrained Keras models with plain `model.fit`."""

import os

# Keep TensorFlow's C++ start-up chatter out of user output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kft import augment  # noqa: E402
from kft import backbones  # noqa: E402
from kft import callbacks  # noqa: E402
from kft import data  # noqa: E402
from kft import distribute  # noqa: E402
from kft import heads  # noqa: E402
from kft import lora  # noqa: E402
from kft import optimizers  # noqa: E402
from kft import prompt  # noqa: E402
from kft import report  # noqa: E402
from kft.backbones import backbone_blocks  # noqa: E402
from kft.backbones import list_backbones  # noqa: E402
from kft.backbones import register_backbone  # noqa: E402
from kft.callbacks import lr_find  # noqa: E402
from kft.compare import compare  # noqa: E402
from kft.finetune import Stage  # noqa: E402
from kft.finetune import fine_tune  # noqa: E402
from kft.freezing import format_trainable_summary  # noqa: E402
from kft.freezing import freeze  # noqa: E402
from kft.freezing import trainable_summary  # noqa: E402
from kft.freezing import unfreeze  # noqa: E402
from kft.models import build_classifier  # noqa: E402
from kft.preprocessing import ImagePreprocessing  # noqa: E402
from kft.text import build_text_classifier  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ImagePreprocessing",
    "Stage",
    "augment",
    "backbone_blocks",
    "backbones",
    "build_classifier",
    "build_text_classifier",
    "callbacks",
    "compare",
    "data",
    "distribute",
    "fine_tune",
    "format_trainable_summary",
    "freeze",
    "heads",
    "list_backbones",
    "lora",
    "lr_find",
    "optimizers",
    "prompt",
    "register_backbone",
    "report",
    "trainable_summary",
    "unfreeze",
]
