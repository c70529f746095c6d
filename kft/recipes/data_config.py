"""A recipe's `data:` and `augmentation:` sections: where the data comes
from (the registered sources of every kind of run), how it is batched,
and how the training batches are augmented.
"""

from typing import Literal

import pydantic
from pydantic import Field

from kft.data.speech import PITCHES
from kft.data.speech import SPEECH_COMMANDS
from kft.data.speech import SPEEDS
from kft.data.speech import TRAIN_VOICES
from kft.data.speech import VAL_VOICES
from kft.data.speech import check_word_settings
from kft.recipes.preference_config import PREFERENCE_SOURCES
from kft.recipes.rl_config import RL_SOURCES
from kft.recipes.vision_config import VISION_SOURCES
from kft.utils.validation import Strict

__all__ = ["AUDIO_SOURCES", "DATA_SOURCES", "IMAGE_SOURCES", "SFT_SOURCES",
           "TEXT_SOURCES", "AudioAugmentationConfig", "AugmentationConfig",
           "DataConfig"]

IMAGE_SOURCES = ("builtin", "numpy", "image_folder", "tfds")
TEXT_SOURCES = ("text_file", "fortunes")
SFT_SOURCES = ("sft_file", "wordnet_glosses")
AUDIO_SOURCES = ("audio_folder", "espeak_words")
DATA_SOURCES = (IMAGE_SOURCES + TEXT_SOURCES + SFT_SOURCES + PREFERENCE_SOURCES
                + RL_SOURCES + AUDIO_SOURCES + VISION_SOURCES)
# espeak_words' keys, and their defaults (kft.data.speech: no TensorFlow).
_ESPEAK_KEYS = {"words": SPEECH_COMMANDS, "voices": TRAIN_VOICES,
                "val_voices": VAL_VOICES, "speeds": SPEEDS, "pitches": PITCHES}


class DataConfig(Strict):
    """`data:` where the images or texts come from and how they are batched.

    Image sources: `builtin`, `numpy`, `image_folder`, `tfds`. Text sources:
    `text_file` (`.csv` / `.tsv` / `.jsonl` with `text_column` and
    `label_column`) and `fortunes` (Debian's topic files, `topics`). SFT
    sources (for `model.causal_lm`): `sft_file` (`.jsonl` / `.json` /
    `.csv` / `.tsv` records in `format`) and `wordnet_glosses` (WordNet's
    noun definitions, "Define: word" -> gloss); `packing`, `truncation`,
    `max_examples`. `preference_file` (with `preference:`): `path` to pairs
    or unpaired records, `format` `prompt_chosen_rejected` (the default),
    `messages` or `unpaired`; `wordnet_pairs`: a noun's gloss preferred to
    another noun's. Audio sources (for `model.audio`; clips at the model's
    `sample_rate`, cut or padded to its `max_seconds`): `audio_folder`
    (`path`, one folder of `.wav` files per class) and `espeak_words`
    (`words` spoken by espeak-ng in `voices` at `speeds` x `pitches`,
    validated on `val_voices`; made once into `path`, default
    `~/.cache/kft/data`).
    """

    source: Literal["builtin", "numpy", "image_folder", "tfds", "text_file",
                    "fortunes", "sft_file", "wordnet_glosses", "preference_file",
                    "wordnet_pairs", "prompt_file", "arithmetic", "audio_folder",
                    "espeak_words", "fashion_scenes", "coco", "voc", "yolo",
                    "mask_folder"]
    name: str | None = None
    path: str | None = None
    data_dir: str | None = None
    download: bool = False
    train_split: str = "train"
    val_split: str | None = "test"
    batch_size: int = Field(default=32, ge=1)
    shuffle: bool = True
    validation_split: float = Field(default=0.2, ge=0.0, lt=1.0)
    per_class: int | None = Field(default=None, ge=1)
    image_size: tuple[int, int] | None = None
    on_bad_file: Literal["skip", "error"] = "skip"
    text_column: str = "text"
    label_column: str = "label"
    topics: list[str] | None = None
    # Supervised fine-tuning of causal LMs (`kft.data.sft_dataset`).
    # Preference tuning (`preference_file`): prompt_chosen_rejected,
    # messages or unpaired (`kft.data.preference_dataset`).
    format: Literal["prompt_completion", "messages", "text",
                    "prompt_chosen_rejected", "unpaired"] = "prompt_completion"
    packing: bool = False
    truncation: Literal["drop_long", "truncate_completion",
                        "truncate_prompt"] = "drop_long"
    max_examples: int | None = Field(default=None, ge=2)
    # Spoken words synthesised by espeak-ng (`kft.data.speech`).
    words: list[str] | None = None
    voices: list[str] | None = None
    val_voices: list[str] | None = None
    speeds: list[int] | None = None
    pitches: list[int] | None = None

    @pydantic.model_validator(mode="after")
    def _source_needs(self):
        needs = {"builtin": "name", "tfds": "name", "numpy": "path",
                 "image_folder": "path", "text_file": "path",
                 "fortunes": None, "sft_file": "path",
                 "wordnet_glosses": None, "preference_file": "path",
                 "wordnet_pairs": None, "prompt_file": "path",
                 "arithmetic": None, "audio_folder": "path",
                 "espeak_words": None, "fashion_scenes": None, "coco": "path",
                 "voc": "path", "yolo": "path", "mask_folder": "path"}[self.source]
        if needs and getattr(self, needs) is None:
            raise ValueError(f"source {self.source!r} needs data.{needs}")
        return self

    @pydantic.model_validator(mode="after")
    def _espeak_keys(self):
        given = sorted(k for k in _ESPEAK_KEYS if getattr(self, k) is not None)
        if self.source != "espeak_words":
            if given:
                raise ValueError(f"data keys {given} are for source "
                                 "'espeak_words'")
            return self
        for key, default in _ESPEAK_KEYS.items():  # resolved: defaults shown
            if getattr(self, key) is None:
                setattr(self, key, list(default))
        check_word_settings({k: getattr(self, k) for k in _ESPEAK_KEYS})
        return self


class AugmentationConfig(Strict):
    """`augmentation:` `kft.augment.ImageAugmentation` arguments, applied
    to the training batches only."""

    rotation_range: float = Field(default=0.0, ge=0)
    width_shift_range: float = Field(default=0.0, ge=0)
    height_shift_range: float = Field(default=0.0, ge=0)
    zoom_range: float | tuple[float, float] = 0.0
    shear_range: float = Field(default=0.0, ge=0)
    horizontal_flip: bool = False
    vertical_flip: bool = False
    brightness_range: tuple[float, float] | None = None
    channel_shift_range: float = Field(default=0.0, ge=0)
    fill_mode: Literal["nearest", "constant", "reflect", "wrap"] = "nearest"
    cval: float = 0.0

    @pydantic.model_validator(mode="after")
    def _check(self):
        from kft.augment import ImageAugmentation

        ImageAugmentation(**self.model_dump())
        return self


class AudioAugmentationConfig(Strict):
    """`augmentation:` of an audio recipe: `kft.augment.AudioAugmentation`
    arguments (waveform noise, shift, gain, speed), applied to the training
    batches only."""

    noise_snr_db: float | tuple[float, float] | None = None
    time_shift: float = Field(default=0.0, ge=0, lt=1)
    gain_db: tuple[float, float] | None = None
    speed: tuple[float, float] | None = None

    @pydantic.model_validator(mode="after")
    def _check(self):
        from kft.augment import AudioAugmentation

        AudioAugmentation(**self.model_dump())
        return self
