"""Every registered kft Keras object saves, reloads and computes the same.

`CASES` holds one case per name that kft registers with
`keras.saving.register_keras_serializable`; `test_every_registered_object_
has_a_case` fails when a new registered object has none. Layers go through
a `.keras` file (`model.save` + `load_model(..., safe_mode=True)`), the
optimizer and the schedule through `keras.saving.serialize_keras_object` /
`deserialize_keras_object`. kft has no callback with a `get_config`.
"""

import importlib
import json
import pkgutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_images
from conftest import tiny_classifier

import kft
from kft.augment.audio import AudioAugmentationLayer
from kft.augment.audio import SpecAugment
from kft.augment.image import ImageAugmentationLayer
from kft.augment.image_layers import RandomAffine
from kft.augment.image_layers import RandomBrightnessScale
from kft.augment.image_layers import RandomChannelShift
from kft.backbones.preprocessing import ImagePreprocessing
from kft.lora.dense import LoRADense
from kft.lora.dense import LoRAEinsumDense
from kft.models.heads import FirstToken
from kft.prompt.layer import PromptTuning
from kft.prompt.layer import _InsertIds
from kft.training.optimizers import ScaledSchedule

# A seed tensor for the image layers' stateless draws: the same seed gives
# the same transform, so a reloaded layer must give the same images.
SEED = tf.constant([3, 7], tf.int32)


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                               rtol=1e-5, atol=1e-5)


def _reload(layer, x, tmp_path):
    """`layer` in a one-layer functional model, saved and loaded; asserts
    the same inference outputs and returns the reloaded layer."""
    inputs = keras.Input(x.shape[1:], dtype=str(x.dtype))
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    _close(loaded.predict_on_batch(x), model.predict_on_batch(x))
    reloaded = loaded.get_layer(layer.name)
    assert type(reloaded) is type(layer)
    return reloaded


def _images(n=4, size=16):
    return make_images(n, size=size, classes=2)[0]


def _random_image_layer(layer, tmp_path):
    x = _images()
    reloaded = _reload(layer, x, tmp_path)
    augmented = layer(x, training=True, seed=SEED)
    assert not np.allclose(augmented, x)  # the check below means something
    _close(reloaded(x, training=True, seed=SEED), augmented)


def case_image_preprocessing(tmp_path):
    for mode in ("tf", "torch", "caffe"):
        layer = ImagePreprocessing(mode, name=f"preprocessing_{mode}")
        _reload(layer, _images(), tmp_path)


def case_image_augmentation_layer(tmp_path):
    layer = ImageAugmentationLayer(
        rotation_range=20, width_shift_range=0.1, height_shift_range=2,
        zoom_range=0.2, shear_range=10, horizontal_flip=True,
        brightness_range=[0.8, 1.2], channel_shift_range=20.0,
        rescale=1 / 255, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2], seed=1,
        name="image_augmentation")
    _random_image_layer(layer, tmp_path)


def case_random_affine(tmp_path):
    layer = RandomAffine(rotation=30, shift=(0.1, (-0.2, 0.2)), shear=5,
                         zoom=(0.8, 1.2), horizontal_flip=True,
                         fill_mode="reflect", seed=2, name="affine")
    _random_image_layer(layer, tmp_path)


def case_random_brightness_scale(tmp_path):
    _random_image_layer(RandomBrightnessScale(0.5, 1.5, seed=3,
                                              name="brightness"), tmp_path)


def case_random_channel_shift(tmp_path):
    _random_image_layer(RandomChannelShift(30.0, seed=4, name="channel_shift"),
                        tmp_path)


def case_audio_augmentation_layer(tmp_path):
    rng = np.random.default_rng(0)
    clips = rng.normal(size=(3, 250)).astype("float32")
    waves = np.sin(np.arange(2 * 1000) / 7.0).reshape(2, 1000).astype("float32")
    layer = AudioAugmentationLayer(background_snr_db=[5, 10], gain_db=[-3, 3],
                                   seed=5, name="audio_augmentation")
    layer.set_background(clips)
    reloaded = _reload(layer, waves, tmp_path)
    # The clips come back with the weights; the config keeps their shape.
    np.testing.assert_array_equal(np.asarray(reloaded.background), clips)
    # Fresh seed generators (their state is not saved) in both layers:
    # the same draws, so the same mix of these clips.
    augmented = layer(waves, training=True)
    assert not np.allclose(augmented, waves)
    _close(reloaded(waves, training=True), augmented)


