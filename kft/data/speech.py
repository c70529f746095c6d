"""Speech synthesised offline with espeak-ng, as audio class folders.

Real recorded speech data sets need a download; Debian's `espeak-ng`
(`apt-get install espeak-ng`) speaks English in a dozen regional voices
(`espeak-ng --voices=en`: en-us, en-us-nyc, en-gb, en-gb-x-rp,
en-gb-scotland, en-029 Caribbean, ...), each with variants (`en-us+f3`,
`en-gb+m4`), at any speed and pitch. That is enough to make a spoken-word
or accent-identification task offline, with held-out voices to measure
what a model learnt beyond the speakers it heard.

`synthesize` speaks one text; `synthesize_folder` writes clips into
`root/<label>/*.wav` (16-bit PCM at the rate asked, mono), what
`kft.data.from_audio_folder` reads; `from_espeak_words` makes (once,
cached) and loads a spoken-word set whose validation voices are never
heard in training. `benchmarks/speech.py` and the packaged recipe
`speech_commands_whisper_tiny` both use them.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor

__all__ = [
    "PITCHES",
    "SPEECH_COMMANDS",
    "SPEEDS",
    "TRAIN_VOICES",
    "VAL_VOICES",
    "SpeechClip",
    "SpeechSynthesisError",
    "check_word_settings",
    "data_cache_dir",
    "espeak_words",
    "from_espeak_words",
    "require_espeak",
    "synthesize",
    "synthesize_folder",
    "write_wav",
]

# The ten command words of Google's Speech Commands (v0.02 core set).
SPEECH_COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off",
                   "stop", "go")
# Default speakers: eight for training (five accents, male and female
# variants), two never heard in training (the Caribbean and West Midlands
# accents) for validation; two speeds and three pitches each.
TRAIN_VOICES = ("en-us", "en-us+f3", "en-gb", "en-gb+f2", "en-gb-scotland",
                "en-gb-x-rp+f4", "en-us-nyc+m3", "en-gb-x-gbclan")
VAL_VOICES = ("en-029", "en-gb-x-gbcwmd+f1")
SPEEDS = (140, 180)
PITCHES = (35, 55, 75)
_COMPLETE = "complete.json"
_LABEL = re.compile(r"[A-Za-z0-9_' -]+")
_VOICE = re.compile(r"[A-Za-z0-9_+-]+")


class SpeechSynthesisError(RuntimeError):
    """espeak-ng is missing, or refused a voice or text (the message says)."""


@dataclasses.dataclass(frozen=True)
class SpeechClip:
    """One clip to synthesise: `text` spoken by `voice`, filed under `label`.

    Args:
        label: the class folder the clip goes to.
        text: what is spoken.
        voice: an espeak-ng voice (`espeak-ng --voices=en`), optionally
            with a variant (`en-us+f3`).
        speed: words per minute (espeak-ng `-s`; its default is 175).
        pitch: 0-99 (espeak-ng `-p`; its default is 50).
    """

    label: str
    text: str
    voice: str = "en-us"
    speed: int = 175
    pitch: int = 50


def data_cache_dir():
    """`$KFT_DATA`, else `~/.cache/kft/data`: where made data sets are kept."""
    return os.environ.get("KFT_DATA", os.path.expanduser("~/.cache/kft/data"))


def require_espeak():
    """The path of the `espeak-ng` program.

    Raises:
        SpeechSynthesisError: it is not installed, naming the Debian package.
    """
    path = shutil.which("espeak-ng")
    if path is None:
        raise SpeechSynthesisError(
            "espeak-ng is not installed (no `espeak-ng` on PATH): install the "
            "Debian package with `apt-get install espeak-ng`, or give a folder "
            "of recorded .wav clips (source: audio_folder).")
    return path


def write_wav(path, wave_, sample_rate=16000):
    """Writes a float mono waveform in [-1, 1] as a 16-bit PCM WAV file."""
    import numpy as np  # here: the recipe schema imports this module

    samples = np.round(np.clip(np.asarray(wave_, np.float64), -1.0, 1.0) * 32767)
    with wave.open(os.fspath(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(samples.astype("<i2").tobytes())


def synthesize(text, voice="en-us", speed=175, pitch=50, sample_rate=16000):
    """Speaks `text` with espeak-ng.

    Args:
        text: what is spoken.
        voice: an espeak-ng voice, e.g. `"en-gb-scotland"` or `"en-us+f3"`.
        speed: words per minute.
        pitch: 0-99.
        sample_rate: the rate of the waveform returned (espeak-ng speaks
            at 22,050 Hz; kft resamples, band-limited).

    Returns:
        float32 mono waveform `(samples,)` in [-1, 1].

    Raises:
        SpeechSynthesisError: espeak-ng is missing or refuses the voice.

    Example:

    ```python
    wave = synthesize("hello world", voice="en-gb-x-rp")  # about 1 s at 16 kHz
    ```
    """
    from kft.data.audio import load_audio

    program = require_espeak()
    if not _VOICE.fullmatch(str(voice)):
        raise SpeechSynthesisError(f"Not an espeak-ng voice name: {voice!r}")
    with tempfile.TemporaryDirectory(prefix="kft-espeak-") as folder:
        path = os.path.join(folder, "clip.wav")
        # "--" ends the options: a text starting with "-" is spoken, not parsed.
        done = subprocess.run(
            [program, "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)),
             "-w", path, "--", text], capture_output=True, text=True)
        if done.returncode != 0 or not os.path.isfile(path):
            message = (done.stderr or done.stdout).strip().splitlines()
            raise SpeechSynthesisError(
                f"espeak-ng could not speak {text!r} with voice {voice!r} "
                f"(see `espeak-ng --voices`): {message[-1] if message else ''}")
        return load_audio(path, sample_rate)


def synthesize_folder(root, clips, sample_rate=16000, workers=2):
    """Writes each `SpeechClip` to `root/<label>/<voice>-s<speed>-p<pitch>-<n>.wav`.

    `n` counts the clips of the same label, voice, speed and pitch (their
    texts differ). The folder is what `kft.data.from_audio_folder` reads.

    Args:
        root: the folder (created).
        clips: `SpeechClip`s.
        sample_rate: the files' rate (16-bit PCM, mono).
        workers: espeak-ng processes at a time.

    Returns:
        The number of files written.
    """
    clips, names, seen = list(clips), [], {}
    for clip in clips:
        if not _LABEL.fullmatch(clip.label) or clip.label.startswith("."):
            raise ValueError(
                "A class label is a folder name of letters, digits, spaces, "
                f"'_', '-' and \"'\". Received: {clip.label!r}")
        stem = f"{clip.voice}-s{int(clip.speed)}-p{int(clip.pitch)}"
        n = seen[(clip.label, stem)] = seen.get((clip.label, stem), -1) + 1
        names.append(os.path.join(root, clip.label, f"{stem}-{n}.wav"))
        os.makedirs(os.path.dirname(names[-1]), exist_ok=True)

    def make(item):
        clip, path = item
        write_wav(path, synthesize(clip.text, clip.voice, clip.speed, clip.pitch,
                                   sample_rate), sample_rate)

    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        list(pool.map(make, zip(clips, names)))
    return len(clips)


def _word_clips(words, voices, speeds, pitches):
    return [SpeechClip(word, word, voice, speed, pitch)
            for word in words for voice in voices
            for speed in speeds for pitch in pitches]


def espeak_words(words=SPEECH_COMMANDS, voices=TRAIN_VOICES,
                 val_voices=VAL_VOICES, speeds=SPEEDS, pitches=PITCHES, *,
                 sample_rate=16000, root=None):
    """Makes (once) a spoken-word set: every word x voice x speed x pitch.

    Training clips are spoken by `voices`, validation clips by
    `val_voices` (speakers never heard in training). The folders are made
    on first use and kept: a folder whose `complete.json` records the same
    settings is reused; an interrupted one is made again.

    Args:
        words: the classes, each spoken as its own text.
        voices: espeak-ng voices of the training clips.
        val_voices: voices of the validation clips (none may be in `voices`).
        speeds: words per minute, each voice at each.
        pitches: 0-99, each voice at each.
        sample_rate: the files' rate.
        root: the folder; default `data_cache_dir()/espeak_words-<hash of
            the settings>`.

    Returns:
        `(train_dir, val_dir)`: `root/train` and `root/val`, one sub-folder
        per word.

    Raises:
        ValueError: fewer than two words, a voice in both lists, a word
            that is not a folder name.
        SpeechSynthesisError: espeak-ng is missing or refuses a voice.
    """
    settings = {"words": list(words), "voices": list(voices),
                "val_voices": list(val_voices), "speeds": [int(s) for s in speeds],
                "pitches": [int(p) for p in pitches], "sample_rate": int(sample_rate)}
    check_word_settings(settings)
    if root is None:
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        root = os.path.join(data_cache_dir(),
                            f"espeak_words-{digest.hexdigest()[:12]}")
    root = os.fspath(root)
    train, val = os.path.join(root, "train"), os.path.join(root, "val")
    if _complete(root) == settings:
        return train, val
    require_espeak()
    for folder in (train, val):
        shutil.rmtree(folder, ignore_errors=True)
    common = (settings["speeds"], settings["pitches"])
    synthesize_folder(train, _word_clips(words, voices, *common), sample_rate)
    synthesize_folder(val, _word_clips(words, val_voices, *common), sample_rate)
    with open(os.path.join(root, _COMPLETE), "w") as f:  # last: marks it done
        json.dump(settings, f, indent=2)
    return train, val


def check_word_settings(settings):
    """Checks `espeak_words`' settings (a dict of its arguments) without
    speaking: two or more distinct words that are folder names, voice
    names, no voice in both lists, nothing empty.

    Raises:
        ValueError: naming the setting and the value.
    """
    words = settings["words"]
    if len(set(words)) < 2 or len(set(words)) != len(words):
        raise ValueError(f"words: give at least two different words. Received: "
                         f"{words!r}")
    bad = [w for w in words if not _LABEL.fullmatch(w) or w.startswith(".")]
    if bad:
        raise ValueError(f"words: each is a class folder name (letters, digits, "
                         f"spaces, '_', '-', \"'\"). Received: {bad!r}")
    for key in ("voices", "val_voices", "speeds", "pitches"):
        if not settings[key]:
            raise ValueError(f"{key} must not be empty.")
    for key, low, high in (("speeds", 80, 450), ("pitches", 0, 99)):
        outside = [v for v in settings[key] if not low <= v <= high]
        if outside:
            raise ValueError(f"{key}: espeak-ng takes {low} to {high}. "
                             f"Received: {outside!r}")
    bad = [v for v in [*settings["voices"], *settings["val_voices"]]
           if not _VOICE.fullmatch(v)]
    if bad:
        raise ValueError(f"voices: not espeak-ng voice names (`espeak-ng "
                         f"--voices=en`, e.g. en-gb or en-us+f3): {bad!r}")
    shared = sorted(set(settings["voices"]) & set(settings["val_voices"]))
    if shared:
        raise ValueError(
            f"val_voices: validation voices must not be heard in training; "
            f"{shared} are in both voices and val_voices.")


def _complete(root):
    try:
        with open(os.path.join(root, _COMPLETE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def from_espeak_words(words=SPEECH_COMMANDS, voices=TRAIN_VOICES,
                      val_voices=VAL_VOICES, speeds=SPEEDS, pitches=PITCHES, *,
                      sample_rate=16000, max_seconds=1.0, batch_size=32,
                      shuffle=True, seed=0, root=None):
    """A spoken-word `DataBundle`: `espeak_words` then `from_audio_folder`.

    Args:
        words, voices, val_voices, speeds, pitches, root: see `espeak_words`.
        sample_rate: the waveforms' rate.
        max_seconds: clip length (cut or zero-padded).
        batch_size: batch size.
        shuffle: reshuffle the training clips every epoch.
        seed: shuffling seed.

    Returns:
        A `kft.data.DataBundle` of `(waves, labels)`; the classes are the
        words in alphabetical order; decoded clips are cached in memory.

    Example:

    ```python
    bundle = from_espeak_words(("yes", "no"), voices=("en-us", "en-gb"),
                               val_voices=("en-029",), max_seconds=1.0)
    model = kft.build_audio_classifier("whisper_tiny", 2, max_seconds=1.0)
    ```
    """
    from kft.data.arrays import DataBundle
    from kft.data.audio import from_audio_folder

    train_dir, val_dir = espeak_words(words, voices, val_voices, speeds, pitches,
                                      sample_rate=sample_rate, root=root)
    options = dict(sample_rate=sample_rate, max_seconds=max_seconds,
                   validation_split=0.0, batch_size=batch_size, seed=seed,
                   on_bad_file="error", cache=True)
    train = from_audio_folder(train_dir, shuffle=shuffle, **options)
    val = from_audio_folder(val_dir, shuffle=False, **options)
    return DataBundle(train.train, val.train, train.class_names, train.input_shape)
