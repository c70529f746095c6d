"""kft.data.preference: preference pairs and unpaired records as batches."""

import json

import keras
import numpy as np
import pytest
from llm_fixtures import tiny_causal_lm

import kft
from kft.data.preference import preference_dataset
from kft.data.preference import preference_examples
from kft.data.preference import reference_logps

BOS, EOS = "<|im_start|>", "<|im_end|>"
PAIRS = [{"prompt": "a b", "chosen": " c d", "rejected": " e"},
         {"prompt": "b a", "chosen": " e", "rejected": " c d"}]


@pytest.fixture(scope="module")
def lm():
    return tiny_causal_lm(sequence_length=16)


def tokens(lm, ids):
    return [lm.preprocessor.tokenizer.id_to_token(int(i)) for i in ids]


def answers(lm, y, sample_weight):
    """The weighted target tokens of each row of each example."""
    return [[tokens(lm, y_row[w_row > 0]) for y_row, w_row in zip(ys, ws)]
            for ys, ws in zip(y, sample_weight)]


def test_pairs_side_by_side_with_loss_on_the_answers_only(lm):
    (x, y, weights), stats = preference_examples(PAIRS, lm, shuffle=False)
    assert x["token_ids"].shape == (2, 2, 16) and x["token_ids"].dtype == np.int32
    assert x["padding_mask"].dtype == bool and weights.dtype == np.float32
    chosen = x["token_ids"][0, 0][x["padding_mask"][0, 0]]
    rejected = x["token_ids"][0, 1][x["padding_mask"][0, 1]]
    assert tokens(lm, chosen) == [BOS, "a", "Ġb", "Ġc", "Ġd", EOS]
    assert tokens(lm, rejected) == [BOS, "a", "Ġb", "Ġe", EOS]
    # The end token after each answer is trained; the prompt is not.
    assert answers(lm, y, weights) == [[["Ġc", "Ġd", EOS], ["Ġe", EOS]],
                                       [["Ġe", EOS], ["Ġc", "Ġd", EOS]]]
    np.testing.assert_array_equal(weights[0, 0][:6], [0, 0, 1, 1, 1, 0])
    # Each row is exactly the SFT row of prompt + answer.
    (sft_x, sft_y, sft_w), _ = kft.sft.sft_examples(
        [{"prompt": "a b", "completion": " e"}], lm, shuffle=False)
    np.testing.assert_array_equal(x["token_ids"][0, 1], sft_x["token_ids"][0])
    np.testing.assert_array_equal(weights[0, 1], sft_w[0])
    assert (stats.records, stats.examples, stats.rows, stats.loss_tokens) == (
        2, 2, 4, 10)


def test_messages_train_only_the_answer_turns(lm):
    pytest.importorskip("jinja2")
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "a?"}]
    explicit = [{"messages": history, "chosen": "a b", "rejected": "c"}]
    (x, y, weights), _ = preference_examples(explicit, lm, format="messages",
                                             sequence_length=64, shuffle=False)
    # The earlier assistant turn ("hello") is prompt: no loss on it.
    assert answers(lm, y, weights) == [[["a", "Ġb", EOS], ["c", EOS]]]
    # TRL's conversational forms give the same batch: an explicit prompt
    # list, and an implicit prompt (the turns chosen and rejected share).
    reply = {"role": "assistant", "content": "a b"}
    other = {"role": "assistant", "content": "c"}
    for record in ({"prompt": history, "chosen": [reply], "rejected": [other]},
                   {"chosen": history + [reply], "rejected": history + [other]}):
        (x2, y2, w2), _ = preference_examples([record], lm, format="messages",
                                              sequence_length=64, shuffle=False)
        np.testing.assert_array_equal(x2["token_ids"], x["token_ids"])
        np.testing.assert_array_equal(w2, weights)


def test_unpaired_records_carry_labels_and_a_mismatched_row(lm):
    records = [{"prompt": "a", "completion": " b", "label": True},
               {"prompt": "c", "completion": " d e", "label": "false"},
               {"prompt": "e", "completion": " a", "label": 1}]
    (x, y, weights), stats = preference_examples(records, lm, format="unpaired",
                                                 shuffle=False)
    np.testing.assert_array_equal(x["label"], [1.0, 0.0, 1.0])
    assert stats.desirable == 2 and stats.rows == 6
    # Row 1: the prompt with the next example's completion (KTO's KL sample).
    kl_rows = [tokens(lm, x["token_ids"][i, 1][x["padding_mask"][i, 1]])
               for i in range(3)]
    assert kl_rows == [[BOS, "a", "Ġd", "Ġe", EOS], [BOS, "c", "Ġa", EOS],
                       [BOS, "e", "Ġb", EOS]]
    assert answers(lm, y, weights)[1] == [["Ġd", "Ġe", EOS], ["Ġa", EOS]]


