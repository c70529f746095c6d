"""Audio recipes: `model.audio`, audio data sources, `kft eval` and
`kft compare` on audio runs, espeak-ng speech."""

import json
import os
import shutil
import wave

import keras
import numpy as np
import pytest
import yaml

keras_hub = pytest.importorskip("keras_hub")

from test_audio import tiny_whisper  # noqa: E402

import kft  # noqa: E402
from kft.cli import main  # noqa: E402
from kft.data.audio import read_wav  # noqa: E402
from kft.data.speech import espeak_words  # noqa: E402
from kft.lora.base import ADAPTER_VARIABLES  # noqa: E402
from kft.lora.base import lora_layers  # noqa: E402
from kft.recipes import load_recipe  # noqa: E402
from kft.recipes.runner import run_recipe  # noqa: E402

RATE = 16000
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng missing (apt-get install "
                                  "espeak-ng)")


def write_tone(path, freq, seconds=0.5, rate=RATE, seed=0):
    """A 16-bit mono WAV of a tone in a little noise (stdlib `wave`)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.4 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.normal(size=t.shape)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((x * 32767).astype("<i2").tobytes())


def tone_folder(root, per_class=6):
    """`low/` (300 Hz) and `high/` (1800 Hz) tones, slightly detuned."""
    for name, freq in (("low", 300), ("high", 1800)):
        for i in range(per_class):
            write_tone(root / name / f"{i}.wav", freq + 15 * i, seed=i)
    return str(root)


def tiny_preset(folder):
    tiny_whisper().save_to_preset(str(folder))
    return str(folder)


def write_recipe(tmp_path, data=None, **changes):
    recipe = {
        "name": "audio_tiny",
        "model": {"audio": tiny_preset(tmp_path / "whisper"), "max_seconds": 0.5},
        "data": data or {"source": "audio_folder",
                         "path": tone_folder(tmp_path / "tones"),
                         "batch_size": 4, "validation_split": 0.34,
                         "shuffle": False},
        "stages": [{"name": "head", "epochs": 2, "learning_rate": 1e-2}],
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def encoder_weights(model_or_backbone):
    get = model_or_backbone.get_layer
    if "backbone" in [layer.name for layer in model_or_backbone.layers]:
        get = model_or_backbone.get_layer("backbone").get_layer
    names = ["encoder_token_embedding_conv_layer_1", "transformer_encoder_layer_0",
             "transformer_encoder_layer_1", "encoder_layer_norm"]
    return {name: {w.path: np.asarray(w) for w in get(name).weights
                   if w.path.split("/")[-1] not in ADAPTER_VARIABLES}
            for name in names}


def moved(before, after):
    """Names of the layers with a weight that differs (matched by path)."""
    for name in before:
        assert before[name].keys() == after[name].keys(), name
    return {name for name in before
            if any(not np.array_equal(value, after[name][path])
                   for path, value in before[name].items())}


# --- kft run ---------------------------------------------------------------------

def test_head_then_top_block_writes_a_complete_run(tmp_path):
    recipe = write_recipe(tmp_path, stages=[
        {"name": "head", "epochs": 2, "learning_rate": 1e-2},
        {"name": "top", "epochs": 1, "trainable": {"last_n_blocks": 2},
         "learning_rate": 1e-3}])
    config = load_recipe(recipe)
    assert config.model.weights == "preset" and config.data.source == "audio_folder"
    out, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    assert metrics["classes"] == ["high", "low"]
    val = metrics["final"]["val"]
    assert {"loss", "accuracy", "confusion_matrix", "per_class"} <= set(val)
    assert np.asarray(val["confusion_matrix"]).sum() == 4  # 2 of 6 per class
    assert [s["name"] for s in metrics["stages"]] == ["head", "top"]
    # head: Dense(384 -> 2) on the tiny encoder's 16 features.
    assert metrics["stages"][0]["trainable_params"] == 16 * 2 + 2
    for name in ("config.yaml", "history.csv", "model.keras",
                 "plots/curves.png", "plots/confusion_matrix.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    # Only the top block and the final layer norm moved in the encoder.
    base = keras_hub.models.Backbone.from_preset(config.model.audio)
    model = keras.saving.load_model(os.path.join(out, "model.keras"),
                                    safe_mode=True)
    assert moved(encoder_weights(base), encoder_weights(model)) == {
        "transformer_encoder_layer_1", "encoder_layer_norm"}
    saved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert saved["model"]["max_seconds"] == 0.5
    assert saved["model"]["sample_rate"] == RATE


def test_waveform_augmentation_reaches_the_training_batches_only(tmp_path):
    recipe = write_recipe(tmp_path, augmentation={
        "noise_snr_db": [5, 10], "gain_db": [-6, 6], "time_shift": 0.2})
    config = load_recipe(recipe)
    assert config.augmentation.time_shift == 0.2
    from kft.recipes.runner import RecipeRun

    run = RecipeRun(config, str(tmp_path / "run"), verbose=0)
    run._setup_data()
    train = next(iter(run.bundle.train))[0].numpy()
    plain = load_recipe(write_recipe(tmp_path / "plain"))
    bare = RecipeRun(plain, str(tmp_path / "bare"), verbose=0)
    bare._setup_data()
    clean = next(iter(bare.bundle.train))[0].numpy()
    assert train.shape == clean.shape
    assert not np.allclose(train, clean)  # noise, gain and shift applied
    val = next(iter(run.bundle.val))[0].numpy()
    np.testing.assert_array_equal(val, next(iter(bare.bundle.val))[0].numpy())
    # An image model refuses waveform augmentation, naming it.
    image = tmp_path / "image.yaml"
    image.write_text(yaml.safe_dump({
        "name": "x", "model": {"backbone": "mobilenet_v2"},
        "augmentation": {"noise_snr_db": 10},
        "data": {"source": "builtin", "name": "fashion_mnist_holdout"},
        "stages": [{"epochs": 1}]}))
    assert main(["validate", str(image)]) == 2


def test_lora_recipe_trains_adapters_on_the_encoder_attention(tmp_path):
    config = load_recipe(write_recipe(tmp_path, lora={"rank": 2, "alpha": 4}))
    assert config.lora.targets == ["query", "value"]
    assert config.lora.trainable == ["head_"]
    assert config.stages[0].trainable == "keep"
    out, metrics = run_recipe(config, str(tmp_path / "run"), verbose=0)
    assert metrics["adapter"]["layers"] == 4  # query, value x 2 layers
    # rank 2 on 16 -> 16 projections, then the head.
    assert metrics["stages"][0]["trainable_params"] == 4 * 2 * (16 + 16) + 34
    model = keras.saving.load_model(os.path.join(out, "model.keras"))
    assert len(lora_layers(model)) == 4
    assert all(np.abs(np.asarray(layer.lora_b)).max() > 0
               for layer in lora_layers(model))
    base = keras_hub.models.Backbone.from_preset(config.model.audio)
    assert moved(encoder_weights(base), encoder_weights(model)) == set()


def test_lora_audio_classifier_reloads_in_safe_mode_with_its_adapters(tmp_path):
    # The Whisper encoder layers sit in a functional model, not a keras-hub
    # backbone: they are rebuilt from hyperparameters, then re-adapted.
    model = kft.build_audio_classifier(tiny_whisper(), 2, max_seconds=0.5)
    kft.lora.apply_lora(model, targets=("query", "value"), rank=2,
                        trainable=("head_",))
    for layer in lora_layers(model):
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.05, "float32"))
    path = str(tmp_path / "lora.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert len(lora_layers(loaded)) == 4
    x = np.random.default_rng(0).normal(size=(2, 8000)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-5)
    assert sorted(w.path for w in loaded.trainable_weights) == sorted(
        w.path for w in model.trainable_weights)


# --- Invalid recipes ---------------------------------------------------------------

@pytest.mark.parametrize("change, needle", [
    ({"data": {"source": "image_folder", "path": "x"}},
     "data.source is 'image_folder'"),
    ({"model": {"input_shape": [32, 32, 3]}}, "['input_shape'] are not for audio"),
    ({"model": {"weights": "imagenet"}}, "model.weights of an audio model"),
    ({"model": {"pooling": "max"}}, "model.pooling"),
    ({"augmentation": {"horizontal_flip": True}}, "takes waveform augmentation"),
    ({"augmentation": {"time_shift": 1.5}}, "time_shift"),
    ({"prompt_tuning": {"num_virtual_tokens": 4}}, "prompt_tuning:"),
    ({"data": {"source": "audio_folder", "path": "x", "voices": ["en-us"]}},
     "are for source 'espeak_words'"),
])
def test_invalid_audio_recipes_exit_2_naming_the_key(tmp_path, capsys, change,
                                                    needle):
    recipe = write_recipe(tmp_path, **change)
    assert main(["validate", recipe]) == 2
    assert needle in capsys.readouterr().err


def test_an_audio_source_needs_an_audio_model(tmp_path, capsys):
    path = tmp_path / "image.yaml"
    path.write_text(yaml.safe_dump({
        "name": "x", "model": {"backbone": "mobilenet_v2"},
        "data": {"source": "audio_folder", "path": "clips"},
        "stages": [{"epochs": 1}]}))
    assert main(["validate", str(path)]) == 2
    assert "an audio model (model.audio)" in capsys.readouterr().err


def test_clips_longer_than_the_encoder_exit_2_naming_max_seconds(tmp_path, capsys):
    recipe = write_recipe(tmp_path, model={"max_seconds": 3.0})  # tiny: 2 s
    assert main(["run", recipe, "--quiet", "--output-dir",
                 str(tmp_path / "run")]) == 2
    assert "model.max_seconds: max_seconds must be in (0, 2]" in \
        capsys.readouterr().err


# --- kft eval ----------------------------------------------------------------------

def test_eval_rebuilds_the_audio_validation_data(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["run", write_recipe(tmp_path), "--quiet", "--output-dir", out]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert main(["eval", out]) == 0
    result = json.load(open(os.path.join(out, "eval.json")))
    assert result["confusion_matrix"] == metrics["final"]["val"]["confusion_matrix"]
    assert result["accuracy"] == pytest.approx(metrics["final"]["val"]["accuracy"])
    assert os.path.isfile(os.path.join(out, "plots", "eval_confusion_matrix.png"))
    # --data: another folder of class folders, all of it evaluated.
    other = tone_folder(tmp_path / "more", per_class=3)
    assert main(["eval", out, "--data", other]) == 0
    result = json.load(open(os.path.join(out, "eval.json")))
    assert [c["support"] for c in result["per_class"].values()] == [3, 3]
    assert main(["eval", out, "--data", str(tmp_path / "recipe.yaml")]) == 2
    assert "folder of class folders" in capsys.readouterr().err


# --- kft compare ---------------------------------------------------------------------

def test_compare_runs_the_methods_on_an_audio_recipe(tmp_path):
    report = kft.compare(write_recipe(tmp_path),
                         ["head", "full", "gradual", "discriminative", "lora",
                          "prompt"], epochs=3, output_dir=str(tmp_path / "cmp"),
                         verbose=False)
    summary = report["methods"]
    assert summary["prompt"]["status"] == "skipped"
    assert "audio model" in summary["prompt"]["reason"]
    runs = {r["method"]: r for r in report["runs"]}
    assert all(runs[m]["status"] == "ok" for m in runs if m != "prompt"), runs
    trainable = {m: runs[m]["trainable_params"] for m in runs if m != "prompt"}
    assert trainable["head"] == 34
    assert trainable["head"] < trainable["lora"] < trainable["full"]
    # gradual: the head alone for one epoch, then one more encoder block
    # per epoch (anatomy: stem, the encoder layers, top).
    assert trainable["head"] < trainable["gradual"] < trainable["full"]
    assert trainable["discriminative"] == trainable["full"]
    assert runs["lora"]["stored"] == "adapter.npz"
    assert all(0.0 <= runs[m]["best"] <= 1.0 for m in trainable)


# --- espeak-ng speech -----------------------------------------------------------------

def test_missing_espeak_ng_exits_2_naming_the_apt_package(tmp_path, monkeypatch,
                                                         capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    recipe = write_recipe(tmp_path, data={
        "source": "espeak_words", "words": ["up", "down"], "voices": ["en-us"],
        "val_voices": ["en-gb"], "speeds": [160], "pitches": [50],
        "path": str(tmp_path / "speech")})
    assert main(["run", recipe, "--quiet", "--output-dir",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data.source: espeak-ng is not installed" in err
    assert "apt-get install espeak-ng" in err


@needs_espeak
def test_espeak_words_are_made_once_with_held_out_voices(tmp_path, monkeypatch):
    root = tmp_path / "speech"
    train, val = espeak_words(["up", "down"], ["en-us", "en-us+f3"], ["en-gb"],
                              speeds=[160], pitches=[40, 60], root=root)
    assert sorted(os.listdir(train)) == sorted(os.listdir(val)) == ["down", "up"]
    assert sorted(os.listdir(os.path.join(train, "up"))) == [
        "en-us+f3-s160-p40-0.wav", "en-us+f3-s160-p60-0.wav",
        "en-us-s160-p40-0.wav", "en-us-s160-p60-0.wav"]
    assert len(os.listdir(os.path.join(val, "down"))) == 2
    samples, rate = read_wav(os.path.join(val, "up", "en-gb-s160-p40-0.wav"))
    assert rate == RATE and samples.shape[1] == 1
    assert 0.1 < len(samples) / RATE < 1.5 and np.abs(samples).max() > 0.05
    # Made once: the same settings reuse the folder without espeak-ng.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert espeak_words(["up", "down"], ["en-us", "en-us+f3"], ["en-gb"],
                        speeds=[160], pitches=[40, 60], root=root) == (train, val)
    with pytest.raises(ValueError, match="val_voices: validation voices"):
        espeak_words(["up", "down"], ["en-us"], ["en-us"], root=root)


@needs_espeak
def test_espeak_words_recipe_trains_and_evaluates(tmp_path):
    recipe = write_recipe(tmp_path, data={
        "source": "espeak_words", "words": ["up", "down", "stop"],
        "voices": ["en-us", "en-gb"], "val_voices": ["en-029"], "speeds": [160],
        "pitches": [50], "path": str(tmp_path / "speech"), "batch_size": 4},
        model={"max_seconds": 1.0})
    out = str(tmp_path / "run")
    assert main(["run", recipe, "--quiet", "--output-dir", out]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["classes"] == ["down", "stop", "up"]
    # Validation: the held-out voice, one clip per word.
    assert np.asarray(metrics["final"]["val"]["confusion_matrix"]).sum() == 3
    assert main(["eval", out]) == 0
