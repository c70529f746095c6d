"""Audio folders as `tf.data` pipelines of fixed-length mono waveforms.

`from_audio_folder` reads `directory/<class_name>/*.wav|.flac|.ogg`: every clip is
decoded once up front (a corrupt or empty file is found here, with its
path, and skipped or reported as `from_image_folder` does), mixed down
to mono, resampled to `sample_rate` and cut or zero-padded to
`max_seconds`. The batches are `(waves, labels)` with `waves` float32 in
[-1, 1], `(batch, samples)`: what `kft.build_audio_classifier` takes.

WAV: PCM 8/16/24/32-bit and IEEE float 32/64-bit, plain or
`WAVE_FORMAT_EXTENSIBLE`, read by a small numpy parser (`read_wav`).
FLAC and OGG (Vorbis, Opus) are decoded by libsndfile through the
`soundfile` package (`read_audio`), read block by block so a header that
claims more samples than the file holds costs nothing.

Resampling is band-limited (windowed-sinc, Kaiser window, polyphase):
`resample` here and `kft.audio.Resample` inside a model share
`polyphase_kernel`, so a clip resampled by either gives the same samples.
"""

import functools
import math
import os
import struct
import warnings

import numpy as np
import tensorflow as tf

from kft.data.arrays import DataBundle
from kft.data.arrays import train_val_split
from kft.data.images import without_files

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioFileError",
    "from_audio_folder",
    "load_audio",
    "polyphase_kernel",
    "read_audio",
    "read_wav",
    "resample",
    "scan_audio_folder",
]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
_BLOCK_FRAMES = 1 << 16  # frames soundfile decodes at a time
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
_AUTOTUNE = tf.data.AUTOTUNE
# Rates whose reduced ratio needs a bigger resampling kernel (up * taps
# values) are refused: 44.1 kHz -> 16 kHz needs 85,600 and 44,056 Hz about
# 11 million, but a crafted header rate such as 44,057 Hz (prime to 16,000)
# would need 700 million (gigabytes).
MAX_KERNEL_VALUES = 2 ** 24


class AudioFileError(ValueError):
    """A file that is not a readable audio clip (the message says why)."""


def _chunks(data, path):
    """`{chunk_id: bytes}` of a RIFF/WAVE file (the first of each id)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioFileError(f"{path!r} is not a WAV file (no RIFF/WAVE header).")
    chunks, offset = {}, 12
    while offset + 8 <= len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, offset)
        # A truncated last chunk keeps what is there, as sox and ffmpeg do.
        chunks.setdefault(chunk_id, data[offset + 8:offset + 8 + size])
        offset += 8 + size + (size & 1)
    return chunks


def _decode_samples(raw, fmt, channels, bits):
    width = bits // 8
    if width == 0:  # 0-7 bits: no encoding kft reads (and no frame size)
        return None
    frames = len(raw) // (width * channels)
    raw = raw[:frames * width * channels]
    if fmt == _FLOAT and bits in (32, 64):
        samples = np.frombuffer(raw, f"<f{width}").astype(np.float32)
    elif fmt == _PCM and bits == 8:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif fmt == _PCM and bits in (16, 32):
        samples = np.frombuffer(raw, f"<i{width}").astype(np.float32) / 2 ** (bits - 1)
    elif fmt == _PCM and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        samples = (np.where(value >= 2 ** 23, value - 2 ** 24, value)
                   .astype(np.float32) / 2 ** 23)
    else:
        return None
    return samples.reshape(frames, channels)


def read_wav(path):
    """Decodes a WAV file.

    Args:
        path: the file.

    Returns:
        `(samples, sample_rate)`: float32 `(frames, channels)` in [-1, 1].

    Raises:
        AudioFileError: not a WAV file, an encoding kft does not decode
            (named), or no samples.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        chunks = _chunks(f.read(), path)
    fmt_chunk, data = chunks.get(b"fmt "), chunks.get(b"data")
    if fmt_chunk is None or len(fmt_chunk) < 16 or data is None:
        raise AudioFileError(f"{path!r} has no complete 'fmt ' and 'data' chunks.")
    fmt, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt_chunk)
    if fmt == _EXTENSIBLE and len(fmt_chunk) >= 26:
        fmt = struct.unpack_from("<H", fmt_chunk, 24)[0]  # the sub-format GUID
    if channels < 1 or rate < 1:
        raise AudioFileError(
            f"{path!r}: {channels} channels at {rate} Hz is not a valid clip.")
    samples = _decode_samples(data, fmt, channels, bits)
    if samples is None:
        raise AudioFileError(
            f"{path!r}: WAV format {fmt} with {bits}-bit samples is not supported "
            "(kft reads PCM 8/16/24/32-bit and float 32/64-bit).")
    if len(samples) == 0:
        raise AudioFileError(f"{path!r} holds no samples.")
    return samples, int(rate)