def test_malformed_records_are_errors_naming_the_record_or_counted_skips(lm):
    with pytest.raises(ValueError, match=r"Record 1 has no 'rejected' field"):
        preference_examples([PAIRS[0], {"prompt": "a", "chosen": " b"}], lm)
    with pytest.raises(ValueError, match=r"Record 0: 'label' must be true"):
        preference_examples([{"prompt": "a", "completion": " b", "label": "maybe"}],
                            lm, format="unpaired")
    with pytest.raises(ValueError, match=r"format must be one of"):
        preference_examples(PAIRS, lm, format="pairs")
    records = [{"prompt": "a", "chosen": "", "rejected": " b"},
               {"prompt": "hello " * 20, "chosen": " c", "rejected": " d"},
               {"prompt": "a", "chosen": " b", "rejected": " c" * 30},
               PAIRS[0]]
    (x, _, _), stats = preference_examples(records, lm, shuffle=False)
    assert (stats.examples, stats.skipped_empty, stats.skipped_prompt_too_long,
            stats.skipped_too_long) == (1, 1, 1, 1)
    assert len(x["token_ids"]) == 1
    (_, _, _), stats = preference_examples(records, lm,
                                           truncation="truncate_completion")
    assert (stats.examples, stats.truncated) == (2, 1)
    with pytest.raises(ValueError, match="No preference example fits"):
        preference_examples(records[:2], lm)


def test_reads_jsonl_and_csv_files(lm, tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in PAIRS) + "\n")
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("prompt,chosen,rejected\na b, c d, e\nb a, e, c d\n")
    from_list = preference_examples(PAIRS, lm, shuffle=False)[0]
    for path in (jsonl, csv_path):
        from_file = preference_examples(str(path), lm, shuffle=False)[0]
        for ours, theirs in zip(keras.tree.flatten(from_file),
                                keras.tree.flatten(from_list)):
            np.testing.assert_array_equal(ours, theirs)


def test_dataset_batches_and_precomputed_reference(lm):
    dataset = kft.data.preference_dataset(PAIRS, lm, batch_size=2, shuffle=False,
                                          reference=lm)
    x, y, weights = next(iter(dataset))
    assert tuple(x["token_ids"].shape) == (2, 2, 16)
    # The answers' summed log-probabilities under the reference, by hand.
    logits = np.asarray(lm({"token_ids": x["token_ids"][:, 0],
                            "padding_mask": x["padding_mask"][:, 0]}), "float64")
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(y[:, 0])[..., None], -1)[..., 0]
    expected = (picked * np.asarray(weights[:, 0])).sum(-1)
    np.testing.assert_allclose(x["reference_logps"][:, 0], expected, atol=1e-4)


def test_reference_cache_is_reused_only_for_the_same_weights(lm, tmp_path):
    arrays, _ = preference_examples(PAIRS, lm, shuffle=False)
    cache = str(tmp_path / "reference.npz")
    first = reference_logps(lm, *arrays, cache=cache)
    with np.load(cache) as stored:
        np.testing.assert_array_equal(stored["reference_logps"], first)
    np.savez(cache, reference_logps=first + 1.0,
             fingerprint=np.load(cache)["fingerprint"])
    np.testing.assert_array_equal(reference_logps(lm, *arrays, cache=cache),
                                  first + 1.0)  # read, not recomputed
    other = tiny_causal_lm(sequence_length=16, seed=1)
    again = reference_logps(other, *arrays, cache=cache)
    assert np.abs(again - first).max() > 1e-3  # other weights: recomputed


def test_dataset_shuffles_pairs_together(lm):
    records = [{"prompt": p, "chosen": " a", "rejected": " b" * (i + 1)}
               for i, p in enumerate(["a", "b", "c", "d", "e"])]
    dataset = preference_dataset(records, lm, batch_size=5, seed=3)
    x, y, weights = next(iter(dataset))
    # Chosen and rejected stay together: same prompt token in both rows.
    np.testing.assert_array_equal(x["token_ids"][:, 0, 1], x["token_ids"][:, 1, 1])
    assert answers(lm, y.numpy(), weights.numpy())[0][0] == ["Ġa", EOS]


def test_wordnet_pairs_prefer_each_nouns_own_gloss(tmp_path):
    from kft.data.preference import wordnet_preference_pairs

    nouns = {"oak": "a tree of the genus Quercus", "harbor": "a sheltered port",
             "potato": "an edible tuber", "elm": "a shade tree"}
    lines = ["  1 this is the licence header\n"] + [
        f"0000000{i} 20 n 01 {word} 0 000 | {gloss}; \"an example\"\n"
        for i, (word, gloss) in enumerate(nouns.items())]
    path = tmp_path / "data.noun"
    path.write_text("".join(lines))
    pairs = wordnet_preference_pairs(str(path), seed=3)
    assert sorted(p["prompt"] for p in pairs) == sorted(
        f"Define: {word}\n" for word in nouns)
    for pair in pairs:
        word = pair["prompt"][len("Define: "):-1]
        assert pair["chosen"] == nouns[word] != pair["rejected"]
    # Every gloss is some other noun's rejected answer exactly once.
    assert sorted(p["rejected"] for p in pairs) == sorted(nouns.values())
    assert wordnet_preference_pairs(str(path), seed=3) == pairs
    with pytest.raises(ValueError, match="at least two nouns"):
        wordnet_preference_pairs(str(path), max_examples=1)