def case_spec_augment(tmp_path):
    spectrograms = np.ones((2, 30, 20), "float32")
    layer = SpecAugment(freq_mask=5, time_mask=8, num_freq_masks=2, seed=6,
                        name="spec_augment")
    reloaded = _reload(layer, spectrograms, tmp_path)
    masked = layer(spectrograms, training=True)
    assert (np.asarray(masked) == 0).any()
    _close(reloaded(spectrograms, training=True), masked)


def _nonzero_adapters(layer):
    # B starts at zero (a fresh adapter changes nothing): give the update
    # a value, so that the reloaded output depends on the saved adapters.
    rng = np.random.default_rng(1)
    layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))


def case_lora_dense(tmp_path):
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    layer = LoRADense(4, rank=2, alpha=4, name="lora_dense")
    layer.build(x.shape)
    _nonzero_adapters(layer)
    reloaded = _reload(layer, x, tmp_path)
    assert (reloaded.rank, reloaded.alpha) == (2, 4.0)


def case_lora_einsum_dense(tmp_path):
    x = np.random.default_rng(0).normal(size=(2, 3, 6)).astype("float32")
    layer = LoRAEinsumDense("abc,cd->abd", (None, 4), rank=2, alpha=8,
                            bias_axes="d", name="lora_einsum")
    layer.build(x.shape)
    _nonzero_adapters(layer)
    _reload(layer, x, tmp_path)


def case_prompt_tuning(tmp_path):
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    layer = PromptTuning(3, name="prompt_tuning")
    reloaded = _reload(layer, x, tmp_path)
    np.testing.assert_array_equal(np.asarray(reloaded.prompt),
                                  np.asarray(layer.prompt))


def case_insert_ids(tmp_path):
    ids = np.array([[101, 7, 8, 102], [101, 9, 102, 0]], "int32")
    layer = _InsertIds(2, 1, name="insert_ids")
    _reload(layer, ids, tmp_path)


def case_classifier(tmp_path):
    model = tiny_classifier(2)
    x = _images(2, size=32)
    path = tmp_path / "classifier.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is type(model)
    if getattr(model, "anatomy", None) is not None:
        assert loaded.anatomy.get_config() == model.anatomy.get_config()
    _close(loaded.predict_on_batch(x), model.predict_on_batch(x))


def case_first_token(tmp_path):
    layer = FirstToken(name="first_token")
    x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype("float32")
    _reload(layer, x, tmp_path)
    _close(layer(x), x[:, 0])


def case_sft_causal_lm(tmp_path):
    from llm_fixtures import tiny_causal_lm

    from kft.sft.model import SFTCausalLM

    # Untied and without a preprocessor: keras-hub 0.32 cannot reload a tied
    # Llama 3 backbone or a tokenizer with custom special tokens from .keras.
    lm = tiny_causal_lm(sequence_length=8, tie_word_embeddings=False)
    lm.preprocessor = None
    model = SFTCausalLM(lm)
    ids = np.array([[1, 5, 7, 9], [1, 6, 8, 0]], "int32")
    x = {"token_ids": ids, "padding_mask": (ids > 0).astype("int32")}
    expected = model.predict_on_batch(x)
    path = tmp_path / "sft.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is SFTCausalLM
    _close(loaded.predict_on_batch(x), expected)

def case_preference_causal_lm(tmp_path):
    from llm_fixtures import tiny_causal_lm

    from kft.preference.model import PreferenceCausalLM

    lm = tiny_causal_lm(sequence_length=8, tie_word_embeddings=False)
    lm.preprocessor = None  # as case_sft_causal_lm: what keras-hub reloads
    model = PreferenceCausalLM(lm, loss="simpo", beta=1.5, gamma=0.3)
    ids = np.array([[[1, 5, 7, 9], [1, 5, 8, 0]], [[1, 6, 8, 0], [1, 6, 0, 0]]],
                   "int32")
    x = {"token_ids": ids, "padding_mask": ids > 0}
    expected = model.predict_on_batch(x)
    path = tmp_path / "preference.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is PreferenceCausalLM
    assert (loaded.loss_name, loaded.beta, loaded.options) == ("simpo", 1.5,
                                                               {"gamma": 0.3})
    _close(loaded.predict_on_batch(x), expected)


