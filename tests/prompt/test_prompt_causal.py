"""kft.prompt_causal: virtual tokens before the prompt of a frozen causal LM."""

import keras
import numpy as np
import pytest
from llm_fixtures import tiny_causal_lm

from kft.backbones.anatomy import describe
from kft.data.sft import sft_dataset
from kft.data.sft import sft_examples
from kft.prompt.causal_lm import PromptTunedCausalLM
from kft.prompt.causal_lm import generate
from kft.prompt.causal_lm import load_prompt
from kft.prompt.causal_lm import prompt_tune_causal_lm
from kft.prompt.causal_lm import save_prompt
from kft.sft.model import SFTCausalLM

WORDS = ["a b", "b a", "a", "b", "a a", "b b"]


@pytest.fixture(scope="module")
def pretrained_lm():
    """A tiny LM that learned two tasks, chosen by a leading word: "c ..."
    -> " c d", "e ..." -> " e". (A random base cannot be steered: its
    0.02-scale embeddings make every logit nearly the same.)"""
    lm = tiny_causal_lm(sequence_length=12)
    records = ([{"prompt": "c " + w, "completion": " c d"} for w in WORDS]
               + [{"prompt": "e " + w, "completion": " e"} for w in WORDS])
    model = SFTCausalLM(lm)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(sft_dataset(records, lm, batch_size=12).repeat(),
              steps_per_epoch=80, epochs=1, verbose=0)
    return lm


def _batch(lm, texts=("a b", "c d e"), **kwargs):
    (x, _, _), _ = sft_examples(list(texts), lm, format="text", shuffle=False,
                                **kwargs)
    return x


def _weights(model):
    return {v.path: np.array(v.numpy()) for v in model.weights}


def test_real_positions_see_the_virtual_tokens_as_tokens_before_them():
    lm = tiny_causal_lm(sequence_length=16)
    x = _batch(lm)  # two rows, the second padded further
    model = prompt_tune_causal_lm(lm, 3)
    logits = np.asarray(model(x))
    assert logits.shape == (2, 16, lm.backbone.vocabulary_size)
    # Virtual tokens equal to real tokens' embeddings: the logits of the
    # real positions are the plain LM's on those tokens + the row.
    prefix = np.array([[7, 8, 9]], "int32")
    model.virtual_tokens.assign(np.asarray(lm.backbone.token_embedding(prefix))[0])
    ids = np.concatenate([np.repeat(prefix, 2, 0), x["token_ids"]], axis=1)
    mask = np.concatenate([np.ones((2, 3), bool), x["padding_mask"]], axis=1)
    expected = np.asarray(lm({"token_ids": ids, "padding_mask": mask}))[:, 3:]
    real = x["padding_mask"]
    np.testing.assert_allclose(np.asarray(model(x))[real], expected[real],
                               atol=1e-5)


def test_logits_change_when_the_virtual_tokens_change():
    lm = tiny_causal_lm(sequence_length=16)
    x = _batch(lm)
    model = prompt_tune_causal_lm(lm, 4)
    before = np.asarray(model(x))
    model.virtual_tokens.assign(model.virtual_tokens * 0.0 + 1.0)
    after = np.asarray(model(x))
    assert np.abs(after - before)[x["padding_mask"]].min() > 0
    assert np.abs(after - before).max() > 1e-3


def _loss(model, x, y, sample_weight):
    return float(model.loss(y, model(x), sample_weight=sample_weight))


def test_fit_changes_only_the_virtual_tokens():
    lm = tiny_causal_lm(sequence_length=12)
    model = prompt_tune_causal_lm(lm, 4)
    assert [v.path for v in model.trainable_variables] == [
        model.virtual_tokens.path]
    before = _weights(model)
    # Eager: two steps do not pay for tracing (the next test fits in graph).
    model.compile(optimizer=keras.optimizers.Adam(1e-1), run_eagerly=True)
    train = sft_dataset([{"prompt": w, "completion": " c"} for w in WORDS], lm,
                        batch_size=3)
    model.fit(train, epochs=1, verbose=0)
    after = _weights(model)
    changed = [p for p in before if not np.array_equal(before[p], after[p])]
    assert changed == [model.virtual_tokens.path]


def test_prompt_tuning_steers_a_frozen_lm_and_generation_follows(pretrained_lm):
    # Without the word that chose the task in pretraining, the virtual
    # tokens alone must learn to ask for " c d".
    records = [{"prompt": w, "completion": " c d"} for w in WORDS]
    (x, y, sample_weight), _ = sft_examples(records, pretrained_lm)
    base = _weights(pretrained_lm)
    model = prompt_tune_causal_lm(pretrained_lm, 4)
    model.compile(optimizer=keras.optimizers.Adam(1e-1))
    before = _loss(model, x, y, sample_weight)
    model.fit(sft_dataset(records, pretrained_lm, batch_size=6).repeat(),
              steps_per_epoch=24, epochs=1, verbose=0)
    after = _loss(model, x, y, sample_weight)
    assert before > 0.5 and after < 0.1, (before, after)
    assert generate(model, ["a b", "b a"], max_length=10) == ["a b c d",
                                                              "b a c d"]
    assert generate(model, "b", max_length=10) == "b c d"
    assert all(np.array_equal(v, _weights(pretrained_lm)[p])
               for p, v in base.items())


