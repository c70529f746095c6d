"""Audio classifiers on Whisper and Moonshine encoders, and audio folders."""

import os
import struct
import wave

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import kft.families as families  # noqa: E402

from kft.backbones.anatomy import backbone_blocks_of  # noqa: E402
from kft.backbones.anatomy import describe  # noqa: E402
from kft.backbones.freezing import unfreeze  # noqa: E402
from kft.data.audio import AudioFileError  # noqa: E402
from kft.data.audio import from_audio_folder  # noqa: E402
from kft.data.audio import load_audio  # noqa: E402
from kft.data.audio import read_wav  # noqa: E402
from kft.data.audio import resample  # noqa: E402
from kft.lora.model import apply_lora  # noqa: E402
from kft.models.audio import AttentionPooling  # noqa: E402
from kft.models.audio import LogMelSpectrogram  # noqa: E402
from kft.models.audio import Resample  # noqa: E402
from kft.models.audio import build_audio_classifier  # noqa: E402
from kft.models.audio import moonshine_encoder  # noqa: E402
from kft.models.audio import whisper_encoder  # noqa: E402
from kft.models.audio import whisper_mel_filters  # noqa: E402

RATE = 16000

def test_the_family_table_splits_whisper_encoders():
    assert "WhisperBackbone" in families.KERAS_HUB_SPLITTERS


def tiny_whisper(num_layers=2, num_mels=80):
    """A random Whisper small enough for CPU tests (1 s = 50 positions)."""
    return keras_hub.models.WhisperBackbone(
        vocabulary_size=16, num_layers=num_layers, num_heads=2, hidden_dim=16,
        intermediate_dim=32, num_mels=num_mels, max_encoder_sequence_length=200,
        max_decoder_sequence_length=8)


def waves(n=4, seconds=1.0, seed=0, rate=RATE):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tones = np.sin(2 * np.pi * rng.uniform(200, 2000, (n, 1)) * t)
    return (0.3 * tones + 0.02 * rng.normal(size=tones.shape)).astype("float32")


def changed_after_fit(model, x, y, epochs=2):
    before = {w.path: np.array(w) for w in model.weights}
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=4, verbose=0)
    return {w.path for w in model.weights
            if not np.array_equal(before[w.path], np.asarray(w))}


# --- The model ------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_raw_waveforms_in_probabilities_out(pooling):
    model = build_audio_classifier(tiny_whisper(), 3, max_seconds=1.0,
                                   pooling=pooling)
    assert model.input_shape == (None, None)
    assert model.get_layer("preprocessing").compute_output_shape((2, None)) == (
        2, 100, 80)
    pooled = "head_attention_pool" if pooling == "attention" else "head_pool"
    assert tuple(model.get_layer(pooled).input.shape) == (None, 50, 16)
    probs = model.predict(waves(2), verbose=0)
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # Shorter clips are zero-padded to max_seconds, longer ones cut.
    x = waves(2, seconds=0.6)
    padded = np.pad(x, ((0, 0), (0, RATE - x.shape[1])))
    np.testing.assert_allclose(model.predict(x, verbose=0),
                               model.predict(padded, verbose=0), atol=1e-6)
    longer = np.concatenate([padded, waves(2, 0.5, seed=3)], axis=1)
    np.testing.assert_allclose(model.predict(longer, verbose=0),
                               model.predict(padded, verbose=0), atol=1e-6)


def test_anatomy_and_frozen_backbone():
    model = build_audio_classifier(tiny_whisper(), 2, max_seconds=1.0,
                                   head={"hidden": [8]})
    anatomy = describe(model)
    assert (anatomy.backbone, anatomy.family, anatomy.head_kind) == (
        "backbone", "WhisperBackbone", "multiclass")
    assert anatomy.task in ("audio_classifier", "model")
    assert not model.get_layer("backbone").trainable
    names = [name for name, _ in backbone_blocks_of(model)]
    assert names == ["stem", "transformer_encoder_layer_0",
                     "transformer_encoder_layer_1", "top"]
    assert {w.path.split("/")[0] for w in model.trainable_weights} == {
        "head_dense_0", "head_output"}