def _read_with_soundfile(path):
    """FLAC / OGG (and anything else libsndfile knows) via `soundfile`."""
    try:
        import soundfile
    except ImportError:  # a kft dependency: only a broken install lacks it
        raise AudioFileError(
            f"{path!r}: reading FLAC/OGG needs the soundfile package "
            "(pip install soundfile).") from None
    blocks = []
    try:
        with soundfile.SoundFile(path) as f:
            rate, channels = f.samplerate, f.channels
            # Block by block: a header's frame count is not trusted.
            while len(block := f.read(_BLOCK_FRAMES, dtype="float32",
                                       always_2d=True)):
                blocks.append(block)
    except (soundfile.SoundFileError, RuntimeError, TypeError) as error:
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise AudioFileError(
            f"{path!r} is not a readable audio file ({cause}).") from None
    if channels < 1 or rate < 1:
        raise AudioFileError(
            f"{path!r}: {channels} channels at {rate} Hz is not a valid clip.")
    if not blocks:
        raise AudioFileError(f"{path!r} holds no samples.")
    return np.concatenate(blocks), int(rate)


def read_audio(path):
    """Decodes a WAV, FLAC or OGG (Vorbis, Opus) file.

    `.wav` files go to `read_wav` (a numpy parser); other files to
    libsndfile through the `soundfile` package (a well-kept decoder, so
    kft writes no FLAC or Vorbis code of its own), decoded block by block.

    Args:
        path: the file.

    Returns:
        `(samples, sample_rate)`: float32 `(frames, channels)` in [-1, 1].

    Raises:
        AudioFileError: a file neither reader decodes, or no samples.
    """
    path = os.fspath(path)
    if path.lower().endswith(".wav"):
        return read_wav(path)
    return _read_with_soundfile(path)


def _resampling_plan(orig_rate, target_rate, zero_crossings=16, rolloff=0.945):
    """`(up, down, cutoff, half)` of `polyphase_kernel`, computed without
    building the kernel; a kernel over `MAX_KERNEL_VALUES` is refused."""
    gcd = math.gcd(int(orig_rate), int(target_rate))
    up, down = int(target_rate) // gcd, int(orig_rate) // gcd
    cutoff = min(1.0, up / down) * rolloff
    half = int(math.ceil(zero_crossings / cutoff))
    if up * (2 * half + down) > MAX_KERNEL_VALUES:
        raise ValueError(
            f"Resampling {orig_rate} Hz to {target_rate} Hz needs a "
            f"{2 * half + down} x {up} kernel (more than {MAX_KERNEL_VALUES} "
            "values): the two rates share almost no common factor. Convert "
            f"the clip to a common rate first (`sox in.wav -r {target_rate} "
            "out.wav`).")
    return up, down, cutoff, half


def polyphase_kernel(orig_rate, target_rate, zero_crossings=16, rolloff=0.945,
                     beta=8.555):
    """The windowed-sinc kernel that resamples `orig_rate` -> `target_rate`.

    With `up / down` the reduced ratio `target_rate / orig_rate`, output
    sample `q * up + p` is the dot product of input samples
    `q * down - (half - 1) ...` (`taps` of them) with `kernel[:, p]`: a
    strided convolution with `up` output channels. The low-pass cutoff is
    `rolloff` times the lower Nyquist frequency; the sinc spans
    `zero_crossings` zero crossings each side, under a Kaiser window.

    Returns:
        `(kernel, up, down, half)`: kernel float32 `(taps, up)`, and `half`
        (pad the input with `half - 1` zeros on the left).

    Raises:
        ValueError: the kernel would exceed `MAX_KERNEL_VALUES` (rates with
            almost no common factor, such as a crafted 44,057 Hz header).
    """
    up, down, cutoff, half = _resampling_plan(orig_rate, target_rate,
                                              zero_crossings, rolloff)
    positions = np.arange(2 * half + down)[:, None] - (half - 1)  # input offsets
    phases = np.arange(up)[None, :] * down / up                   # output times
    u = positions - phases
    inside = np.abs(u) < half
    ratio = np.where(inside, u / half, 1.0)
    window = np.i0(beta * np.sqrt(1.0 - ratio ** 2)) / np.i0(beta)
    kernel = np.where(inside, cutoff * np.sinc(cutoff * u) * window, 0.0)
    return kernel.astype(np.float32), up, down, half


