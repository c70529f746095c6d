"""Audio classifiers on keras-hub speech encoders, taking raw waveforms.

`build_audio_classifier` puts everything between a mono waveform and
the class probabilities into one functional model:

    waveform (batch, samples) at `sample_rate`
      -> Resample (only when `sample_rate` is not the encoder's 16 kHz)
      -> Whisper: LogMelSpectrogram (Whisper's features, `keras.ops` only)
         Moonshine: ClipWaveform (raw samples; its conv stem is the front end)
      -> "backbone": the Whisper or Moonshine encoder (decoder dropped)
      -> pooling over time (mean, or AttentionPooling) -> kft head

Whisper was trained on 30-second windows (3000 feature frames, 1500
encoder positions). Shorter clips (`max_seconds`) give fewer frames and
the encoder uses the first rows of its position table, as keras-hub's
`PositionEmbedding` slices it to the sequence length; fine-tuning adapts
the encoder to the shorter windows, at a fraction of the 30-second cost.
"""

import math

import keras
import numpy as np
from keras import ops

from kft.backbones.anatomy import Anatomy
from kft.backbones.freezing import freeze
from kft.backbones.image_presets import PresetDownloadError
from kft.backbones.image_presets import PresetUnavailableError
from kft.data.audio import polyphase_kernel
from kft.models.head_config import HeadConfig
from kft.models.heads import build_head
from kft.models.image import PRESET_WEIGHTS
from kft.models.image import Classifier
from kft.utils.offline import require_preset

__all__ = [
    "AUDIO_PRESETS",
    "AttentionPooling",
    "ClipWaveform",
    "LogMelSpectrogram",
    "AUDIO_POOLINGS",
    "Resample",
    "build_audio_classifier",
    "moonshine_encoder",
    "whisper_encoder",
    "whisper_mel_filters",
]

AUDIO_POOLINGS = ("mean", "attention")
WHISPER_SAMPLE_RATE = 16000
WHISPER_FAMILY = "WhisperBackbone"
MOONSHINE_FAMILY = "MoonshineBackbone"
# Moonshine's conv stem: kernel 127 stride 64, kernel 7 stride 3, kernel 3
# stride 2 (about 41.5 positions a second); 895 samples give one position.
_MOONSHINE_CONVS = ((127, 64), (7, 3), (3, 2))
_TASK = "audio_classifier"


def _whisper_tiny_path():
    from kft.convert.assets import converted_path

    return converted_path("whisper-tiny", "whisper_tiny", PresetUnavailableError)


# Short names for checkpoints converted from pip packages; anything else
# goes to keras-hub as a preset name, `hf://` address or directory.
AUDIO_PRESETS = {"whisper_tiny": _whisper_tiny_path}


def _hz_to_mel(hz):
    """Slaney's mel scale (librosa's default): linear below 1 kHz, log above."""
    hz = np.asarray(hz, np.float64)
    linear = hz / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel):
    mel = np.asarray(mel, np.float64)
    linear = mel * (200.0 / 3)
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log, linear)


def whisper_mel_filters(sample_rate=16000, num_fft=400, num_mels=80):
    """Whisper's mel filter bank, `(num_fft // 2 + 1, num_mels)` float32.

    Slaney-normalised triangles on Slaney's mel scale from 0 Hz to
    Nyquist (librosa's `filters.mel` defaults, which Whisper uses).
    """
    fft_freqs = np.fft.rfftfreq(num_fft, 1.0 / sample_rate)
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(sample_rate / 2), num_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.T.astype(np.float32)


def _fix_length(waves, num_samples):
    """Cuts `(batch, samples)` to `num_samples` or pads with zeros at the end."""
    waves = waves[:, :num_samples]
    missing = num_samples - ops.shape(waves)[1]
    return ops.pad(waves, [[0, 0], [0, missing]])


