import numpy as np
import pytest
import tensorflow as tf

from kft.augment import AudioAugmentation
from kft.augment import SpecAugment
from kft.augment import TextAugmentation
from kft.augment import WordNet
from kft.augment.text import WORDNET_DIRS

SYNONYMS = {"quick": ["fast", "speedy"], "brown": ["tan"], "fox": ["vixen"],
            "lazy": ["idle", "slothful"], "dog": ["hound"], "jumps": ["leaps"]}
TEXT = "the quick brown fox jumps over the lazy dog near the old river bank"


def _changed(a, b):
    a, b = a.split(), b.split()
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


@pytest.mark.parametrize("op", ["synonym_replacement", "random_swap",
                                "random_deletion", "random_insertion"])
def test_each_operation_changes_at_most_its_share(op):
    augment = TextAugmentation(**{op: 0.2}, synonyms=SYNONYMS, seed=0)
    n = len(TEXT.split())
    budget = max(2, int(0.2 * n))
    outputs = [augment(TEXT) for _ in range(30)]
    assert any(o != TEXT for o in outputs)
    for out in outputs:
        if op == "random_insertion":
            assert len(out.split()) - n <= budget
        elif op == "random_deletion":
            assert 0 < n - len(out.split()) <= budget or out == TEXT
        else:
            assert len(out.split()) == n and _changed(TEXT, out) <= budget


def test_synonym_replacement_uses_the_dictionary_and_skips_stopwords():
    out = TextAugmentation(synonym_replacement=1.0, synonyms=SYNONYMS, seed=1)(TEXT)
    words = out.split()
    assert words[0] == "the" and words[6] == "the"
    assert words[1] in SYNONYMS["quick"] and words[8] in SYNONYMS["dog"]


def test_deletion_never_returns_an_empty_string():
    augment = TextAugmentation(random_deletion=1.0, synonyms={}, seed=0)
    for text in ["one", "two words", "a b c"]:
        for _ in range(20):
            assert augment(text).strip()


def test_labels_stay_with_their_texts_and_seeds_repeat():
    texts, labels = ["good movie indeed", "bad lazy dog"], [1, 0]
    a = TextAugmentation(random_swap=0.5, synonyms=SYNONYMS, seed=3)
    out, out_labels = a.augment(texts, labels, copies=3)
    assert out_labels == [1, 1, 1, 1, 0, 0, 0, 0]
    assert out[0] == texts[0] and out[4] == texts[1]
    assert sorted(out[1].split()) == sorted(texts[0].split())
    again = TextAugmentation(random_swap=0.5, synonyms=SYNONYMS, seed=3)
    assert again.augment(texts, labels, copies=3) == (out, out_labels)


def test_back_translation_hook_and_tf_data():
    augment = TextAugmentation(back_translate=str.upper,
                               back_translate_probability=1.0, synonyms={})
    assert augment("hello there") == "HELLO THERE"
    ds = tf.data.Dataset.from_tensor_slices((["a b c", "d e"], [0, 1]))
    out = list(augment.map(ds).as_numpy_iterator())
    assert [(t.decode(), int(y)) for t, y in out] == [("A B C", 0), ("D E", 1)]
    with pytest.raises(ValueError, match="back_translate"):
        TextAugmentation(back_translate_probability=0.5)
    with pytest.raises(ValueError, match="random_swap must be in"):
        TextAugmentation(random_swap=2)


@pytest.mark.large
@pytest.mark.skipif(not any(__import__("os").path.isdir(d) for d in WORDNET_DIRS),
                    reason="WordNet not installed (apt-get install wordnet-base)")
def test_wordnet_synonyms_from_the_database_files():
    wordnet = WordNet()
    assert "glad" in wordnet.synonyms("happy")
    assert "automobile" in wordnet.synonyms("car")
    out = TextAugmentation(synonym_replacement=1.0, synonyms=wordnet, seed=0)(
        "happy car")
    assert out != "happy car"