@functools.lru_cache(maxsize=4)  # a kernel may hold MAX_KERNEL_VALUES floats
def _shared_kernel(orig_rate, target_rate):
    # Building the kernel costs more than resampling a short clip with it
    # (Bessel functions over `taps * up` values): a folder of 22.05 kHz
    # clips builds it once. Read-only, as it is shared.
    kernel, up, down, half = polyphase_kernel(orig_rate, target_rate)
    kernel.flags.writeable = False
    return kernel, up, down, half


def resample(waves, orig_rate, target_rate):
    """Band-limited resampling of `(..., samples)` float arrays (numpy).

    The output has `ceil(samples * target_rate / orig_rate)` samples; the
    same rate returns the input unchanged.
    """
    waves = np.asarray(waves, np.float32)
    if int(orig_rate) == int(target_rate):
        return waves
    kernel, up, down, half = _shared_kernel(int(orig_rate), int(target_rate))
    length = waves.shape[-1]
    out_len = -(-length * up // down)
    blocks = -(-out_len // up)
    need = (blocks - 1) * down + kernel.shape[0]
    pad = [(0, 0)] * (waves.ndim - 1) + [(half - 1, max(0, need - length - half + 1))]
    padded = np.pad(waves, pad)
    windows = np.lib.stride_tricks.sliding_window_view(
        padded, kernel.shape[0], axis=-1)[..., ::down, :][..., :blocks, :]
    out = (windows @ kernel).reshape(*waves.shape[:-1], blocks * up)
    return out[..., :out_len]


def load_audio(path, sample_rate=16000, num_samples=None):
    """A file's clip as float32 mono at `sample_rate`, cut or zero-padded
    to `num_samples` (unchanged length when None).

    Channels are averaged; another rate is resampled (`resample`).
    WAV, FLAC and OGG files are read (`read_audio`).
    """
    samples, rate = read_audio(path)
    wave = resample(samples.mean(axis=1), rate, sample_rate)
    if num_samples is not None:
        wave = np.pad(wave[:num_samples], (0, max(0, num_samples - len(wave))))
    return wave.astype(np.float32)


def _hidden(name):
    return name.startswith(".")


def scan_audio_folder(directory):
    """`(class_names, paths, labels)` of a folder of class folders of clips.

    Same rules as `kft.data.scan_image_folder`: sorted class folders and
    files, hidden ones skipped, sub-folders not searched; files whose name
    ends with one of `AUDIO_EXTENSIONS` (any case).
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"Audio folder not found: {directory!r}")
    classes = sorted(entry.name for entry in os.scandir(directory)
                     if entry.is_dir() and not _hidden(entry.name))
    if len(classes) < 2:
        raise ValueError(
            f"Audio folder {directory!r} has {len(classes)} class sub-folder(s) "
            f"{classes}; a classifier needs at least two (one folder of "
            ".wav/.flac/.ogg files per class).")
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(directory, name)
        files = sorted(entry.name for entry in os.scandir(folder)
                       if entry.is_file() and not _hidden(entry.name)
                       and entry.name.lower().endswith(AUDIO_EXTENSIONS))
        paths.extend(os.path.join(folder, f) for f in files)
        labels.extend([label] * len(files))
    return classes, paths, labels


def _unreadable_audio(paths, sample_rate):
    """`(bad_paths, reasons)`: files `read_audio` refuses, or whose rate
    cannot be resampled to `sample_rate`."""
    bad, reasons = [], []
    for path in paths:
        try:
            _, rate = read_audio(path)
            _resampling_plan(rate, sample_rate)
        except (ValueError, OSError) as error:  # AudioFileError included
            bad.append(path)
            reasons.append(f"{path}: {error}")
    return bad, reasons


def _report_bad(directory, bad, reasons, on_bad_file):
    if not bad:
        return
    listed = "\n  ".join(reasons[:20]) + ("\n  ..." if len(bad) > 20 else "")
    if on_bad_file == "error":
        raise ValueError(
            f"{len(bad)} unreadable audio file(s) in {directory!r}:\n  {listed}")
    warnings.warn(f"Skipped {len(bad)} unreadable audio file(s) in {directory!r}:"
                  f"\n  {listed}", stacklevel=3)


def _audio_pipeline(paths, labels, sample_rate, num_samples, batch_size,
                    shuffle_seed, cache):
    def load(path):
        return load_audio(path.decode(), sample_rate, num_samples)

    def tf_load(path, label):
        wave = tf.numpy_function(load, [path], tf.float32, stateful=False)
        wave.set_shape((num_samples,))
        return wave, label

    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(tf_load, num_parallel_calls=_AUTOTUNE)
    if cache:
        ds = ds.cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(_AUTOTUNE)


def _check_args(sample_rate, max_seconds, on_bad_file):
    if on_bad_file not in ("skip", "error"):
        raise ValueError(
            f"on_bad_file must be 'skip' or 'error'. Received: {on_bad_file!r}")
    if not isinstance(sample_rate, int) or sample_rate < 1:
        raise ValueError(
            f"sample_rate must be a positive integer (Hz). Received: {sample_rate!r}")
    if not isinstance(max_seconds, (int, float)) or max_seconds <= 0:
        raise ValueError(
            f"max_seconds must be a positive number. Received: {max_seconds!r}")


def from_audio_folder(directory, *, sample_rate=16000, max_seconds=30.0,
                      validation_split=0.2, batch_size=32, seed=0,
                      on_bad_file="skip", shuffle=True, cache=False):
    """Loads `directory/<class_name>/*.{wav,flac,ogg}`, split by class.

    Classes are the sub-folder names in alphabetical order. Every file is
    decoded once up front, so a corrupt, truncated-header or empty file is
    found here, with its path. Clips are mixed to mono (channels
    averaged), resampled to `sample_rate` (band-limited, `resample`), and
    cut (the first `max_seconds` are kept) or zero-padded at the end.

    Args:
        directory: one sub-folder of `.wav`, `.flac` or `.ogg` files
            (any mix) per class.
        sample_rate: the rate of the waveforms produced (Hz); Whisper
            models take 16000.
        max_seconds: clip length; give `kft.build_audio_classifier` the
            same value.
        validation_split: share of each class held out (stratified).
        batch_size: batch size.
        seed: split and shuffling seed.
        on_bad_file: `"skip"` (leave unreadable files out, warn with their
            count and reasons, list them in `bundle.skipped_files`) or
            `"error"` (raise, listing them).
        shuffle: reshuffle the training set every epoch.
        cache: keep the decoded clips in memory after the first epoch
            (`samples * 4` bytes per clip).

    Returns:
        A `kft.data.DataBundle` of `(waves, labels)` batches, waves float32
        `(batch, round(max_seconds * sample_rate))`; `input_shape` is
        `(samples,)`; `train, val = bundle` works.

    Example:

    ```python
    bundle = from_audio_folder("speech/", max_seconds=3)
    model = kft.build_audio_classifier("whisper_tiny", bundle.num_classes,
                                       max_seconds=3)
    ```
    """
    _check_args(sample_rate, max_seconds, on_bad_file)
    classes, paths, labels = scan_audio_folder(directory)
    bad, reasons = _unreadable_audio(paths, sample_rate)
    _report_bad(directory, bad, reasons, on_bad_file)
    paths, labels = without_files(directory, classes, paths, labels, bad,
                                  "Audio folder", "audio files")
    (train_x, train_y), val = train_val_split(
        np.asarray(paths), np.asarray(labels, "int32"), validation_split, seed)
    num_samples = int(round(max_seconds * sample_rate))

    def pipeline(x, y, shuffle_it):
        return _audio_pipeline(x, y, sample_rate, num_samples, batch_size,
                               seed if shuffle_it else None, cache)

    train = pipeline(train_x, train_y, shuffle)
    val_ds = pipeline(*val, False) if val is not None else None
    return DataBundle(train, val_ds, classes, (num_samples,), skipped_files=bad)