def test_features_equal_keras_hub_whisper_audio_converter():
    converter = keras_hub.layers.WhisperAudioConverter(max_audio_length=1)
    np.testing.assert_allclose(whisper_mel_filters(), converter.mel_filters,
                               rtol=1e-6, atol=1e-9)
    layer = LogMelSpectrogram(80, RATE, max_seconds=1.0)
    x = waves(3, seconds=0.8)  # both pad to 1 s
    ours = np.asarray(layer(x))
    assert ours.shape == (3, 100, 80)
    np.testing.assert_allclose(ours, np.asarray(converter(x)), atol=1e-5)
    # And inside the model, on symbolic inputs.
    model = build_audio_classifier(tiny_whisper(), 2, max_seconds=1.0)
    inner = keras.Model(model.input, model.get_layer("preprocessing").output)
    np.testing.assert_allclose(inner.predict(x, verbose=0), ours, atol=1e-6)


def test_encoder_equals_the_backbones_encoder_output():
    backbone = tiny_whisper()
    features = np.random.default_rng(0).normal(size=(2, 60, 80)).astype("float32")
    full = backbone({"encoder_features": features,
                     "decoder_token_ids": np.ones((2, 3), "int32"),
                     "decoder_padding_mask": np.ones((2, 3), "int32")})
    encoder = whisper_encoder(backbone)
    np.testing.assert_allclose(np.asarray(encoder(features)),
                               np.asarray(full["encoder_sequence_output"]), atol=1e-6)
    assert not any("decoder" in w.path for w in encoder.weights)


def test_other_sample_rates_are_resampled_inside():
    model = build_audio_classifier(tiny_whisper(), 2, sample_rate=8000,
                                   max_seconds=1.0)
    x8k = waves(2, rate=8000)
    at_16k = resample(x8k, 8000, RATE)
    inner = keras.Model(model.input, model.get_layer("resample").output)
    np.testing.assert_allclose(inner.predict(x8k, verbose=0), at_16k, atol=1e-5)
    reference = build_audio_classifier(tiny_whisper(), 2, max_seconds=1.0)
    reference.set_weights(model.get_weights())
    np.testing.assert_allclose(model.predict(x8k, verbose=0),
                               reference.predict(at_16k, verbose=0), atol=1e-5)


