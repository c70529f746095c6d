"""kft.sft: completion-only SFT batches, chat templates, packing, training."""

import json
import sys

import keras
import numpy as np
import pytest
from llm_fixtures import tiny_causal_lm

from kft.backbones.anatomy import backbone_blocks_of
from kft.backbones.anatomy import describe
from kft.data.chat import render_chat
from kft.data.sft import sft_dataset
from kft.data.sft import sft_examples
from kft.sft.model import SFTCausalLM
from kft.sft.model import packed_logits

BOS, EOS = "<|im_start|>", "<|im_end|>"
CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "a b"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "c"}]


@pytest.fixture(scope="module")
def lm():
    return tiny_causal_lm(sequence_length=16)


def tokens(lm, ids):
    return [lm.preprocessor.tokenizer.id_to_token(int(i)) for i in ids]


def weighted(lm, y, sample_weight):
    """The target tokens that carry loss, row after row."""
    return [tokens(lm, y_row[w_row > 0]) for y_row, w_row in zip(y, sample_weight)]


def test_prompt_completion_weights_hand_checked(lm):
    (x, y, weights), stats = sft_examples(
        [{"prompt": "a b", "completion": " c d"}], lm, shuffle=False)
    # <|im_start|> a Ġb | Ġc Ġd <|im_end|>, then padding (id 0).
    assert tokens(lm, x["token_ids"][0][:6]) == [BOS, "a", "Ġb", "Ġc", "Ġd", EOS]
    assert x["token_ids"].shape == (1, 16) and x["token_ids"].dtype == np.int32
    np.testing.assert_array_equal(x["padding_mask"][0], np.arange(16) < 6)
    np.testing.assert_array_equal(y[0][:5], x["token_ids"][0][1:6])
    # Position 1 ("a" -> "Ġb") is prompt: 0. Positions 2-4 predict Ġc, Ġd
    # and, from the last completion token, the end token: 1.
    np.testing.assert_array_equal(weights[0][:6], [0, 0, 1, 1, 1, 0])
    assert weights[0][6:].sum() == 0
    assert (stats.examples, stats.rows, stats.tokens, stats.loss_tokens) == (1, 1, 6, 3)


def test_text_batches_equal_keras_hub_preprocessor(lm):
    texts = ["hello a b", "c d e", "a"]
    dataset = sft_dataset(texts, lm, format="text", batch_size=3, shuffle=False)
    x, y, weights = next(iter(dataset))
    px, py, pweights = lm.preprocessor(texts)
    np.testing.assert_array_equal(x["token_ids"], px["token_ids"])
    np.testing.assert_array_equal(x["padding_mask"], px["padding_mask"])
    np.testing.assert_array_equal(y, py)
    np.testing.assert_array_equal(weights, np.asarray(pweights, "float32"))
    assert x["padding_mask"].dtype == bool and weights.dtype == np.float32


def test_messages_weight_only_assistant_turns_and_their_end_token(lm):
    pytest.importorskip("jinja2")
    (x, y, weights), _ = sft_examples([{"messages": CHAT}], lm, format="messages",
                                      sequence_length=80, shuffle=False)
    assert weighted(lm, y, weights) == [["a", "Ġb", EOS, "c", EOS]]
    rendered = "".join(tokens(lm, x["token_ids"][0][x["padding_mask"][0]]))
    assert rendered.startswith(BOS + "system") and BOS + BOS not in rendered
    # The generation prompt of the first turns is exactly the training prefix.
    prompt = lm.preprocessor.generate_preprocess(
        render_chat(lm, CHAT[:2]), sequence_length=80)
    n = int(np.sum(prompt["padding_mask"]))
    np.testing.assert_array_equal(prompt["token_ids"][:n], x["token_ids"][0][:n])
    assert tokens(lm, y[0][n - 1:n]) == ["a"] and weights[0][n - 1] == 1