def _tone(n=2, length=8000):
    t = np.arange(length) / 8000.0
    return np.stack([np.sin(2 * np.pi * 440 * t) * (0.5 + 0.2 * i)
                     for i in range(n)]).astype("float32")


def test_noise_at_target_snr_within_half_a_db():
    waves = _tone(4)
    layer = AudioAugmentation(noise_snr_db=10.0, seed=0).layer()
    out = np.asarray(layer(waves, training=True))
    assert out.shape == waves.shape and out.dtype == np.float32
    noise = out - waves
    snr = 10 * np.log10((waves ** 2).mean(axis=1) / (noise ** 2).mean(axis=1))
    np.testing.assert_allclose(snr, 10.0, atol=0.5)
    np.testing.assert_array_equal(np.asarray(layer(waves, training=False)), waves)


def test_gain_shift_speed_and_background_keep_length_and_dtype():
    waves = _tone(3)
    gained = np.asarray(AudioAugmentation(gain_db=6.0).layer()(waves, training=True))
    np.testing.assert_allclose(gained, waves * 10 ** (6 / 20), rtol=1e-4,
                               atol=1e-6)
    shifted = np.asarray(AudioAugmentation(time_shift=0.2, seed=1).layer()(
        waves, training=True))
    assert shifted.shape == waves.shape
    fast = np.asarray(AudioAugmentation(speed=2.0).layer()(waves, training=True))
    assert fast.shape == waves.shape and np.all(fast[:, 4000:] == 0)
    np.testing.assert_allclose(fast[:, :3999], waves[:, :7998:2], atol=1e-5)
    clips = np.random.default_rng(0).normal(size=(2, 3000)).astype("float32")
    mixed = np.asarray(AudioAugmentation(background_noise=clips,
                                         background_snr_db=20.0, seed=0).layer()(
        waves, training=True))
    noise = mixed - waves
    snr = 10 * np.log10((waves ** 2).mean(axis=1) / (noise ** 2).mean(axis=1))
    np.testing.assert_allclose(snr, 20.0, atol=0.5)
    ds = tf.data.Dataset.from_tensor_slices((waves, [0, 1, 2])).batch(3)
    out, labels = next(iter(AudioAugmentation(gain_db=[-3, 3]).map(ds)))
    assert out.shape == waves.shape and list(labels.numpy()) == [0, 1, 2]
    with pytest.raises(ValueError, match="speed"):
        AudioAugmentation(speed=[1.2, 0.8])


def test_spec_augment_masks_time_and_frequency_bands():
    spec = np.ones((4, 50, 40), "float32")
    out = np.asarray(SpecAugment(freq_mask=8, time_mask=10, seed=0)(spec,
                                                                   training=True))
    for image in out:
        zero_rows = np.all(image == 0, axis=1).sum()
        zero_cols = np.all(image == 0, axis=0).sum()
        assert zero_rows <= 10 and zero_cols <= 8
    assert (out == 0).any()
    np.testing.assert_array_equal(SpecAugment()(spec, training=False), spec)


def test_background_clips_are_a_weight_saved_with_the_model(tmp_path):
    import keras

    from kft.augment import AudioAugmentationLayer

    clips = np.random.default_rng(0).normal(size=(2, 300)).astype("float32")
    layer = AudioAugmentation(background_noise=clips, seed=0).layer()
    assert [w.name for w in layer.non_trainable_weights] == ["background"]
    assert layer.get_config()["background_shape"] == [2, 300]
    inputs = keras.Input((1000,))
    keras.Model(inputs, layer(inputs)).save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(
        loaded.get_layer("audio_augmentation").background, clips)
    with pytest.raises(ValueError, match=r"same shape. Received: shape \(3, 5\)"):
        layer.set_background(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="must be 2D"):
        AudioAugmentationLayer().set_background(np.zeros(5))
    built = AudioAugmentationLayer()
    built(_tone(1))
    with pytest.raises(ValueError, match="before its first call"):
        built.set_background(clips)