def case_rl_causal_lm(tmp_path):
    from llm_fixtures import tiny_causal_lm

    from kft.rl.model import RLCausalLM
    from kft.rl.rollout import RolloutConfig

    lm = tiny_causal_lm(sequence_length=8, tie_word_embeddings=False)
    lm.preprocessor = None  # as case_sft_causal_lm: what keras-hub reloads
    rollout = RolloutConfig(num_generations=2, max_new_tokens=3,
                            max_prompt_length=5, temperature=0.7)
    model = RLCausalLM(lm, rollout=rollout, loss_type="dapo", advantage="rloo",
                       beta=0.0, epsilon_high=0.28, num_iterations=2)
    ids = np.array([[1, 5, 7, 9, 3], [1, 6, 8, 0, 0]], "int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": ids[:, :-1] > 0,
         "targets": ids[:, 1:]}
    expected = model.score(x)["old_logps"]  # at temperature 0.7
    path = tmp_path / "rl.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is RLCausalLM
    assert (loaded.loss_type, loaded.advantage, loaded.epsilon_high,
            loaded.num_iterations, loaded.rollout) == ("dapo", "rloo", 0.28, 2,
                                                       rollout)
    _close(loaded.score(x)["old_logps"], expected)


def _vision_case(build, tmp_path):
    # Reconstructed after the working copy of this file was lost: the
    # vision tests' tiny keras-hub EfficientNet encoder.
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vision"))
    from vision_fixtures import SIZE
    from vision_fixtures import tiny_encoder

    model = build(tiny_encoder(), SIZE)
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3))
    x = model.preprocessor(x.astype("float32"))
    expected = model(x)
    path = tmp_path / "vision.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is type(model)
    assert kft.describe(loaded) == kft.describe(model)
    for a, b in zip(keras.tree.flatten(expected), keras.tree.flatten(loaded(x))):
        _close(a, b)


def case_detector(tmp_path):
    from kft.vision import build_detector

    _vision_case(lambda encoder, size: build_detector(
        encoder, 3, image_size=(size, size), levels=(3, 5), head_conv_layers=1),
        tmp_path)


def case_segmenter(tmp_path):
    from kft.vision import build_segmenter

    _vision_case(lambda encoder, size: build_segmenter(
        encoder, 4, image_size=(size, size)), tmp_path)


def case_log_mel_spectrogram(tmp_path):
    from kft.models.audio import LogMelSpectrogram

    waves = np.random.default_rng(0).normal(size=(2, 1600)).astype("float32")
    layer = LogMelSpectrogram(num_mels=16, max_seconds=0.1, name="log_mel")
    _reload(layer, waves, tmp_path)


def case_resample(tmp_path):
    from kft.models.audio import Resample

    waves = np.random.default_rng(0).normal(size=(2, 800)).astype("float32")
    _reload(Resample(8000, 16000, max_seconds=0.1, name="resample"), waves,
            tmp_path)


def case_clip_waveform(tmp_path):
    from kft.models.audio import ClipWaveform

    waves = np.random.default_rng(0).normal(size=(2, 1200)).astype("float32")
    layer = ClipWaveform(sample_rate=8000, max_seconds=0.1, name="clip")
    reloaded = _reload(layer, waves, tmp_path)
    assert (reloaded.sample_rate, reloaded.num_samples) == (8000, 800)


def case_attention_pooling(tmp_path):
    from kft.models.audio import AttentionPooling

    layer = AttentionPooling(name="attention_pooling")
    x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype("float32")
    layer.build(x.shape)
    layer.query.assign([0.5, -1.0, 2.0])  # not the mean-pooling start
    reloaded = _reload(layer, x, tmp_path)
    _close(reloaded.query, layer.query)