@pytest.mark.parametrize("rates", [(48000, 16000), (44100, 16000), (8000, 16000)])
def test_resample_layer_equals_numpy_and_keeps_tones(rates):
    orig, target = rates
    x = waves(2, seconds=0.5, rate=orig)
    ours = np.asarray(Resample(orig, target, max_seconds=0.5)(x))
    assert ours.shape == (2, target // 2)
    np.testing.assert_allclose(ours, resample(x, orig, target), atol=1e-5)
    tone = np.sin(2 * np.pi * 1000 * np.arange(orig) / orig)
    expected = np.sin(2 * np.pi * 1000 * np.arange(target) / target)
    np.testing.assert_allclose(resample(tone, orig, target)[200:-200],
                               expected[200:-200], atol=1e-3)


def test_resample_removes_what_the_new_rate_cannot_hold():
    tone = np.sin(2 * np.pi * 10000 * np.arange(44100) / 44100)  # > 8 kHz
    assert np.sqrt(np.mean(resample(tone, 44100, 16000)[200:-200] ** 2)) < 1e-3


def test_attention_pooling_starts_as_mean_pooling():
    x = np.random.default_rng(0).normal(size=(2, 7, 5)).astype("float32")
    layer = AttentionPooling()
    np.testing.assert_allclose(np.asarray(layer(x))[:, 0], x.mean(axis=1), atol=1e-6)
    layer.query.assign(np.ones(5, "float32"))
    assert not np.allclose(np.asarray(layer(x))[:, 0], x.mean(axis=1))


def test_head_only_training_changes_only_the_head():
    model = build_audio_classifier(tiny_whisper(), 2, max_seconds=1.0,
                                   pooling="attention")
    changed = changed_after_fit(model, waves(8), np.arange(8) % 2)
    assert changed == {"head_attention_pool/query", "head_output/kernel",
                       "head_output/bias"}


def test_unfreezing_the_last_blocks():
    model = build_audio_classifier(tiny_whisper(), 2, max_seconds=1.0)
    unfreeze(model, last_n_blocks=2)
    changed = changed_after_fit(model, waves(8), np.arange(8) % 2)
    assert {p.split("/")[0] for p in changed} == {
        "transformer_encoder_layer_1", "encoder_layer_norm", "head_output"}


def test_lora_on_query_and_value_changes_only_adapters_and_head():
    model = build_audio_classifier(tiny_whisper(), 2, max_seconds=1.0)
    assert apply_lora(model, targets=("query", "value"), rank=2,
                      trainable=("head_",)) == 4
    changed = changed_after_fit(model, waves(8), np.arange(8) % 2)
    adapters = {p for p in changed if p.endswith(("/lora_a", "/lora_b"))}
    assert len(adapters) == 8
    assert all("/query/" in p or "/value/" in p for p in adapters)
    assert changed - adapters == {"head_output/kernel", "head_output/bias"}


@pytest.mark.parametrize("pooling, rate", [("mean", RATE), ("attention", 22050)])
def test_save_and_load_in_safe_mode_predicts_the_same(tmp_path, pooling, rate):
    model = build_audio_classifier(tiny_whisper(), 3, max_seconds=1.0,
                                   pooling=pooling, sample_rate=rate)
    model.get_layer("head_output").bias.assign([0.3, -0.2, 0.1])
    path = str(tmp_path / "audio.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = waves(2, rate=rate)
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-6)
    assert describe(loaded) == describe(model)


def test_bad_arguments_are_named():
    base = tiny_whisper()
    with pytest.raises(ValueError, match="pooling must be one of"):
        build_audio_classifier(base, 2, pooling="max")
    with pytest.raises(ValueError, match="not in head"):
        build_audio_classifier(base, 2, head={"pooling": "max"})
    with pytest.raises(ValueError, match="num_classes"):
        build_audio_classifier(base, 0)
    with pytest.raises(ValueError, match=r"max_seconds must be in \(0, 2\]"):
        build_audio_classifier(base, 2, max_seconds=3)
    with pytest.raises(ValueError, match="weights=None"):
        build_audio_classifier(base, 2, weights="imagenet")
    with pytest.raises(ValueError, match="sample_rate"):
        build_audio_classifier(base, 2, sample_rate=16000.0)
    with pytest.raises(ValueError, match="max_seconds must be a number"):
        build_audio_classifier(base, 2, max_seconds="2")
    other = keras_hub.models.BertBackbone(vocabulary_size=10, num_layers=1,
                                          num_heads=1, hidden_dim=4,
                                          intermediate_dim=4)
    with pytest.raises(ValueError, match="supports Whisper.*BertBackbone"):
        build_audio_classifier(other, 2)


def test_unavailable_preset_says_what_to_pass(no_network, tmp_path, monkeypatch):
    from kft.backbones.image_presets import PresetUnavailableError

    monkeypatch.setenv("KFT_ASSETS", str(tmp_path))
    with pytest.raises(PresetUnavailableError, match="kft convert whisper-tiny"):
        build_audio_classifier("whisper_tiny", 2)
    with pytest.raises(PresetUnavailableError, match="local keras-hub preset"):
        build_audio_classifier("whisper_tiny_en", 2)


# --- Audio folders ---------------------------------------------------------------

def write_wav(path, samples, rate=RATE, bits=16, fmt=1):
    """`samples` float in [-1, 1], `(frames,)` or `(frames, channels)`."""
    samples = np.asarray(samples, np.float64)
    samples = samples[:, None] if samples.ndim == 1 else samples
    if fmt == 3:
        data = samples.astype(f"<f{bits // 8}").tobytes()
    elif bits == 8:
        data = np.round(samples * 127 + 128).astype(np.uint8).tobytes()
    elif bits == 24:
        ints = np.round(samples * (2 ** 23 - 1)).astype("<i4").reshape(-1, 1)
        data = ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        scale = 2 ** (bits - 1) - 1
        data = np.round(samples * scale).astype(f"<i{bits // 8}").tobytes()
    channels = samples.shape[1]
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels, rate,
                            rate * channels * bits // 8, channels * bits // 8, bits)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt_chunk
            + b"data" + struct.pack("<I", len(data)) + data)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)


@pytest.mark.parametrize("bits, fmt, atol", [(8, 1, 1e-2), (16, 1, 1e-4),
                                              (24, 1, 1e-6), (32, 1, 1e-8),
                                              (32, 3, 0), (64, 3, 0)])