@keras.saving.register_keras_serializable(package="kft")
class LogMelSpectrogram(keras.layers.Layer):
    """Whisper's log-mel features of raw waveforms, with `keras.ops` only.

    The same numbers as keras-hub's `WhisperAudioConverter` (and OpenAI's
    `log_mel_spectrogram`): each clip is cut or zero-padded to
    `max_seconds`, a centred, reflect-padded Hann STFT (`num_fft`,
    `hop_length`) gives power spectra (the last frame dropped), the mel
    filter bank, `log10` floored at 1e-10 and at the clip's maximum minus
    8, then `(x + 4) / 4`. Computed in float32 whatever the policy.

    Input `(batch, samples)`; output `(batch, frames, num_mels)`, with
    `frames = round(max_seconds * sample_rate) // hop_length`.
    """

    def __init__(self, num_mels=80, sample_rate=16000, num_fft=400,
                 hop_length=160, max_seconds=30.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        for key, value in (("num_mels", num_mels), ("sample_rate", sample_rate),
                           ("num_fft", num_fft), ("hop_length", hop_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer. Received: "
                                 f"{key}={value!r}")
        if not isinstance(max_seconds, (int, float)) or max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0. Received: {max_seconds!r}")
        self.num_mels, self.sample_rate = num_mels, sample_rate
        self.num_fft, self.hop_length = num_fft, hop_length
        self.max_seconds = float(max_seconds)
        self.num_samples = int(round(self.max_seconds * sample_rate))
        self.num_frames = self.num_samples // hop_length
        self._filters = whisper_mel_filters(sample_rate, num_fft, num_mels)

    def call(self, waves):
        waves = _fix_length(ops.cast(waves, "float32"), self.num_samples)
        real, imag = ops.stft(waves, self.num_fft, self.hop_length, self.num_fft,
                              window="hann", center=True)
        power = (ops.square(real) + ops.square(imag))[:, :self.num_frames]
        mel = ops.matmul(power, ops.convert_to_tensor(self._filters))
        log = ops.log10(ops.maximum(mel, 1e-10))
        log = ops.maximum(log, ops.max(log, axis=(1, 2), keepdims=True) - 8.0)
        return (log + 4.0) / 4.0

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_frames, self.num_mels)

    def get_config(self):
        config = super().get_config()
        config.update({"num_mels": self.num_mels, "sample_rate": self.sample_rate,
                       "num_fft": self.num_fft, "hop_length": self.hop_length,
                       "max_seconds": self.max_seconds})
        return config


@keras.saving.register_keras_serializable(package="kft")
class Resample(keras.layers.Layer):
    """Band-limited resampling of `(batch, samples)` waveforms.

    Cuts or zero-pads the input to `round(max_seconds * input_rate)`
    samples, then applies `kft.data.audio.polyphase_kernel` as one strided
    convolution: the same samples as `kft.data.audio.resample`. Output
    `(batch, ceil(samples * output_rate / input_rate))`, float32.
    """

    def __init__(self, input_rate, output_rate, max_seconds=30.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        for key, value in (("input_rate", input_rate), ("output_rate", output_rate)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer (Hz). "
                                 f"Received: {key}={value!r}")
        self.input_rate, self.output_rate = input_rate, output_rate
        self.max_seconds = float(max_seconds)
        self.num_samples = int(round(self.max_seconds * input_rate))
        kernel, self._up, self._down, self._half = polyphase_kernel(
            input_rate, output_rate)
        self._filters = kernel[:, None, :]
        self.output_samples = -(-self.num_samples * self._up // self._down)

    def call(self, waves):
        waves = _fix_length(ops.cast(waves, "float32"), self.num_samples)
        if self.input_rate == self.output_rate:
            return waves
        blocks = -(-self.output_samples // self._up)
        need = (blocks - 1) * self._down + self._filters.shape[0]
        right = max(0, need - self.num_samples - self._half + 1)
        padded = ops.pad(waves, [[0, 0], [self._half - 1, right]])[:, :, None]
        out = ops.conv(padded, ops.convert_to_tensor(self._filters),
                       strides=self._down, padding="valid")[:, :blocks]
        out = ops.reshape(out, (-1, blocks * self._up))
        return out[:, :self.output_samples]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_samples)

    def get_config(self):
        config = super().get_config()
        config.update({"input_rate": self.input_rate, "output_rate": self.output_rate,
                       "max_seconds": self.max_seconds})
        return config


@keras.saving.register_keras_serializable(package="kft")
class ClipWaveform(keras.layers.Layer):
    """Cuts or zero-pads waveforms to `max_seconds`, with a channel axis.

    The raw-audio input of encoders with their own convolution front end
    (Moonshine): `(batch, samples)` -> `(batch, num_samples, 1)` float32,
    `num_samples = round(max_seconds * sample_rate)`.
    """

    def __init__(self, sample_rate=16000, max_seconds=30.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not isinstance(sample_rate, int) or sample_rate < 1:
            raise ValueError(f"sample_rate must be a positive integer (Hz). "
                             f"Received: sample_rate={sample_rate!r}")
        if not isinstance(max_seconds, (int, float)) or max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0. Received: {max_seconds!r}")
        self.sample_rate = sample_rate
        self.max_seconds = float(max_seconds)
        self.num_samples = int(round(self.max_seconds * sample_rate))

    def call(self, waves):
        waves = _fix_length(ops.cast(waves, "float32"), self.num_samples)
        return waves[:, :, None]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_samples, 1)

    def get_config(self):
        config = super().get_config()
        config.update({"sample_rate": self.sample_rate,
                       "max_seconds": self.max_seconds})
        return config


@keras.saving.register_keras_serializable(package="kft")
class AttentionPooling(keras.layers.Layer):
    """Attention pooling over time: `(batch, frames, features)` ->
    `(batch, 1, features)`, a one-token sequence.

    A learned query scores every frame (`softmax(x . q / sqrt(features))`
    over frames) and the frames are averaged with those weights. The query
    starts at zero, so an untrained layer is exactly mean pooling.
    """

    def build(self, input_shape):
        self.query = self.add_weight(name="query", shape=(input_shape[-1],),
                                     initializer="zeros")

    def call(self, inputs):
        scale = 1.0 / math.sqrt(inputs.shape[-1])
        scores = ops.einsum("btf,f->bt", inputs, ops.cast(self.query, inputs.dtype))
        weights = ops.softmax(scores * scale, axis=-1)
        return ops.einsum("bt,btf->bf", weights, inputs)[:, None, :]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1, input_shape[-1])


def whisper_encoder(backbone, name="backbone"):
    """The encoder half of a `keras_hub.models.WhisperBackbone` as a model.

    A functional model from log-mel features `(batch, frames, num_mels)`
    to the encoder's sequence output `(batch, ceil(frames / 2), hidden)`.
    It shares the backbone's encoder layers (and weights) and leaves the
    decoder out; every layer is a registered Keras or keras-hub layer, so
    the model saves and reloads with `safe_mode=True`. keras-hub's own
    stem calls `keras.activations.gelu` and an unregistered padding layer,
    which become `Activation("gelu")` and `ZeroPadding1D(1)` here (same
    maths).

    Args:
        backbone: a built `WhisperBackbone`.
        name: the model's name.
    """
    layer = backbone.get_layer
    policy = backbone.dtype_policy
    features = keras.Input((None, backbone.num_mels), name="encoder_features")
    x = layer("encoder_token_embedding_conv_layer_1")(features)
    x = keras.layers.Activation("gelu", dtype=policy, name="encoder_conv_1_gelu")(x)
    x = keras.layers.ZeroPadding1D(1, dtype=policy, name="encoder_padder")(x)
    x = layer("encoder_token_embedding_conv_layer_2")(x)
    x = keras.layers.Activation("gelu", dtype=policy, name="encoder_conv_2_gelu")(x)
    positions = layer("encoder_position_embedding")(x)
    x = layer("encoder_embeddings_add")((x, positions))
    x = layer("encoder_embeddings_dropout")(x)
    for i in range(backbone.num_layers):
        x = layer(f"transformer_encoder_layer_{i}")(x)
    x = layer("encoder_layer_norm")(x)
    return keras.Model(features, x, name=name)


def moonshine_encoder(backbone, name="backbone"):
    """The encoder half of a `keras_hub.models.MoonshineBackbone` as a model.

    A functional model from raw 16 kHz audio `(batch, samples, 1)` to the
    encoder's sequence output `(batch, positions, hidden)`: Moonshine's
    convolution stem (`conv1`, tanh, `group_norm`, `conv2`, gelu,
    `conv3`, gelu), rotary position embeddings, `encoder_block_i` and
    `encoder_final_layer_norm`. It shares the backbone's layers (and
    weights) and leaves the decoder out. No attention mask: every clip is
    cut or padded to one length before it (as for Whisper), so the
    output equals the backbone's `encoder_sequence_output` with an
    all-ones padding mask.

    Args:
        backbone: a built `MoonshineBackbone`.
        name: the model's name.
    """
    layer = backbone.get_layer
    audio = keras.Input((None, 1), name="encoder_input_values")
    x = audio
    for stem in ("conv1", "tanh_after_conv1", "group_norm", "conv2",
                 "gelu_after_conv2", "conv3", "gelu_after_conv3"):
        x = layer(stem)(x)
    rotary = layer("encoder_rotary_embedding")(layer("encoder_positions")(x))
    x = layer("encoder_dropout")(x)
    for i in range(backbone.encoder_num_layers):
        x = layer(f"encoder_block_{i}")(x, rotary)
    x = layer("encoder_final_layer_norm")(x)
    return keras.Model(audio, x, name=name)


_ENCODERS = {WHISPER_FAMILY: whisper_encoder, MOONSHINE_FAMILY: moonshine_encoder}


def _family(backbone):
    """`WHISPER_FAMILY` or `MOONSHINE_FAMILY` (by class, along the MRO)."""
    for cls in type(backbone).__mro__:
        if cls.__name__ in _ENCODERS:
            return cls.__name__
    return None


def _load_backbone(source, weights):
    """A Whisper or Moonshine backbone from a preset name, `hf://`, a
    directory, an `AUDIO_PRESETS` short name, or an instance."""
    import keras_hub

    if isinstance(source, str):
        path = AUDIO_PRESETS[source]() if source in AUDIO_PRESETS else source
        require_preset(
            path, "a local keras-hub preset directory (e.g. 'whisper_tiny' "
            "after `kft convert whisper-tiny`, or a saved Moonshine preset) or a "
            "WhisperBackbone / MoonshineBackbone", what="the speech preset",
            error=PresetDownloadError)
        try:
            source = keras_hub.models.Backbone.from_preset(
                path, load_weights=weights is not None)
        except Exception as error:
            cause = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise PresetUnavailableError(
                f"Could not load {path!r} as a speech backbone (no network here?). "
                "Pass a local keras-hub preset directory instead, e.g. "
                "'whisper_tiny' after `kft convert whisper-tiny`, or a "
                "keras_hub.models.WhisperBackbone or MoonshineBackbone. "
                f"Cause: {cause}") from None
    if _family(source) is None:
        raise ValueError(
            "build_audio_classifier supports Whisper and Moonshine encoders: a "
            "keras_hub.models.WhisperBackbone or MoonshineBackbone, a preset "
            "name, an hf:// address or a directory, or one of "
            f"{sorted(AUDIO_PRESETS)}. Received: {type(source).__name__}")
    return source


def _check_audio_args(num_classes, sample_rate, max_seconds, pooling, bn, weights,
                      head):
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or (
            num_classes < 1):
        raise ValueError(f"num_classes must be an integer >= 1. Received: "
                         f"num_classes={num_classes!r}")
    if not isinstance(sample_rate, int) or sample_rate < 1:
        raise ValueError(f"sample_rate must be a positive integer (Hz). Received: "
                         f"sample_rate={sample_rate!r}")
    if not isinstance(max_seconds, (int, float)) or isinstance(max_seconds, bool):
        raise ValueError(f"max_seconds must be a number of seconds. Received: "
                         f"max_seconds={max_seconds!r}")
    if pooling not in AUDIO_POOLINGS:
        raise ValueError(f"pooling must be one of {AUDIO_POOLINGS}. Received: "
                         f"pooling={pooling!r}")
    if bn not in ("frozen", "train"):
        raise ValueError(f"bn must be 'frozen' or 'train'. Received: bn={bn!r}")
    if weights not in (PRESET_WEIGHTS, None):
        raise ValueError(
            "A keras-hub backbone brings its preset's weights: leave weights out, "
            f"or pass weights=None for random ones. Received: weights={weights!r}")
    head = HeadConfig.from_value(head)
    if head.pooling != "avg":
        raise ValueError(
            "Set the pooling over time with build_audio_classifier(pooling=...), "
            f"one of {AUDIO_POOLINGS}; not in head. Received: head pooling="
            f"{head.pooling!r}")
    return head


def _moonshine_positions(num_samples):
    """Encoder positions Moonshine's conv stem makes of `num_samples` (16 kHz)."""
    length = num_samples
    for kernel, stride in _MOONSHINE_CONVS:
        length = max(0, (length - kernel) // stride + 1)
    return length


def _check_moonshine_length(backbone, max_seconds):
    samples = int(round(max_seconds * WHISPER_SAMPLE_RATE))
    most = backbone.max_position_embeddings
    if not _moonshine_positions(samples) or _moonshine_positions(samples) > most:
        shortest, longest = 1, most  # in encoder positions, then samples
        for kernel, stride in reversed(_MOONSHINE_CONVS):
            shortest = (shortest - 1) * stride + kernel
            longest = (longest - 1) * stride + kernel
        shortest, longest = (n / WHISPER_SAMPLE_RATE for n in (shortest, longest))
        raise ValueError(
            f"max_seconds must be in [{shortest:g}, {longest:g}] for this Moonshine "
            f"encoder (at most {most} positions, about 24 ms each). Received: "
            f"max_seconds={max_seconds!r}")


def _check_length(backbone, max_seconds):
    if _family(backbone) == MOONSHINE_FAMILY:
        return _check_moonshine_length(backbone, max_seconds)
    frames = int(round(max_seconds * WHISPER_SAMPLE_RATE)) // 160
    positions = backbone.max_encoder_sequence_length // 2
    longest = positions * 2 * 160 / WHISPER_SAMPLE_RATE
    if frames < 1 or (frames + 1) // 2 > positions:
        raise ValueError(
            f"max_seconds must be in (0, {longest:g}] for this encoder ({positions} "
            f"positions of 20 ms). Received: max_seconds={max_seconds!r}")


def build_audio_classifier(preset, num_classes, *, sample_rate=16000,
                           max_seconds=30.0, pooling="mean", head=None,
                           weights=PRESET_WEIGHTS, bn="frozen", name=None):
    """Builds a fine-tunable audio classifier that takes raw waveforms.

    The model takes float mono waveforms `(batch, samples)` at
    `sample_rate` (any length: cut or zero-padded to `max_seconds`;
    `Resample` to 16 kHz first when `sample_rate` is not 16 kHz). For
    Whisper it computes the log-mel features inside (`LogMelSpectrogram`);
    Moonshine takes the raw samples (`ClipWaveform`) through its own
    convolution stem. The encoder runs as a nested model named
    `"backbone"` (`whisper_encoder` / `moonshine_encoder`: the decoder is
    dropped), then pooling over time and a kft head whose layers are
    named `head_*`. The backbone starts frozen.

    Args:
        preset: a short name of `AUDIO_PRESETS` (`"whisper_tiny"`, after
            `kft convert whisper-tiny`), a keras-hub Whisper preset name,
            an `hf://` address, a local keras-hub preset directory (e.g.
            `kft.convert.ctranslate2.whisper_to_keras_hub`'s output), or a
            `keras_hub.models.WhisperBackbone` (used as is: two models built
            on one instance share its encoder weights, as keras-hub tasks
            sharing a backbone do); the same for Moonshine
            (`"moonshine_tiny_en"`, a directory, or a
            `keras_hub.models.MoonshineBackbone`).
        num_classes: number of classes (1 for a binary head).
        sample_rate: the waveforms' rate in Hz.
        max_seconds: clip length the model works on (at most 30 s for
            Whisper; Moonshine from 0.056 s up to its
            `max_position_embeddings`). Shorter is much cheaper: the
            encoder sees `50 * max_seconds` positions (Moonshine about
            `41.5 * max_seconds`).
        pooling: `"mean"` over frames, or `"attention"` (`AttentionPooling`,
            a learned query that starts as mean pooling).
        head: a `kft.heads.HeadConfig` or a dict of its fields (hidden
            layers, dropout, kind); its pooling is set by `pooling`.
        weights: left out, the preset's weights; `None`, the same
            architecture with random weights (a preset given by name).
        bn: `"frozen"` calls the encoder with `training=False` (its
            dropout stays off, as for kft's image classifiers); `"train"`
            lets it see `training`. Neither encoder has BatchNorm.
        name: model name; defaults to `"whisper_audio_classifier"` or
            `"moonshine_audio_classifier"`.

    Returns:
        A `kft.models.Classifier` (functional; its anatomy says what it
        is: `kft.describe(model)`).

    Example:

    ```python
    backbone = keras_hub.models.WhisperBackbone(
        vocabulary_size=16, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, num_mels=80, max_encoder_sequence_length=200)
    model = build_audio_classifier(backbone, 3, max_seconds=1.0)
    model.predict(np.zeros((2, 16000), "float32")).shape   # (2, 3)
    ```
    """
    head = _check_audio_args(num_classes, sample_rate, max_seconds, pooling, bn,
                             weights, head)
    base = _load_backbone(preset, weights)
    _check_length(base, max_seconds)

    # === Layers ===
    family = _family(base)
    encoder = _ENCODERS[family](base, name="backbone")
    freeze(encoder)
    if family == MOONSHINE_FAMILY:
        features = ClipWaveform(WHISPER_SAMPLE_RATE, max_seconds,
                                name="preprocessing")
    else:
        features = LogMelSpectrogram(base.num_mels, WHISPER_SAMPLE_RATE,
                                     max_seconds=max_seconds, name="preprocessing")

    # === Functional Model ===
    inputs = keras.Input((None,), name="waveform")
    x = inputs
    if sample_rate != WHISPER_SAMPLE_RATE:
        x = Resample(sample_rate, WHISPER_SAMPLE_RATE, max_seconds,
                     name="resample")(x)
    x = features(x)
    x = encoder(x, training=False) if bn == "frozen" else encoder(x)
    if pooling == "attention":
        x = AttentionPooling(name="head_attention_pool")(x)
    head = head.model_copy(
        update={"pooling": "token" if pooling == "attention" else "avg"})
    outputs = build_head(x, num_classes, head)

    # === Config ===
    anatomy = Anatomy(task=_TASK, backbone=encoder.name, family=family,
                      head_kind=head.kind, batch_norm=bn)
    default_name = "moonshine" if family == MOONSHINE_FAMILY else "whisper"
    return Classifier(inputs, outputs, anatomy=anatomy,
                      name=name or f"{default_name}_audio_classifier")