def case_lora_conv2d(tmp_path):
    from kft.lora.conv import LoRAConv2D

    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    layer = LoRAConv2D(4, 3, rank=2, alpha=4, padding="same", use_dora=True,
                       name="lora_conv2d")
    layer.build(x.shape)
    _nonzero_adapters(layer)
    reloaded = _reload(layer, x, tmp_path)
    assert (reloaded.adapter_rank, reloaded.use_dora) == (2, True)


def _nonzero_embedding_adapters(layer):
    # An embedding adapter starts with A at zero (B random): give A values.
    rng = np.random.default_rng(1)
    layer.lora_a.assign(rng.normal(size=layer.lora_a.shape).astype("float32"))


def case_lora_embedding(tmp_path):
    from kft.lora.embedding import LoRAEmbedding

    ids = np.random.default_rng(0).integers(0, 10, (2, 5)).astype("int32")
    layer = LoRAEmbedding(10, 4, rank=2, alpha=4, name="lora_embedding")
    layer.build()
    _nonzero_embedding_adapters(layer)
    _reload(layer, ids, tmp_path)


def case_lora_reversible_embedding(tmp_path):
    from kft.lora.embedding import LoRAReversibleEmbedding

    ids = np.random.default_rng(0).integers(0, 10, (2, 5)).astype("int32")
    layer = LoRAReversibleEmbedding(10, 4, rank=2, alpha=4,
                                    name="lora_reversible_embedding")
    layer.build()
    _nonzero_embedding_adapters(layer)
    reloaded = _reload(layer, ids, tmp_path)
    hidden = np.random.default_rng(2).normal(size=(2, 3, 4)).astype("float32")
    _close(reloaded(hidden, reverse=True), layer(hidden, reverse=True))


def case_prompt_tuned_causal_lm(tmp_path):
    from llm_fixtures import tiny_causal_lm

    from kft.prompt.causal_lm import PromptTunedCausalLM

    # Untied and without a preprocessor: keras-hub 0.32 cannot reload a tied
    # Llama 3 backbone or a tokenizer with custom special tokens from .keras.
    lm = tiny_causal_lm(sequence_length=8, tie_word_embeddings=False)
    lm.preprocessor = None
    model = PromptTunedCausalLM(lm, 3)
    model.virtual_tokens.assign(
        np.random.default_rng(0).normal(size=(3, 32)).astype("float32"))
    ids = np.array([[1, 5, 7, 9], [1, 6, 8, 0]], "int32")
    x = {"token_ids": ids, "padding_mask": (ids > 0).astype("int32")}
    expected = model.predict_on_batch(x)
    path = tmp_path / "prompt_tuned.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is PromptTunedCausalLM
    np.testing.assert_array_equal(np.asarray(loaded.virtual_tokens),
                                  np.asarray(model.virtual_tokens))
    _close(loaded.predict_on_batch(x), expected)


def _through_json(obj):
    """Serialized, written as JSON text (as in a `.keras` file), read back
    and deserialized. (Keras' `from_config` edits the config it is given:
    the JSON text also keeps the original apart from the copy.)"""
    text = json.dumps(keras.saving.serialize_keras_object(obj))
    return keras.saving.deserialize_keras_object(json.loads(text),
                                                 safe_mode=True)


def _two_layer_model():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="body")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))


def case_discriminative_optimizer(tmp_path):
    schedule = keras.optimizers.schedules.CosineDecay(1e-2, 10)
    model = _two_layer_model()
    optimizer = kft.optimizers.discriminative(
        model, {"head": ScaledSchedule(schedule, 0.5)}, default_lr=1e-3)
    reloaded = _through_json(optimizer)
    assert type(reloaded) is type(optimizer)
    assert (keras.saving.serialize_keras_object(reloaded)
            == keras.saving.serialize_keras_object(optimizer))
    # Two copies of the model, one step each with the same gradients: the
    # same groups and rates give the same weights.
    copy = _two_layer_model()
    copy.set_weights(model.get_weights())
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=v.shape).astype("float32")
             for v in model.trainable_variables]
    for _ in range(2):
        optimizer.apply(grads, model.trainable_variables)
        reloaded.apply(grads, copy.trainable_variables)
    moved = [not np.allclose(a, b) for a, b in
             zip(model.get_weights(), _two_layer_model().get_weights())]
    assert any(moved)
    for a, b in zip(model.get_weights(), copy.get_weights()):
        _close(b, a)
    assert reloaded.learning_rate == pytest.approx(optimizer.learning_rate)