def test_init_text_copies_the_text_embeddings():
    lm = tiny_causal_lm(sequence_length=16)
    table = np.asarray(lm.backbone.token_embedding.embeddings)
    ids = np.asarray(lm.preprocessor.tokenizer("hello a")).tolist()
    assert len(ids) == 3  # "hell", "o", "Ġa"
    model = prompt_tune_causal_lm(lm, 5, init_text="hello a")  # repeated
    np.testing.assert_array_equal(np.asarray(model.virtual_tokens),
                                  table[(ids * 2)[:5]])
    assert model.virtual_tokens.dtype == "float32"
    cut = prompt_tune_causal_lm(lm, 2, init_text="hello a")
    np.testing.assert_array_equal(np.asarray(cut.virtual_tokens), table[ids[:2]])


def test_save_and_load_prompt_reproduce_the_logits(tmp_path):
    lm = tiny_causal_lm(sequence_length=16)
    x = _batch(lm)
    model = prompt_tune_causal_lm(lm, 3, seed=1)
    path = save_prompt(model, tmp_path / "prompt.npz")
    assert path.stat().st_size < 4096
    expected = np.asarray(model(x))
    other = prompt_tune_causal_lm(lm, 3, seed=2)
    assert not np.allclose(np.asarray(other(x)), expected)
    assert load_prompt(other, path) is other
    np.testing.assert_array_equal(np.asarray(other(x)), expected)
    # Onto the plain LM: a new prompt-tuned model around it.
    fresh = load_prompt(lm, path)
    assert isinstance(fresh, PromptTunedCausalLM)
    np.testing.assert_array_equal(np.asarray(fresh(x)), expected)


def test_load_prompt_refuses_another_base_or_size(tmp_path):
    lm = tiny_causal_lm(sequence_length=16)
    path = save_prompt(prompt_tune_causal_lm(lm, 3), tmp_path / "prompt.npz")
    with pytest.raises(ValueError, match="has 3 virtual tokens; the model has 2"):
        load_prompt(prompt_tune_causal_lm(lm, 2), path)
    wider = tiny_causal_lm(sequence_length=16, hidden_dim=16)
    with pytest.raises(ValueError, match="trained on a different base model"):
        load_prompt(wider, path)
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="is not a kft prompt file"):
        load_prompt(lm, tmp_path / "other.npz")


def test_round_trips_through_keras_file(tmp_path):
    # Untied and without a preprocessor: keras-hub 0.32 cannot reload a tied
    # Llama 3 backbone or a tokenizer with custom special tokens from .keras.
    lm = tiny_causal_lm(sequence_length=16, tie_word_embeddings=False)
    x = _batch(lm)
    lm.preprocessor = None
    model = prompt_tune_causal_lm(lm, 3)
    model.save(tmp_path / "prompt.keras")
    loaded = keras.saving.load_model(tmp_path / "prompt.keras", safe_mode=True)
    assert type(loaded) is PromptTunedCausalLM
    np.testing.assert_array_equal(np.asarray(loaded.virtual_tokens),
                                  np.asarray(model.virtual_tokens))
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    assert len(loaded.trainable_variables) == 1


def test_anatomy_and_compile_defaults():
    lm = tiny_causal_lm(sequence_length=16)
    model = prompt_tune_causal_lm(lm, 2)
    anatomy = describe(model)
    assert (anatomy.task, anatomy.family, anatomy.logits) == (
        "causal_lm", "Llama3Backbone", True)
    assert anatomy.backbone == lm.backbone.name
    model.compile()
    assert float(model.optimizer.learning_rate) == pytest.approx(3e-2)


def _gemma():
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=16, num_layers=1, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=8, intermediate_dim=16, head_dim=4)
    return keras_hub.models.GemmaCausalLM(backbone=backbone)


@pytest.mark.parametrize("call, message", [
    (lambda lm: prompt_tune_causal_lm(lm, 0), r"num_virtual_tokens=0"),
    (lambda lm: prompt_tune_causal_lm(lm, "8"), r"num_virtual_tokens='8'"),
    (lambda lm: prompt_tune_causal_lm(lm, 2, init_text=""), r"init_text=''"),
    (lambda lm: prompt_tune_causal_lm(_gemma(), 2),
     r"rotary-position decoders \[.*'Llama3Backbone'.*Received: a GemmaBackbone"),
    (lambda lm: prompt_tune_causal_lm(keras.Sequential(), 2),
     r"keras-hub CausalLM.*Received: Sequential"),
    (lambda lm: prompt_tune_causal_lm(lm, 2)(_batch(lm, packing=True)),
     r"unpacked rows.*packing=False"),
    (lambda lm: generate(SFTCausalLM(lm), "a"), r"Received: SFTCausalLM"),
    (lambda lm: generate(prompt_tune_causal_lm(lm, 2), "a", max_length=1),
     r"max_length=1"),
])
def test_bad_arguments_are_clear_errors(call, message):
    lm = tiny_causal_lm(sequence_length=16)
    with pytest.raises(ValueError, match=message):
        call(lm)