def test_empty_and_too_long_examples_are_counted_skips(lm):
    records = [{"prompt": "a", "completion": ""},
               {"prompt": "hello " * 20, "completion": " c"},
               {"prompt": "a", "completion": " b" * 30},
               {"prompt": "a", "completion": " b"}]
    (_, y, weights), stats = sft_examples(records, lm, shuffle=False)
    assert (stats.records, stats.examples, stats.skipped_empty,
            stats.skipped_prompt_too_long, stats.skipped_too_long) == (4, 1, 1, 1, 1)
    assert weighted(lm, y, weights) == [["Ġb", EOS]]
    assert "skipped 3 (1 empty, 1 prompt too long, 1 too long)" in stats.summary()
    with pytest.raises(ValueError, match="No SFT example fits"):
        sft_examples(records[:2], lm)


def test_truncation_policies(lm):
    long_completion = {"prompt": "a", "completion": " b" * 30}
    (_, y, weights), stats = sft_examples([long_completion], lm,
                                          truncation="truncate_completion")
    assert stats.truncated == 1 and weighted(lm, y, weights) == [["Ġb"] * 15]
    long_prompt = {"prompt": "c" * 30, "completion": " d e"}
    (x, y, weights), stats = sft_examples([long_prompt], lm,
                                          truncation="truncate_prompt")
    assert stats.truncated == 1 and weighted(lm, y, weights) == [["Ġd", "Ġe", EOS]]
    assert tokens(lm, x["token_ids"][0][:2]) == [BOS, "c"]
    (_, _, _), stats = sft_examples([long_prompt, long_completion, {
        "prompt": "a", "completion": " b"}], lm, truncation="truncate_prompt")
    assert (stats.examples, stats.skipped_too_long) == (2, 1)


@pytest.mark.parametrize("records, kwargs, message", [
    ([{"messages": [{"role": "robot", "content": "x"}]}], {"format": "messages"},
     r"unknown role 'robot'.*\('system', 'user', 'assistant'\)"),
    ([{"prompt": "a"}], {}, r"Record 0 has no 'completion' field.*\['prompt'\]"),
    ([{"prompt": "a", "completion": 3}], {}, "'completion' must be a string"),
    (["a"], {"format": "chat"}, r"format must be one of \("),
    (["a"], {"format": "text", "truncation": "cut"}, "truncation must be one of"),
    ({"prompt": "a", "completion": "b"}, {}, "not a single record"),
])
def test_bad_inputs_are_clear_errors(lm, records, kwargs, message):
    if kwargs.get("format") == "messages":
        pytest.importorskip("jinja2")
    with pytest.raises(ValueError, match=message):
        sft_examples(records, lm, **kwargs)


def test_messages_without_a_chat_template_is_a_clear_error():
    no_template = tiny_causal_lm(sequence_length=16, chat_template=None)
    with pytest.raises(ValueError, match="needs a chat template.*none"):
        sft_dataset([{"messages": CHAT}], no_template, format="messages")


