"""ImageDataGenerator semantics, as batched Keras preprocessing on tf.data.

`keras.preprocessing.image.ImageDataGenerator` is gone from Keras 3 and
ran per image in NumPy. `ImageAugmentation` keeps its argument names and
meanings and runs them as Keras preprocessing layers on whole batches,
inside a model or in a `tf.data` pipeline.
"""


import keras
import numpy as np
import tensorflow as tf

from kft.augment.image_layers import RandomAffine
from kft.augment.image_layers import RandomBrightnessScale
from kft.augment.image_layers import RandomChannelShift
from kft.data.images import scan_image_folder

__all__ = ["ImageAugmentation", "ImageAugmentationLayer"]

FILL_MODES = ("nearest", "constant", "reflect", "wrap")
CLASS_MODES = ("categorical", "binary", "sparse", "input", None)
_AUTOTUNE = tf.data.AUTOTUNE


def _shift_factor(value, size, name):
    """Legacy shift (fraction < 1, or pixels >= 1) -> fraction of size."""
    if isinstance(value, (list, tuple)):
        # Legacy: a random choice of these values, in pixels unless all of
        # them are fractions (< 1 in size).
        if not value:
            raise ValueError(f"{name} must not be an empty list.")
        choices = [float(v) for v in value]
        if max(abs(v) for v in choices) >= 1:
            choices = [v / size for v in choices]
        return tuple(choices)
    value = float(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0. Received: {value}")
    return value / size if value >= 1 else value


def _zoom_bounds(zoom_range):
    if isinstance(zoom_range, (int, float)):
        if zoom_range < 0:
            raise ValueError(f"zoom_range must be >= 0. Received: {zoom_range}")
        return 1.0 - zoom_range, 1.0 + zoom_range
    if isinstance(zoom_range, (list, tuple)) and len(zoom_range) == 2:
        return float(zoom_range[0]), float(zoom_range[1])
    raise ValueError(
        "zoom_range must be a float or a pair [lower, upper]. Received: "
        f"zoom_range={zoom_range!r}")


@keras.saving.register_keras_serializable(package="kft")
class ImageAugmentationLayer(keras.layers.Layer):
    """The Keras layer behind `ImageAugmentation.layer()`.

    Random transforms run only with `training=True`; `rescale` and the
    featurewise normalisation always run (the legacy `standardize`).
    Takes the same arguments as `ImageAugmentation` (plus the featurewise
    `mean` and `std` that `ImageAugmentation.fit` computes).
    """

    def __init__(self, rotation_range=0.0, width_shift_range=0.0,
                 height_shift_range=0.0, brightness_range=None, shear_range=0.0,
                 zoom_range=0.0, channel_shift_range=0.0, fill_mode="nearest",
                 cval=0.0, horizontal_flip=False, vertical_flip=False,
                 rescale=None, mean=None, std=None, rand_augment=None, seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        if rand_augment is True:
            rand_augment = {}
        if rand_augment is not None and not isinstance(rand_augment, dict):
            raise ValueError(
                "rand_augment must be None, True or a dict of "
                "keras.layers.RandAugment arguments (num_ops, factor). "
                f"Received: rand_augment={rand_augment!r}")
        self.rand_augment = rand_augment
        if fill_mode not in FILL_MODES:
            raise ValueError(
                f"fill_mode must be one of {FILL_MODES}. Received: "
                f"fill_mode={fill_mode!r}")
        if brightness_range is not None:
            if (not isinstance(brightness_range, (list, tuple))
                    or len(brightness_range) != 2
                    or not 0 <= brightness_range[0] <= brightness_range[1]):
                raise ValueError(
                    "brightness_range must be a pair [low, high] with 0 <= low "
                    f"<= high. Received: brightness_range={brightness_range!r}")
            brightness_range = [float(b) for b in brightness_range]
        for name, value in (("rotation_range", rotation_range),
                            ("shear_range", shear_range),
                            ("channel_shift_range", channel_shift_range)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0. Received: {value!r}")
        _zoom_bounds(zoom_range)
        self.rotation_range = float(rotation_range)
        self.width_shift_range = width_shift_range
        self.height_shift_range = height_shift_range
        self.brightness_range = brightness_range
        self.shear_range = float(shear_range)
        self.zoom_range = zoom_range
        self.channel_shift_range = float(channel_shift_range)
        self.fill_mode = fill_mode
        self.cval = float(cval)
        self.horizontal_flip = bool(horizontal_flip)
        self.vertical_flip = bool(vertical_flip)
        self.rescale = rescale
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(s) for s in std]
        self.seed = seed

    def _seed(self, offset):
        return None if self.seed is None else self.seed + offset

    def build(self, input_shape):
        height, width = input_shape[1], input_shape[2]
        self._random = []
        height_factor = _shift_factor(self.height_shift_range, height,
                                      "height_shift_range")
        width_factor = _shift_factor(self.width_shift_range, width,
                                     "width_shift_range")
        zoom = _zoom_bounds(self.zoom_range)
        if (self.rotation_range or height_factor or width_factor
                or self.shear_range or zoom != (1.0, 1.0)
                or self.horizontal_flip or self.vertical_flip):
            self._random.append(RandomAffine(
                rotation=self.rotation_range, shift=(height_factor, width_factor),
                shear=self.shear_range, zoom=zoom,
                horizontal_flip=self.horizontal_flip,
                vertical_flip=self.vertical_flip, fill_mode=self.fill_mode,
                fill_value=self.cval, seed=self._seed(1)))
        if self.brightness_range:
            self._random.append(RandomBrightnessScale(
                *self.brightness_range, seed=self._seed(6)))
        if self.channel_shift_range:
            self._random.append(RandomChannelShift(
                self.channel_shift_range, seed=self._seed(7)))
        if self.rand_augment is not None:
            self._random.append(keras.layers.RandAugment(
                value_range=(0, 255), seed=self._seed(8), **self.rand_augment))
        for layer in self._random:
            layer.build(input_shape)

    @property
    def stateless(self):
        """Whether every random transform can draw from a per-call seed
        (RandAugment draws from its own generator)."""
        return self.rand_augment is None

    def call(self, images, training=None, seed=None):
        """`seed`: an optional `(2,)` int32 tensor; the random draws then
        come from it (stateless), not from the layers' generators."""
        images = keras.ops.cast(images, self.compute_dtype)
        if training:
            for number, layer in enumerate(self._random):
                if seed is None or isinstance(layer, keras.layers.RandAugment):
                    images = layer(images, training=True)
                else:
                    images = layer(images, training=True,
                                   seed=seed + tf.constant([1000 * number, 0],
                                                           tf.int32))
        if self.rescale:
            images = images * self.rescale
        if self.mean is not None:
            images = images - keras.ops.convert_to_tensor(self.mean, self.compute_dtype)
        if self.std is not None:
            images = images / (keras.ops.convert_to_tensor(
                self.std, self.compute_dtype) + 1e-6)
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({
            "rotation_range": self.rotation_range,
            "width_shift_range": self.width_shift_range,
            "height_shift_range": self.height_shift_range,
            "brightness_range": self.brightness_range,
            "shear_range": self.shear_range,
            "zoom_range": self.zoom_range,
            "channel_shift_range": self.channel_shift_range,
            "fill_mode": self.fill_mode,
            "cval": self.cval,
            "horizontal_flip": self.horizontal_flip,
            "vertical_flip": self.vertical_flip,
            "rescale": self.rescale,
            "mean": self.mean,
            "std": self.std,
            "rand_augment": self.rand_augment,
            "seed": self.seed,
        })
        return config


class ImageAugmentation:
    """`ImageDataGenerator`'s arguments, on batched `tf.data` pipelines.

    Args:
        rotation_range: degrees; each image turns by a uniform angle in
            `[-rotation_range, rotation_range]`.
        width_shift_range: a fraction of the size (< 1) or a number of
            pixels (>= 1), or a list of values to choose from (pixels, or
            fractions when all are < 1).
        height_shift_range: as `width_shift_range`.
        brightness_range: `[low, high]`: each image is multiplied by a
            factor in that range (the legacy meaning;
            `keras.layers.RandomBrightness` adds an offset instead).
        shear_range: shear angle in degrees.
        zoom_range: a float `z` for `[1 - z, 1 + z]`, or `[lower, upper]`;
            factors above 1 zoom out, as in the legacy class.
        channel_shift_range: each image gets one intensity in
            `[-range, range]` added to all channels.
        fill_mode: `"nearest"`, `"constant"`, `"reflect"` or `"wrap"`.
        cval: the fill value for `"constant"`.
        horizontal_flip: random horizontal flips.
        vertical_flip: random vertical flips.
        rescale: multiply by this after the random transforms.
        featurewise_center: subtract the data set's per-channel mean;
            call `fit(x)` first.
        featurewise_std_normalization: divide by the data set's
            per-channel std; call `fit(x)` first.
        validation_split: share held out for `subset="validation"`.
        seed: seed for the transforms, the split and the shuffling; the
            same seed gives the same augmented stream.
        mixup: MixUp's `alpha` (`keras.layers.MixUp`): `flow` and
            `flow_from_directory` mix pairs of images and their one-hot
            labels (integer labels are one-hot encoded).
        cutmix: CutMix's `factor` (`keras.layers.CutMix`), likewise.
        rand_augment: `True` or a dict of `keras.layers.RandAugment`
            arguments (`num_ops`, `factor`).

    Example:

    ```python
    augmentation = kft.augment.ImageAugmentation(
        rotation_range=20, width_shift_range=0.2, height_shift_range=0.2,
        horizontal_flip=True, brightness_range=[0.8, 1.2])
    train = augmentation.flow_from_directory("data/train", target_size=(224, 224),
                                             class_mode="sparse")
    # or inside a model, active only while training:
    x = augmentation.layer()(inputs)
    ```
    """

    def __init__(self, rotation_range=0, width_shift_range=0.0,
                 height_shift_range=0.0, zoom_range=0.0, shear_range=0.0,
                 horizontal_flip=False, vertical_flip=False,
                 brightness_range=None, channel_shift_range=0.0,
                 fill_mode="nearest", cval=0.0, rescale=None,
                 featurewise_center=False, featurewise_std_normalization=False,
                 validation_split=0.0, seed=None, mixup=None, cutmix=None,
                 rand_augment=None):
        if not 0.0 <= validation_split < 1.0:
            raise ValueError(
                "validation_split must be in [0, 1). Received: "
                f"validation_split={validation_split}")
        self.transform_args = dict(
            rotation_range=rotation_range, width_shift_range=width_shift_range,
            height_shift_range=height_shift_range, zoom_range=zoom_range,
            shear_range=shear_range, horizontal_flip=horizontal_flip,
            vertical_flip=vertical_flip, brightness_range=brightness_range,
            channel_shift_range=channel_shift_range, fill_mode=fill_mode,
            cval=cval, rescale=rescale, rand_augment=rand_augment)
        for name, value in (("mixup", mixup), ("cutmix", cutmix)):
            if value is not None and (not isinstance(value, (int, float))
                                      or value <= 0):
                raise ValueError(
                    f"{name} must be None or a positive number (the Beta "
                    f"distribution's parameter). Received: {name}={value!r}")
        self.mixup, self.cutmix = mixup, cutmix
        # Check the arguments now, not at the first batch.
        ImageAugmentationLayer(**self.transform_args)
        self.featurewise_center = featurewise_center
        self.featurewise_std_normalization = featurewise_std_normalization
        self.validation_split = validation_split
        self.seed = seed
        self.mean = None
        self.std = None
        self.class_indices = None

    def fit(self, x):
        """Computes the per-channel mean and std for featurewise options."""
        x = np.asarray(x, dtype="float64")
        if x.ndim == 3:
            x = x[..., None]
        if self.transform_args["rescale"]:
            x = x * self.transform_args["rescale"]
        self.mean = x.mean(axis=(0, 1, 2)).tolist()
        self.std = x.std(axis=(0, 1, 2)).tolist()
        return self

    def layer(self, name="image_augmentation"):
        """A Keras layer applying these transforms (random ones only when
        `training=True`), usable inside a model or in `tf.data`."""
        if (self.featurewise_center or self.featurewise_std_normalization) \
                and self.mean is None:
            raise ValueError(
                "featurewise_center / featurewise_std_normalization need the "
                "data statistics: call .fit(x) first.")
        return ImageAugmentationLayer(
            **self.transform_args,
            mean=self.mean if self.featurewise_center else None,
            std=self.std if self.featurewise_std_normalization else None,
            seed=self.seed, name=name)

    def _pipeline(self, ds, batch_size, shuffle, seed, size, augment=True,
                  num_classes=None, batched=False):
        layer = self.layer()
        if not batched:
            if shuffle:
                ds = ds.shuffle(size, seed=seed, reshuffle_each_iteration=True)
            ds = ds.batch(batch_size)
        mixers = []
        if augment and self.mixup:
            mixers.append(keras.layers.MixUp(alpha=self.mixup, seed=seed))
        if augment and self.cutmix:
            mixers.append(keras.layers.CutMix(factor=self.cutmix, seed=seed))

        def apply(x, *rest, seed=None):
            x = layer(tf.cast(x, tf.float32), training=augment, seed=seed)
            if mixers and rest:
                labels = rest[0]
                if labels.shape.rank == 1:
                    labels = tf.one_hot(tf.cast(labels, tf.int32), num_classes)
                data = {"images": x, "labels": tf.cast(labels, tf.float32)}
                for mixer in mixers:
                    data = mixer(data, training=True)
                x, rest = data["images"], (data["labels"], *rest[1:])
            return (x, *rest) if rest else x

        seed = self.seed if seed is None else seed
        if seed is None:
            return ds.map(apply, num_parallel_calls=_AUTOTUNE).prefetch(_AUTOTUNE)
        if mixers or not layer.stateless:
            # Keras' MixUp / CutMix / RandAugment draw from their own
            # generators: one batch after another keeps the stream
            # reproducible.
            return ds.map(apply).prefetch(_AUTOTUNE)
        # A seeded stream of per-batch seeds (new each epoch): batches are
        # augmented in parallel and the result is still reproducible.
        seeds = tf.data.Dataset.random(
            seed=seed, rerandomize_each_iteration=True).batch(2).map(
            lambda s: tf.cast(s % (2 ** 31 - 1), tf.int32))

        def apply_seeded(batch, batch_seed):
            parts = batch if isinstance(batch, tuple) else (batch,)
            return apply(*parts, seed=batch_seed)

        return (tf.data.Dataset.zip((ds, seeds))
                .map(apply_seeded, num_parallel_calls=_AUTOTUNE, deterministic=True)
                .prefetch(_AUTOTUNE))

    def _split(self, n, subset, seed, validation_split=None):
        if validation_split is None:
            validation_split = self.validation_split
        if subset is None:
            return np.arange(n)
        if subset not in ("training", "validation"):
            raise ValueError(
                f"subset must be None, 'training' or 'validation'. Received: "
                f"subset={subset!r}")
        if not validation_split:
            raise ValueError(
                f"subset={subset!r} needs validation_split > 0 (in "
                "ImageAugmentation(...) or flow_from_directory(...)).")
        split = int(round(n * validation_split))
        # Legacy: the validation subset is the first share of the data.
        return np.arange(split) if subset == "validation" else np.arange(split, n)

    def flow(self, x, y=None, batch_size=32, shuffle=True, seed=None,
             subset=None):
        """Augmented batches of `x` (and `y`), as a `tf.data.Dataset`.

        Labels stay paired with their images through shuffling.
        """
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(
                f"x must be a batch of images (N, H, W, C). Received shape "
                f"{x.shape}")
        index = self._split(len(x), subset, seed)
        x = x[index]
        parts = (x,) if y is None else (x, np.asarray(y)[index])
        if y is not None and len(parts[1]) != len(x):
            raise ValueError(f"x and y differ in length: {len(x)} and {len(parts[1])}")
        seed = self.seed if seed is None else seed
        # Shuffle indices and gather whole batches: much faster than
        # slicing the arrays image by image.
        tensors = tuple(tf.constant(p) for p in parts)
        ds = tf.data.Dataset.range(len(x))
        if shuffle:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size).map(
            lambda i: tuple(tf.gather(t, i) for t in tensors)
            if y is not None else tf.gather(tensors[0], i))
        num_classes = None
        if y is not None and (self.mixup or self.cutmix):
            labels = parts[1]
            num_classes = (labels.shape[-1] if labels.ndim == 2
                           else int(labels.max()) + 1)
        return self._pipeline(ds, batch_size, shuffle, seed, len(x),
                              augment=subset != "validation",
                              num_classes=num_classes, batched=True)

    def flow_from_directory(self, directory, target_size=(256, 256),
                            color_mode="rgb", classes=None,
                            class_mode="categorical", batch_size=32,
                            shuffle=True, seed=None, subset=None,
                            interpolation="bilinear", validation_split=None):
        """Augmented batches from `directory/<class>/<image>` files.

        Classes are the sub-folder names in alphabetical order (or
        `classes`), as in the legacy class; `self.class_indices` maps them
        to labels. The images are the files `kft.data.scan_image_folder`
        lists: hidden files and folders are skipped, and class folders are
        not searched recursively. `class_mode`: `"categorical"` (one-hot), `"binary"`
        (0/1 floats), `"sparse"` (integers), `"input"` (the image itself)
        or `None` (images only). `validation_split`, when given, overrides
        the one passed to the constructor for this call.
        """
        if validation_split is not None and not 0.0 <= validation_split < 1.0:
            raise ValueError(
                "validation_split must be in [0, 1). Received: "
                f"validation_split={validation_split}")
        if class_mode not in CLASS_MODES:
            raise ValueError(
                f"class_mode must be one of {CLASS_MODES}. Received: "
                f"class_mode={class_mode!r}")
        classes, paths, labels = scan_image_folder(directory, classes or None)
        if class_mode == "binary" and len(classes) != 2:
            raise ValueError(
                f"class_mode='binary' needs exactly 2 classes; found "
                f"{len(classes)}: {classes}")
        self.class_indices = {c: i for i, c in enumerate(classes)}
        if not paths:
            raise ValueError(f"No images found under {directory!r}.")
        # Legacy splits each class folder; here the split is per class too.
        paths, labels = np.array(paths), np.array(labels, dtype="int32")
        keep = []
        for label in range(len(classes)):
            members = np.flatnonzero(labels == label)
            keep.extend(members[self._split(len(members), subset, seed,
                                            validation_split)])
        keep = np.array(sorted(keep), dtype="int64")
        paths, labels = paths[keep], labels[keep]
        channels = {"rgb": 3, "grayscale": 1, "rgba": 4}[color_mode]
        ds = _decoded_images(paths, labels, target_size, channels, interpolation)
        ds = _with_class_mode(ds, class_mode, len(classes))
        seed = self.seed if seed is None else seed
        if (self.mixup or self.cutmix) and class_mode not in (
                "categorical", "sparse"):
            raise ValueError(
                "mixup / cutmix need class labels: class_mode='categorical' "
                f"or 'sparse'. Received: class_mode={class_mode!r}")
        ds = self._pipeline(ds, batch_size, shuffle, seed, len(paths),
                            augment=subset != "validation",
                            num_classes=len(classes))
        if class_mode == "input":
            ds = ds.map(lambda x, y: (x, x))
        self.samples = len(paths)
        return ds


def _decoded_images(paths, labels, target_size, channels, interpolation):
    """`(image, label)` pairs decoded from `paths`, resized to `target_size`."""

    def load(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                                   expand_animations=False)
        image = tf.image.resize(image, target_size, method=interpolation)
        image.set_shape((*target_size, channels))
        return image, label

    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    return ds.map(load, num_parallel_calls=_AUTOTUNE)


def _with_class_mode(ds, class_mode, num_classes):
    """Labels as the legacy `class_mode` gives them (`None`: images only)."""
    if class_mode is None:
        return ds.map(lambda x, y: x)

    def encode(x, y):
        if class_mode == "categorical":
            return x, tf.one_hot(y, num_classes)
        if class_mode == "binary":
            return x, tf.cast(y, tf.float32)
        if class_mode == "sparse":
            return x, y
        return x, x

    return ds.map(encode)
