"""Data augmentation: ImageDataGenerator semantics on tf.data."""

from kft.augment.image import ImageAugmentation
from kft.augment.image import ImageAugmentationLayer

__all__ = ["ImageAugmentation", "ImageAugmentationLayer"]
