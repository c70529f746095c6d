import keras
import numpy as np
import pytest
from conftest import changed_after_fit

from kft.prompt.layer import prompt_tune


def _backbone():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    return keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=32)


def _inputs(n=6, length=12):
    rng = np.random.default_rng(0)
    return {"token_ids": rng.integers(1, 50, (n, length)).astype("int32"),
            "segment_ids": np.zeros((n, length), "int32"),
            "padding_mask": np.ones((n, length), "int32")}


def _classifier(prompted):
    out = keras.layers.Dense(2, name="head")(prompted.output["pooled_output"])
    return keras.Model(prompted.input, out)


def test_prompt_tuning_trains_only_the_virtual_tokens_and_head(tmp_path):
    backbone = _backbone()
    prompted = prompt_tune(backbone, num_virtual_tokens=5)
    x = _inputs()
    outputs = prompted.predict(x, verbose=0)
    assert outputs["sequence_output"].shape == (6, 12 + 5, 8)
    assert outputs["pooled_output"].shape == (6, 8)
    model = _classifier(prompted)
    trainable = {w.path for w in model.trainable_weights}
    assert trainable == {"prompt_tuning/prompt", "head/kernel", "head/bias"}
    changed = changed_after_fit(model, x, np.arange(6) % 2, epochs=2)
    assert changed == trainable
    path = str(tmp_path / "prompted.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_padding_is_masked_and_init_from_token_embeddings():
    backbone = _backbone()
    prompted = prompt_tune(backbone, num_virtual_tokens=3, init_token_ids=[7, 9])
    table = np.asarray(backbone.token_embedding.embeddings)
    prompt = np.asarray(prompted.get_layer("prompt_tuning").prompt)
    np.testing.assert_allclose(prompt, table[[7, 9, 7]])
    x = _inputs(2, 10)
    padded = {k: v.copy() for k, v in x.items()}
    padded["padding_mask"][:, 6:] = 0
    padded["token_ids"][:, 6:] = 0
    changed = {k: v.copy() for k, v in padded.items()}
    changed["token_ids"][:, 6:] = 42  # different ids under the padding
    a = prompted.predict(padded, verbose=0)["pooled_output"]
    b = prompted.predict(changed, verbose=0)["pooled_output"]
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        prompt_tune(_backbone(), num_virtual_tokens=0)
