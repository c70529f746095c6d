"""Data augmentation: ImageDataGenerator semantics on tf.data, text, audio."""

from kft.augment.audio import AudioAugmentation
from kft.augment.audio import AudioAugmentationLayer
from kft.augment.audio import SpecAugment
from kft.augment.image import ImageAugmentation
from kft.augment.image import ImageAugmentationLayer
from kft.augment.text import TextAugmentation
from kft.augment.text import WordNet

__all__ = [
    "AudioAugmentation",
    "AudioAugmentationLayer",
    "ImageAugmentation",
    "ImageAugmentationLayer",
    "SpecAugment",
    "TextAugmentation",
    "WordNet",
]