def case_scaled_schedule(tmp_path):
    schedule = ScaledSchedule(
        keras.optimizers.schedules.CosineDecay(1e-3, 100, warmup_target=2e-3,
                                               warmup_steps=10), 0.25)
    reloaded = _through_json(schedule)
    assert type(reloaded) is ScaledSchedule
    for step in (0, 5, 10, 60, 110):
        _close(reloaded(step), schedule(step))


def case_causal_lm_loss(tmp_path):
    from kft.losses.causal_lm import CausalLMLoss

    loss = CausalLMLoss(chunk_size=3, reduction="sum")
    reloaded = _through_json(loss)
    assert type(reloaded) is CausalLMLoss
    assert (reloaded.chunk_size, reloaded.reduction) == (3, "sum")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype("float32")
    labels = rng.integers(0, 7, (2, 5)).astype("int32")
    _close(reloaded(labels, logits), loss(labels, logits))


# Registered name -> case. A new registered kft object needs one here.
CASES = {
    "kft>ImagePreprocessing": case_image_preprocessing,
    "kft>ImageAugmentationLayer": case_image_augmentation_layer,
    "kft>RandomAffine": case_random_affine,
    "kft>RandomBrightnessScale": case_random_brightness_scale,
    "kft>RandomChannelShift": case_random_channel_shift,
    "kft>AudioAugmentationLayer": case_audio_augmentation_layer,
    "kft>SpecAugment": case_spec_augment,
    "kft>LoRADense": case_lora_dense,
    "kft>LoRAEinsumDense": case_lora_einsum_dense,
    "kft>LoRAConv2D": case_lora_conv2d,
    "kft>LoRAEmbedding": case_lora_embedding,
    "kft>LoRAReversibleEmbedding": case_lora_reversible_embedding,
    "kft>PromptTuning": case_prompt_tuning,
    "kft>_InsertIds": case_insert_ids,
    "kft>Classifier": case_classifier,
    "kft>Detector": case_detector,
    "kft>Segmenter": case_segmenter,
    "kft>FirstToken": case_first_token,
    "kft>LogMelSpectrogram": case_log_mel_spectrogram,
    "kft>Resample": case_resample,
    "kft>AttentionPooling": case_attention_pooling,
    "kft>ClipWaveform": case_clip_waveform,
    "kft>SFTCausalLM": case_sft_causal_lm,
    "kft>PreferenceCausalLM": case_preference_causal_lm,
    "kft>RLCausalLM": case_rl_causal_lm,
    "kft>PromptTunedCausalLM": case_prompt_tuned_causal_lm,
    "kft>DiscriminativeOptimizer": case_discriminative_optimizer,
    "kft>ScaledSchedule": case_scaled_schedule,
    "kft>CausalLMLoss": case_causal_lm_loss,
}
# Registered but never instantiated, so there is nothing to round-trip:
# `LoRAContainer` is only the loader that `load_model` calls for a
# keras-hub backbone saved with LoRA layers inside (tests/lora/test_lora.py
# reloads such backbones).
NOT_INSTANTIATED = {"kft>LoRAContainer"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_saves_reloads_and_computes_the_same(name, tmp_path):
    CASES[name](tmp_path)


def _registered_kft_names():
    for module in pkgutil.walk_packages(kft.__path__, "kft."):
        importlib.import_module(module.name)
    return {name for name in keras.saving.get_custom_objects()
            if name.startswith("kft>")}


def test_every_registered_object_has_a_case():
    registered = _registered_kft_names()
    missing = registered - set(CASES) - NOT_INSTANTIATED
    assert not missing, (
        f"Registered kft objects without a serialization case: "
        f"{sorted(missing)}. Add one to CASES in tests/test_serialization.py.")
    stale = (set(CASES) | NOT_INSTANTIATED) - registered
    assert not stale, f"Cases for names kft no longer registers: {sorted(stale)}"
