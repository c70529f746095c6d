"""Tiny encoders and scenes shared by the vision tests."""

import keras_hub
import numpy as np
from PIL import Image

SIZE = 64


def tiny_encoder(size=SIZE):
    """A 4-stage keras-hub EfficientNet (pyramid P1..P5), a few k weights."""
    n = 4
    return keras_hub.models.EfficientNetBackbone(
        stackwise_kernel_sizes=[3] * n, stackwise_num_repeats=[1] * n,
        stackwise_input_filters=[8, 8, 8, 16],
        stackwise_output_filters=[8, 8, 16, 16],
        stackwise_expansion_ratios=[1, 2, 2, 2], stackwise_strides=[2, 2, 2, 2],
        stackwise_block_types=["v1"] * n,
        stackwise_squeeze_and_excite_ratios=[0] * n,
        stackwise_width_coefficients=[1.0] * n,
        stackwise_depth_coefficients=[1.0] * n, min_depth=None,
        include_stem_padding=True, use_depth_divisor_as_min_depth=True,
        cap_round_filter_decrease=True, stem_conv_padding="valid",
        batch_norm_momentum=0.9, batch_norm_epsilon=1e-5, dropout=0,
        projection_activation=None, activation="relu6", top_conv_filters=32,
        input_shape=(size, size, 3))


def toy_garments(n=60, classes=3, seed=0):
    """28x28 'garments': class c is a filled rectangle of aspect c."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), "uint8")
    labels = np.arange(n) % classes
    for i, c in enumerate(labels):
        h, w = [(24, 10), (10, 24), (18, 18)][c % 3]
        images[i, 14 - h // 2:14 + h // 2, 14 - w // 2:14 + w // 2] = \
            rng.integers(150, 255)
    return images, labels.astype("uint8")


def background_files(folder, count=2, seed=0):
    """`count` noise 'photos' written as PNG files."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"photo_{i}.png"
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype="uint8")).save(path)
        paths.append(str(path))
    return paths