def test_read_wav_formats(tmp_path, bits, fmt, atol):
    stereo = np.stack([np.linspace(-0.9, 0.9, 50), np.linspace(0.5, -0.5, 50)], 1)
    write_wav(tmp_path / "a.wav", stereo, rate=8000, bits=bits, fmt=fmt)
    samples, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and samples.shape == (50, 2) and samples.dtype == np.float32
    np.testing.assert_allclose(samples, stereo, atol=atol + 1e-7)


def test_python_wave_module_files_are_read(tmp_path):
    tone = (np.sin(np.arange(400) / 5) * 20000).astype("<i2")
    with wave.open(str(tmp_path / "w.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(RATE)
        f.writeframes(tone.tobytes())
    np.testing.assert_allclose(read_wav(tmp_path / "w.wav")[0][:, 0], tone / 32768)


def test_load_audio_mixes_resamples_and_fits_the_length(tmp_path):
    t = np.arange(44100) / 44100
    left, right = np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)
    write_wav(tmp_path / "s.wav", np.stack([left, right], 1), rate=44100, bits=32,
              fmt=3)
    clip = load_audio(tmp_path / "s.wav", RATE)
    assert clip.shape == (RATE,)
    expected = 0.75 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE)
    np.testing.assert_allclose(clip[200:-200], expected[200:-200], atol=1e-3)
    short = load_audio(tmp_path / "s.wav", RATE, num_samples=2 * RATE)
    np.testing.assert_array_equal(short[RATE:], 0.0)
    np.testing.assert_array_equal(load_audio(tmp_path / "s.wav", RATE, 100),
                                  clip[:100])