def test_messages_without_jinja2_says_how_to_install(lm, monkeypatch):
    for name in ("jinja2", "jinja2.ext", "jinja2.sandbox"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install jinja2"):
        sft_examples([{"messages": CHAT}], lm, format="messages")


def test_reads_jsonl_and_csv_files(lm, tmp_path):
    records = [{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": " d"}]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("prompt,completion\na, b\nc, d\n")
    from_list = sft_examples(records, lm, shuffle=False)[0]
    for path in (jsonl, csv_path):
        from_file = sft_examples(str(path), lm, shuffle=False)[0]
        for ours, theirs in zip(keras.tree.flatten(from_file),
                                keras.tree.flatten(from_list)):
            np.testing.assert_array_equal(ours, theirs)
    (tmp_path / "train.txt").write_text("a")
    with pytest.raises(ValueError, match=r"\.jsonl, \.json, \.csv or \.tsv"):
        sft_examples(str(tmp_path / "train.txt"), lm)


def test_packing_keeps_attention_and_loss_inside_each_example(lm):
    records = [{"prompt": "a", "completion": " b"},
               {"prompt": "hello", "completion": " c d e"},
               {"prompt": "c", "completion": " d"}]
    (x, y, weights), stats = sft_examples(records, lm, packing=True,
                                          shuffle=False)
    assert stats.rows == 1 and stats.examples == 3
    segments = x["segment_ids"][0]
    np.testing.assert_array_equal(segments[:15], [1] * 4 + [2] * 7 + [3] * 4)
    # The last token of an example never learns to predict the next one's.
    starts = [4, 11]
    assert tokens(lm, y[0][[s - 1 for s in starts]]) == [BOS, BOS]
    assert weights[0][[s - 1 for s in starts]].tolist() == [0.0, 0.0]
    assert weighted(lm, y, weights) == [["Ġb", EOS, "Ġc", "Ġd", "Ġe", EOS, "Ġd", EOS]]

    packed = np.asarray(packed_logits(lm, x["token_ids"], x["segment_ids"]))
    unmasked = np.asarray(lm({"token_ids": x["token_ids"],
                              "padding_mask": x["padding_mask"]}))
    (alone_x, _, _), _ = sft_examples(records, lm, shuffle=False)
    alone = np.asarray(lm(alone_x))
    for i, (begin, end) in enumerate([(0, 4), (4, 11), (11, 15)]):
        np.testing.assert_allclose(packed[0, begin:end], alone[i, :end - begin],
                                   atol=1e-4)
    # Without the block mask later examples see earlier ones: the test can fail.
    assert np.abs(unmasked[0, 4:11] - alone[1, :7]).max() > 1e-3


def test_packing_refuses_a_family_without_attention_masks():
    import keras_hub

    gemma = keras_hub.models.GemmaBackbone(
        vocabulary_size=16, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=8, intermediate_dim=16, head_dim=4)

    class FakeLM:
        backbone = gemma

    with pytest.raises(ValueError, match="GemmaBackbone is not among them.*"
                                         "packing=False"):
        sft_examples(["a"], FakeLM(), format="text", packing=True)


@pytest.mark.parametrize("packing", [False, True])
def test_fit_then_generate_follows_the_trained_completion(packing):
    lm = tiny_causal_lm(sequence_length=16)
    records = [{"prompt": "a b", "completion": " c d"},
               {"prompt": "b a", "completion": " e"}]
    train = sft_dataset(records, lm, batch_size=2, packing=packing)
    model = SFTCausalLM(lm)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(train.repeat(), steps_per_epoch=120, epochs=1, verbose=0)
    assert history.history["loss"][-1] < 0.5
    lm.compile(sampler="greedy")
    assert lm.generate(["a b", "b a"], max_length=12) == ["a b c d", "b a e"]


def test_sft_model_shares_weights_and_anatomy(lm):
    model = SFTCausalLM(lm)
    assert describe(model).task == "causal_lm" == describe(lm).task
    assert [name for name, _ in backbone_blocks_of(model)] == [
        "embeddings", "transformer_layer_0", "transformer_layer_1", "top"]
    assert {id(w) for w in model.weights} == {id(w) for w in lm.weights}
    (x, _, _), _ = sft_examples(["a b", "c"], lm, format="text")
    np.testing.assert_allclose(model(x), lm(x), atol=1e-6)


def test_sft_model_round_trips_through_keras_file(tmp_path):
    # keras-hub 0.32 itself cannot reload a tied Llama 3 backbone or a
    # Llama3Tokenizer with non-default special tokens from a .keras file
    # (their get_config omits tie_word_embeddings / bos_token / eos_token):
    # round-trip what it can.
    lm = tiny_causal_lm(sequence_length=16, tie_word_embeddings=False)
    (x, _, _), _ = sft_examples(["a b", "c"], lm, format="text", packing=True)
    lm.preprocessor = None
    model = SFTCausalLM(lm)
    model.save(tmp_path / "sft.keras")
    loaded = keras.saving.load_model(tmp_path / "sft.keras")
    assert isinstance(loaded, SFTCausalLM)
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
