"""Audio augmentation for waveforms, and SpecAugment for spectrograms.

Batched Keras layers on `(batch, samples)` float waveforms (or
`(batch, time, frequency)` spectrograms), active only when
`training=True`, usable in `tf.data` or inside a model.
"""

import keras
from keras import ops

__all__ = ["AudioAugmentation", "AudioAugmentationLayer", "SpecAugment"]


def _range(value, name, allow_negative=True):
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = (float(value), float(value))
    if not isinstance(value, (list, tuple)) or len(value) != 2 or value[0] > value[1]:
        raise ValueError(
            f"{name} must be a number or a pair [low, high] with low <= high. "
            f"Received: {name}={value!r}")
    if not allow_negative and value[0] <= 0:
        raise ValueError(f"{name} must be > 0. Received: {name}={value!r}")
    return (float(value[0]), float(value[1]))


def _clip_shape(shape, name):
    """`(clips, samples)`, both >= 1, as a tuple of ints."""
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(
            f"{name} must be 2D, (clips, samples), with at least one clip of "
            f"one sample. Received: shape {tuple(shape)}")
    return dims


def _power(x):
    return ops.mean(ops.square(x), axis=-1, keepdims=True) + 1e-12


def _mix_at_snr(signal, noise, snr_db):
    """Scales `noise` so that signal power / noise power = 10^(snr/10)."""
    scale = ops.sqrt(_power(signal) / (_power(noise) * ops.power(10.0, snr_db / 10.0)))
    return signal + noise * scale


@keras.saving.register_keras_serializable(package="kft")
class AudioAugmentationLayer(keras.layers.Layer):
    """The layer behind `AudioAugmentation.layer()`; same arguments.

    Background clips (`set_background`) are a non-trainable weight of the
    layer, so they are saved with the model's weights and come back with
    `keras.saving.load_model`; the config records only their shape
    (`background_shape`).

    Example:

    ```python
    layer = AudioAugmentationLayer(background_snr_db=[5, 20], seed=0)
    layer.set_background(clips)                  # (n, samples) floats
    waves = layer(waves, training=True)          # (batch, samples)
    ```
    """

    def __init__(self, noise_snr_db=None, time_shift=0.0, gain_db=None,
                 speed=None, background_snr_db=None, seed=None,
                 background_shape=None, **kwargs):
        super().__init__(**kwargs)
        self.noise_snr_db = _range(noise_snr_db, "noise_snr_db")
        self.gain_db = _range(gain_db, "gain_db")
        self.speed = _range(speed, "speed", allow_negative=False)
        self.background_snr_db = _range(background_snr_db, "background_snr_db")
        if not isinstance(time_shift, (int, float)) or not 0 <= time_shift < 1:
            raise ValueError(
                f"time_shift must be a fraction in [0, 1). Received: {time_shift!r}")
        self.time_shift = float(time_shift)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.background = None
        if background_shape is not None:
            # Loading a saved layer: the clips arrive with the weights.
            self._add_background(_clip_shape(background_shape,
                                              "background_shape"))

    def _add_background(self, shape):
        # float32 even under mixed precision: the mix is computed in
        # float32 (`call` casts the waves), and autocast would hand it a
        # half-precision copy.
        self.background = self.add_weight(
            name="background", shape=shape, initializer="zeros",
            dtype="float32", trainable=False, autocast=False)

    def set_background(self, clips):
        """Background noise clips, `(n, samples)`, mixed in at
        `background_snr_db` (each clip tiled or cut to the input length).

        Call it before the layer is first used (`AudioAugmentation` does);
        afterwards, only clips of the same shape can replace them.
        """
        clips = ops.convert_to_numpy(clips).astype("float32")
        shape = _clip_shape(clips.shape, "background clips")
        if self.background is None:
            if self.built:
                raise ValueError(
                    f"Layer {self.name!r} is already built: call "
                    "set_background before its first call (the clips are a "
                    "weight, and a built layer takes no new weights).")
            self._add_background(shape)
        elif tuple(self.background.shape) != shape:
            raise ValueError(
                f"Layer {self.name!r} holds background clips of shape "
                f"{tuple(self.background.shape)}; new clips must have the same "
                f"shape. Received: shape {shape}")
        self.background.assign(clips)

    def _uniform(self, batch, bounds):
        return keras.random.uniform((batch, 1), bounds[0], bounds[1],
                                    seed=self.seed_generator)

    def call(self, waves, training=None):
        if not training:
            return waves
        waves = ops.cast(waves, "float32")
        batch, length = ops.shape(waves)[0], ops.shape(waves)[1]
        if self.speed is not None:
            # Resample by linear interpolation (changes pitch too, as
            # Kaldi's speed perturbation), then cut or pad to the length.
            rate = self._uniform(batch, self.speed)
            positions = ops.arange(length, dtype="float32")[None, :] * rate
            last = ops.cast(length - 1, "float32")
            inside = positions <= last
            positions = ops.minimum(positions, last)
            low = ops.cast(ops.floor(positions), "int32")
            high = ops.minimum(low + 1, length - 1)
            weight = positions - ops.floor(positions)
            left = ops.take_along_axis(waves, low, axis=1)
            right = ops.take_along_axis(waves, high, axis=1)
            waves = ops.where(inside, left * (1 - weight) + right * weight, 0.0)
        if self.time_shift:
            fraction = self._uniform(batch, (-self.time_shift, self.time_shift))
            shift = ops.cast(fraction * ops.cast(length, "float32"), "int32")
            index = ops.arange(length)[None, :] - shift
            valid = (index >= 0) & (index < length)
            index = ops.clip(index, 0, length - 1)
            waves = ops.where(valid, ops.take_along_axis(waves, index, axis=1), 0.0)
        if self.gain_db is not None:
            waves = waves * ops.power(10.0, self._uniform(batch, self.gain_db) / 20.0)
        if self.background is not None and self.background_snr_db is not None:
            clips = ops.convert_to_tensor(self.background)
            pick = keras.random.randint((batch,), 0, ops.shape(clips)[0],
                                        seed=self.seed_generator)
            repeats = length // ops.shape(clips)[1] + 1
            noise = ops.take(ops.tile(clips, (1, repeats))[:, :length], pick, axis=0)
            waves = _mix_at_snr(waves, noise,
                                self._uniform(batch, self.background_snr_db))
        if self.noise_snr_db is not None:
            noise = keras.random.normal(ops.shape(waves), seed=self.seed_generator)
            waves = _mix_at_snr(waves, noise,
                                self._uniform(batch, self.noise_snr_db))
        return waves

    def get_config(self):
        config = super().get_config()
        config.update({
            "noise_snr_db": self.noise_snr_db, "time_shift": self.time_shift,
            "gain_db": self.gain_db, "speed": self.speed,
            "background_snr_db": self.background_snr_db, "seed": self.seed,
            "background_shape": (None if self.background is None
                                 else list(self.background.shape)),
        })
        return config