def _speech_like_folder(root, per_class=5):
    for c, freq in enumerate((300, 1500)):
        for i in range(per_class):
            t = np.arange(RATE // 2) / RATE
            write_wav(root / f"class_{c}" / f"{i}.wav",
                      0.5 * np.sin(2 * np.pi * (freq + 10 * i) * t))
    return root


def test_from_audio_folder_batches_and_split(tmp_path):
    root = _speech_like_folder(tmp_path / "data")
    write_wav(root / "class_1" / "stereo_8k.wav",
              np.full((4000, 2), [0.2, 0.4]), rate=8000)
    (root / "class_0" / "notes.txt").write_text("not audio")
    (root / "class_0" / ".hidden.wav").write_bytes(b"junk")
    bundle = from_audio_folder(root, max_seconds=0.75, batch_size=4,
                               validation_split=0.2)
    assert bundle.class_names == ["class_0", "class_1"]
    assert bundle.input_shape == (12000,) and bundle.skipped_files == []
    x, y = next(iter(bundle.train))
    assert x.shape == (4, 12000) and x.dtype == "float32"
    n_train = sum(int(b[1].shape[0]) for b in bundle.train)
    n_val = sum(int(b[1].shape[0]) for b in bundle.val)
    assert (n_train, n_val) == (9, 2)
    clips = [np.asarray(w) for b in bundle.train.concatenate(bundle.val)
             for w in b[0]]
    # The stereo 8 kHz clip (0.5 s of 0.2 | 0.4), mixed to mono at 16 kHz.
    mixed = [w for w in clips if np.allclose(w[2000:6000], 0.3, atol=1e-3)]
    assert len(mixed) == 1 and np.all(mixed[0][8200:] == 0.0)


def test_bad_audio_files_are_skipped_and_counted(tmp_path):
    root = _speech_like_folder(tmp_path / "data", per_class=3)
    bad = {
        "empty.wav": b"",
        "corrupt.wav": os.urandom(64),
        "header_only.wav": b"RIFF\x24\x00\x00\x00WAVEfmt ",
    }
    for name, data in bad.items():
        (root / "class_0" / name).write_bytes(data)
    write_wav(root / "class_1" / "no_samples.wav", np.zeros((0,)))
    write_wav(root / "class_1" / "adpcm.wav", np.zeros(10), fmt=2)
    with pytest.warns(UserWarning, match="Skipped 5 unreadable audio file"):
        bundle = from_audio_folder(root, max_seconds=0.5, validation_split=0)
    assert sorted(os.path.basename(p) for p in bundle.skipped_files) == sorted(
        [*bad, "no_samples.wav", "adpcm.wav"])
    assert sum(int(b[1].shape[0]) for b in bundle.train) == 6
    with pytest.raises(ValueError, match="5 unreadable audio file"):
        from_audio_folder(root, max_seconds=0.5, on_bad_file="error")
    with pytest.raises(AudioFileError, match="format 2 with 16-bit"):
        read_wav(root / "class_1" / "adpcm.wav")


def test_audio_folder_errors(tmp_path):
    root = _speech_like_folder(tmp_path / "data", per_class=2)
    with pytest.raises(ValueError, match="on_bad_file"):
        from_audio_folder(root, on_bad_file="ignore")
    with pytest.raises(ValueError, match="max_seconds"):
        from_audio_folder(root, max_seconds=0)
    with pytest.raises(ValueError, match="not found"):
        from_audio_folder(tmp_path / "missing")
    for name in os.listdir(root / "class_1"):
        (root / "class_1" / name).write_bytes(b"broken")
    with pytest.warns(UserWarning):
        with pytest.raises(ValueError, match=r"\['class_1'\] hold no readable"):
            from_audio_folder(root)
    single = tmp_path / "single"
    write_wav(single / "only" / "a.wav", np.zeros(10))
    with pytest.raises(ValueError, match="at least two"):
        from_audio_folder(single)


def test_audio_folder_trains_a_classifier(tmp_path):
    root = _speech_like_folder(tmp_path / "data", per_class=4)
    train, val = from_audio_folder(root, max_seconds=0.5, batch_size=4, cache=True)
    model = build_audio_classifier(tiny_whisper(), 2, max_seconds=0.5)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(train, validation_data=val, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


# --- The real Whisper tiny.en encoder ---------------------------------------------

@pytest.mark.large
@pytest.mark.slow
def test_whisper_tiny_classifier_uses_the_pretrained_encoder(tmp_path):
    from test_convert_ctranslate2 import speech_clip
    from test_convert_ctranslate2 import whisper_tiny_preset

    preset = whisper_tiny_preset()
    model = build_audio_classifier(preset, 2, max_seconds=2.0)
    assert model.count_params() < 9_000_000  # encoder only: no 20M decoder
    clip = speech_clip("hello world", tmp_path / "hello.wav")[None, :2 * RATE]
    backbone = keras_hub.models.Backbone.from_preset(preset)
    features = np.asarray(LogMelSpectrogram(max_seconds=2.0)(clip))
    full = backbone({"encoder_features": features,
                     "decoder_token_ids": np.ones((1, 1), "int32"),
                     "decoder_padding_mask": np.ones((1, 1), "int32")})
    inner = keras.Model(model.input, model.get_layer("head_pool").input)
    np.testing.assert_allclose(inner.predict(clip, verbose=0),
                               np.asarray(full["encoder_sequence_output"]),
                               atol=1e-4)
    assert model.predict(clip, verbose=0).shape == (1, 2)


# --- Moonshine: raw audio through its own conv stem --------------------------------

def tiny_moonshine(num_layers=2):
    """A random Moonshine small enough for CPU tests (1 s = 40 positions)."""
    return keras_hub.models.MoonshineBackbone(
        vocabulary_size=16, filter_dim=32, encoder_num_layers=num_layers,
        decoder_num_layers=1, hidden_dim=32, intermediate_dim=32,
        encoder_num_heads=2, decoder_num_heads=2)


def test_the_family_table_splits_moonshine_encoders():
    assert "MoonshineBackbone" in families.KERAS_HUB_SPLITTERS


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_moonshine_takes_raw_waveforms(pooling):
    model = build_audio_classifier(tiny_moonshine(), 3, max_seconds=1.0,
                                   pooling=pooling)
    assert model.name == "moonshine_audio_classifier"
    assert model.input_shape == (None, None)
    assert model.get_layer("preprocessing").compute_output_shape((2, None)) == (
        2, RATE, 1)
    pooled = "head_attention_pool" if pooling == "attention" else "head_pool"
    assert tuple(model.get_layer(pooled).input.shape) == (None, 40, 32)
    probs = model.predict(waves(2), verbose=0)
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    x = waves(2, seconds=0.6)
    padded = np.pad(x, ((0, 0), (0, RATE - x.shape[1])))
    np.testing.assert_allclose(model.predict(x, verbose=0),
                               model.predict(padded, verbose=0), atol=1e-6)


def test_moonshine_encoder_equals_the_backbones_encoder_output():
    backbone = tiny_moonshine()
    audio = waves(2)[:, :, None]
    full = backbone({"encoder_input_values": audio,
                     "encoder_padding_mask": np.ones((2, RATE), bool),
                     "decoder_token_ids": np.ones((2, 3), "int32"),
                     "decoder_padding_mask": np.ones((2, 3), bool)})
    encoder = moonshine_encoder(backbone)
    np.testing.assert_allclose(np.asarray(encoder(audio)),
                               np.asarray(full["encoder_sequence_output"]),
                               atol=1e-6)
    assert not any("decoder" in w.path or "token_embedding" in w.path
                   for w in encoder.weights)


def test_moonshine_anatomy_blocks_and_frozen_backbone():
    model = build_audio_classifier(tiny_moonshine(), 2, max_seconds=1.0,
                                   head={"hidden": [8]})
    anatomy = describe(model)
    assert (anatomy.backbone, anatomy.family) == ("backbone", "MoonshineBackbone")
    assert not model.get_layer("backbone").trainable
    blocks = backbone_blocks_of(model)
    assert [name for name, _ in blocks] == [
        "stem", "encoder_block_0", "encoder_block_1", "top"]
    stem = {layer.name for layer in blocks[0][1]}
    assert {"conv1", "group_norm", "conv2", "conv3",
            "encoder_rotary_embedding"} <= stem
    assert [layer.name for layer in blocks[-1][1]] == ["encoder_final_layer_norm"]
    assert {w.path.split("/")[0] for w in model.trainable_weights} == {
        "head_dense_0", "head_output"}


def test_moonshine_head_only_and_last_block_training():
    model = build_audio_classifier(tiny_moonshine(), 2, max_seconds=1.0)
    changed = changed_after_fit(model, waves(8), np.arange(8) % 2)
    assert changed == {"head_output/kernel", "head_output/bias"}
    model = build_audio_classifier(tiny_moonshine(), 2, max_seconds=1.0)
    unfreeze(model, last_n_blocks=2)
    changed = changed_after_fit(model, waves(8), np.arange(8) % 2)
    assert {p.split("/")[0] for p in changed} == {
        "encoder_block_1", "encoder_final_layer_norm", "head_output"}


def test_moonshine_lora_changes_only_adapters_and_head():
    model = build_audio_classifier(tiny_moonshine(), 2, max_seconds=1.0)
    assert apply_lora(model, targets=("query", "value"), rank=2,
                      trainable=("head_",)) == 4
    changed = changed_after_fit(model, waves(8), np.arange(8) % 2)
    adapters = {p for p in changed if p.endswith(("/lora_a", "/lora_b"))}
    assert len(adapters) == 8
    assert all("/query/" in p or "/value/" in p for p in adapters)
    assert changed - adapters == {"head_output/kernel", "head_output/bias"}


@pytest.mark.parametrize("pooling, rate, lora", [("mean", RATE, False),
                                                 ("attention", 22050, True)])
def test_moonshine_save_and_load_in_safe_mode(tmp_path, pooling, rate, lora):
    model = build_audio_classifier(tiny_moonshine(), 3, max_seconds=1.0,
                                   pooling=pooling, sample_rate=rate)
    if lora:
        apply_lora(model, targets=("query", "value"), rank=2)
        for w in model.weights:
            if w.path.endswith("/lora_b"):
                w.assign(np.full(w.shape, 0.05, "float32"))
    model.get_layer("head_output").bias.assign([0.3, -0.2, 0.1])
    path = str(tmp_path / "moonshine.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = waves(2, rate=rate)
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-6)
    assert describe(loaded) == describe(model)


def test_moonshine_lengths_and_offline_presets(no_network):
    from kft.backbones.image_presets import PresetUnavailableError

    base = tiny_moonshine()
    with pytest.raises(ValueError, match="max_seconds must be in .* Moonshine"):
        build_audio_classifier(base, 2, max_seconds=0.05)
    with pytest.raises(ValueError, match="max_seconds must be in .* Moonshine"):
        build_audio_classifier(base, 2, max_seconds=60)
    assert build_audio_classifier(base, 2, max_seconds=0.056).output_shape == (
        None, 2)
    with pytest.raises(PresetUnavailableError, match="MoonshineBackbone"):
        build_audio_classifier("moonshine_tiny_en", 2)


# --- FLAC and OGG through soundfile (libsndfile) -----------------------------------

def _stereo_int16(rate, seconds=0.5, freq=440):
    t = np.arange(int(rate * seconds)) / rate
    tones = np.stack([0.5 * np.sin(2 * np.pi * freq * t),
                      0.3 * np.sin(2 * np.pi * 1.5 * freq * t)], 1)
    return np.round(tones * 32767).astype("<i2")


def _write_formats(folder, stem, ints, rate):
    """The same 16-bit clip as .wav (wave module), .flac and .ogg (Vorbis)."""
    soundfile = pytest.importorskip("soundfile")
    os.makedirs(folder, exist_ok=True)
    with wave.open(str(folder / f"{stem}.wav"), "wb") as f:
        f.setnchannels(ints.shape[1])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(ints.tobytes())
    soundfile.write(folder / f"{stem}.flac", ints, rate, subtype="PCM_16")
    soundfile.write(folder / f"{stem}.ogg", ints / 32768, rate, subtype="VORBIS")


def test_flac_and_ogg_decode_like_the_wav(tmp_path):
    from kft.data.audio import read_audio

    _write_formats(tmp_path, "clip", _stereo_int16(22050), 22050)
    wav, rate = read_wav(tmp_path / "clip.wav")
    flac, flac_rate = read_audio(tmp_path / "clip.flac")
    ogg, ogg_rate = read_audio(tmp_path / "clip.ogg")
    assert rate == flac_rate == ogg_rate == 22050
    assert wav.shape == flac.shape == ogg.shape == (11025, 2)
    assert flac.dtype == ogg.dtype == np.float32
    np.testing.assert_array_equal(flac, wav)  # lossless, same quantization
    assert np.sqrt(np.mean((ogg - wav) ** 2)) < 0.01  # Vorbis: lossy
    np.testing.assert_allclose(ogg, wav, atol=0.05)
    np.testing.assert_array_equal(read_audio(tmp_path / "clip.wav")[0], wav)
    # Mixed to mono, resampled and cut as WAV files are.
    at_16k = load_audio(tmp_path / "clip.wav", RATE, num_samples=RATE // 4)
    np.testing.assert_array_equal(
        load_audio(tmp_path / "clip.flac", RATE, num_samples=RATE // 4), at_16k)
    np.testing.assert_allclose(
        load_audio(tmp_path / "clip.ogg", RATE, num_samples=RATE // 4), at_16k,
        atol=0.05)


def test_audio_folder_mixes_wav_flac_and_ogg(tmp_path):
    root = tmp_path / "data"
    for label, freq in enumerate((300, 900)):
        folder = root / f"class_{label}"
        for i in range(2):
            _write_formats(folder, f"c{i}", _stereo_int16(22050, freq=freq + 50 * i),
                           22050)
    (root / "class_0" / "corrupt.flac").write_bytes(os.urandom(64))
    (root / "class_1" / "empty.ogg").write_bytes(b"")
    with pytest.warns(UserWarning, match="Skipped 2 unreadable audio file"):
        bundle = from_audio_folder(root, max_seconds=0.25, validation_split=0,
                                   shuffle=False, batch_size=4)
    assert sorted(os.path.basename(p) for p in bundle.skipped_files) == [
        "corrupt.flac", "empty.ogg"]
    clips = [(w, int(y)) for x, ys in bundle.train for w, y in zip(x.numpy(), ys)]
    assert len(clips) == 12 and all(w.shape == (RATE // 4,) for w, _ in clips)
    assert sorted(y for _, y in clips) == [0] * 6 + [1] * 6
    # Each WAV clip is there with a FLAC twin equal to it and an OGG twin
    # close to it; the other clips are far.
    wavs = [load_audio(p, RATE, RATE // 4) for p in sorted(root.glob("*/*.wav"))]
    for reference in wavs:
        distances = sorted(np.abs(w - reference).max() for w, _ in clips)
        assert distances[:2] == [0.0, 0.0] and distances[2] < 0.05 < distances[3]
    with pytest.raises(ValueError, match="2 unreadable audio file"):
        from_audio_folder(root, max_seconds=0.25, on_bad_file="error")