class AudioAugmentation:
    """Waveform augmentation, batched on `tf.data`.

    Args:
        noise_snr_db: Gaussian noise at a signal-to-noise ratio in dB (a
            number or `[low, high]`).
        time_shift: max shift as a fraction of the length (zero-filled).
        gain_db: gain in dB, `[low, high]`.
        speed: speed factors `[low, high]` (1.1 = 10% faster; pitch moves
            with it), by resampling.
        background_noise: clips `(n, samples)` mixed in at
            `background_snr_db`.
        seed: the same seed gives the same stream.

    Example:

    ```python
    augment = kft.augment.AudioAugmentation(noise_snr_db=[10, 30],
                                            time_shift=0.1, gain_db=[-6, 6])
    train = train.map(lambda x, y: (augment.layer()(x, training=True), y))
    ```
    """

    def __init__(self, noise_snr_db=None, time_shift=0.0, gain_db=None,
                 speed=None, background_noise=None, background_snr_db=(5, 20),
                 seed=None):
        self.args = dict(noise_snr_db=noise_snr_db, time_shift=time_shift,
                         gain_db=gain_db, speed=speed,
                         background_snr_db=background_snr_db, seed=seed)
        self.background_noise = background_noise
        self.layer()  # check the arguments now

    def layer(self, name="audio_augmentation"):
        layer = AudioAugmentationLayer(**self.args, name=name)
        if self.background_noise is not None:
            layer.set_background(self.background_noise)
        return layer

    def map(self, dataset):
        """Augments a batched dataset of `waves` or `(waves, labels)`."""
        layer = self.layer()

        def fn(x, *rest):
            x = layer(x, training=True)
            return (x, *rest) if rest else x

        return dataset.map(fn)


@keras.saving.register_keras_serializable(package="kft")
class SpecAugment(keras.layers.Layer):
    """Time and frequency masking of spectrograms (Park et al., 2019).

    Input `(batch, time, frequency)`. Each of `num_time_masks` masks
    zeroes up to `time_mask` consecutive frames, each of
    `num_freq_masks` masks up to `freq_mask` consecutive bins. Active only
    when `training=True`.
    """

    def __init__(self, freq_mask=8, time_mask=20, num_freq_masks=1,
                 num_time_masks=1, seed=None, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("freq_mask", freq_mask), ("time_mask", time_mask),
                            ("num_freq_masks", num_freq_masks),
                            ("num_time_masks", num_time_masks)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0. Received: {value!r}")
        self.freq_mask, self.time_mask = freq_mask, time_mask
        self.num_freq_masks, self.num_time_masks = num_freq_masks, num_time_masks
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _masks(self, batch, size, width, count):
        keep = ops.ones((batch, size))
        positions = ops.arange(size)[None, :]
        for _ in range(count):
            w = keras.random.randint((batch, 1), 0, width + 1, seed=self.seed_generator)
            # A start uniform in [0, size - w]: scale a uniform draw.
            room = ops.cast(ops.maximum(size - w, 0) + 1, "float32")
            start = ops.cast(keras.random.uniform((batch, 1), 0, 1,
                                                  seed=self.seed_generator) * room,
                             "int32")
            inside = (positions >= start) & (positions < start + w)
            keep = ops.where(inside, 0.0, keep)
        return keep

    def call(self, spectrograms, training=None):
        if not training:
            return spectrograms
        shape = ops.shape(spectrograms)
        batch, time, freq = shape[0], shape[1], shape[2]
        time_keep = self._masks(batch, time, self.time_mask, self.num_time_masks)
        freq_keep = self._masks(batch, freq, self.freq_mask, self.num_freq_masks)
        keep = time_keep[:, :, None] * freq_keep[:, None, :]
        return spectrograms * ops.cast(keep, spectrograms.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"freq_mask": self.freq_mask, "time_mask": self.time_mask,
                       "num_freq_masks": self.num_freq_masks,
                       "num_time_masks": self.num_time_masks, "seed": self.seed})
        return config
