"""Preference data for causal LMs: chosen / rejected pairs, unpaired labels.

`preference_dataset` turns preference records into batches for
`kft.preference.PreferenceCausalLM`. It tokenizes, renders chat templates,
truncates and counts skips exactly as `kft.sft.sft_dataset` does (it uses
the same functions), and puts the two sequences of one example side by
side, so that one forward pass over `(2 * batch, length)` tokens scores
both:

- `x = {"token_ids": int32 (B, 2, L), "padding_mask": bool (B, 2, L)}`,
  `y` the next tokens `(B, 2, L)`, `sample_weight` float32 `(B, 2, L)`: 1
  on the answer's tokens (and the end token after them), 0 on the prompt
  and the padding.
- Paired formats: `[:, 0]` is the chosen answer, `[:, 1]` the rejected one.
- `format="unpaired"` (KTO): `[:, 0]` is the prompt with its completion and
  `x["label"]` (float32 `(B,)`) is 1 for a desirable completion, 0 for an
  undesirable one; `[:, 1]` is the prompt with the completion of another
  example, the mismatched pair KTO's KL estimate needs (Ethayarajh et al.
  2024, as TRL builds it).
- `reference=lm` adds `x["reference_logps"]` float32 `(B, 2)`: each
  sequence's answer log-probability under `lm`, computed once here (and
  cached on disk with `reference_cache=`), for
  `PreferenceCausalLM(..., reference="precomputed")`.

Column names are TRL's: `prompt`, `chosen`, `rejected`; `prompt`,
`completion`, `label` for unpaired data.
"""

import dataclasses
import hashlib
import logging
import os

import numpy as np

from kft.data.chat import check_messages
from kft.data.sft import SFTStats
from kft.data.sft import _assemble
from kft.data.sft import _check_options
from kft.data.sft import _field
from kft.data.sft import _fit_length
from kft.data.sft import _rows
from kft.data.sft import _settings
from kft.data.sft import _shift
from kft.data.sft import _tokenize_texts
from kft.data.sft import read_records
from kft.losses.causal_lm import answer_logps

__all__ = ["PREFERENCE_FORMATS", "PreferenceStats",
           "preference_dataset", "wordnet_preference_pairs",
           "preference_examples", "reference_logps"]

PREFERENCE_FORMATS = ("prompt_chosen_rejected", "messages", "unpaired")
_LABELS = {"true": 1.0, "1": 1.0, "yes": 1.0, "false": 0.0, "0": 0.0, "no": 0.0}

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PreferenceStats(SFTStats):
    """What `preference_examples` kept, cut and skipped (see `SFTStats`;
    an example is a pair, each with two rows).

    Attributes:
        desirable: unpaired examples labelled desirable (KTO).
        kl_reused: unpaired examples whose mismatched (KL) row did not fit
            and repeats the example's own row instead.
    """

    desirable: int = 0
    kl_reused: int = 0


# === Records -> segments ===


def _text_pair(record, index):
    prompt = _field(record, index, "prompt")
    answers = [_field(record, index, key) for key in ("chosen", "rejected")]
    return [[(prompt, False), (answer, True)] if answer else None
            for answer in answers]


def _as_messages(value, index, key):
    """An answer as a list of messages (a string is one assistant turn)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}] if value else []
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and not value:
        return []
    return check_messages(value, f"{index} ({key!r})")


def _chat_pair(record, index, renderer):
    """Segments of the chosen and rejected conversations; only the answer's
    assistant turns carry loss, never those in the prompt."""
    if not isinstance(record, dict):
        raise ValueError(f"Record {index}: a 'messages' preference record is a "
                         f"dict. Received: {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            _field(record, index, key)  # the error naming the record
    answers = [_as_messages(record[key], index, key)
               for key in ("chosen", "rejected")]
    prompt_key = next((k for k in ("messages", "prompt") if k in record), None)
    if prompt_key is not None:
        prompt = check_messages(record[prompt_key], index)
    else:  # TRL's implicit prompt: the turns both conversations share
        prompt = []
        for a, b in zip(*answers):
            if a != b:
                break
            prompt.append(a)
        answers = [a[len(prompt):] for a in answers]
        if not prompt:
            raise ValueError(
                f"Record {index}: no 'messages' (or 'prompt') and no turns "
                "shared by 'chosen' and 'rejected' to take as the prompt.")
    pair = []
    for answer in answers:
        if not any(m["role"] == "assistant" for m in answer):
            pair.append(None)
            continue
        in_prompt = sum(m["role"] == "assistant" for m in prompt)
        segments = renderer.segments(prompt + answer, index)
        for i in range(len(segments)):
            if segments[i][1] and in_prompt:
                segments[i], in_prompt = (segments[i][0], False), in_prompt - 1
        pair.append(segments)
    return pair


def _label(record, index):
    value = record.get("label") if isinstance(record, dict) else None
    if isinstance(value, (bool, int, float)) and float(value) in (0.0, 1.0):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise ValueError(f"Record {index}: 'label' must be true / false (or 1 / 0) "
                     f"for format='unpaired'. Received: {value!r}")


def _unpaired(record, index):
    prompt = _field(record, index, "prompt")
    completion = _field(record, index, "completion")
    return ([(prompt, False), (completion, True)] if completion else None,
            _label(record, index), prompt, completion)


# === Segments -> token pairs ===


def _fit(tokens_and_weights, settings, truncation):
    capacity = settings["length"] + 1
    return _fit_length(*tokens_and_weights, capacity, truncation,
                       settings["start"] is not None)


def _tokenized(examples, settings):
    """`[[(tokens, weights) or None, ...], ...]` for lists of segments."""
    texts = [text for pair in examples for s in pair if s for text, _ in s]
    flat = _tokenize_texts(settings["tokenizer"], texts)
    result, offset = [], 0
    for pair in examples:
        row = []
        for segments in pair:
            if segments is None:
                row.append(None)
                continue
            row.append(_assemble(flat[offset:offset + len(segments)], segments,
                                 settings))
            offset += len(segments)
        result.append(row)
    return result


def _keep_pairs(pairs, settings, truncation, stats):
    """Both sequences of each pair cut to fit, or the pair skipped (the
    first reason counts)."""
    kept = []
    for pair in pairs:
        fitted = []
        for sequence in pair:
            if sequence is None:
                fitted = "empty"
                break
            original = len(sequence[0])
            result = _fit(sequence, settings, truncation)
            if isinstance(result, str):
                fitted = result
                break
            fitted.append((result, len(result[0]) < original))
        if isinstance(fitted, str):
            name = f"skipped_{fitted}"
            setattr(stats, name, getattr(stats, name) + 1)
            continue
        stats.truncated += any(cut for _, cut in fitted)
        kept.append([sequence for sequence, _ in fitted])
    return kept


# === Examples ===


def _paired_examples(records, format, settings, truncation, stats):
    if format == "messages":
        pairs = [_chat_pair(r, i, settings["renderer"])
                 for i, r in enumerate(records)]
    else:
        pairs = [_text_pair(r, i) for i, r in enumerate(records)]
    return _keep_pairs(_tokenized(pairs, settings), settings, truncation, stats)


def _unpaired_examples(records, settings, truncation, stats):
    """`[([(tokens, weights)], label, prompt, completion)]` of the kept
    unpaired records."""
    items = [_unpaired(r, i) for i, r in enumerate(records)]
    sequences = _tokenized([[segments] for segments, *_ in items], settings)
    kept = []
    for (_, label, prompt, completion), pair in zip(items, sequences):
        fitted = _keep_pairs([pair], settings, truncation, stats)
        if fitted:
            kept.append((fitted[0], label, prompt, completion))
    return kept


def _with_kl_rows(kept, settings, truncation, stats):
    """Each unpaired example with a second row: its prompt and the next
    example's completion (KTO's mismatched pair for the KL estimate)."""
    if len(kept) < 2:
        raise ValueError("format='unpaired' needs at least two examples that "
                         "fit (KTO pairs each prompt with another example's "
                         f"completion): {stats.summary()}.")
    texts = [[[(prompt, False), (kept[(i + 1) % len(kept)][3], True)]]
             for i, (_, _, prompt, _) in enumerate(kept)]
    rows = _tokenized(texts, settings)
    cut = "truncate_completion" if truncation == "drop_long" else truncation
    pairs = []
    for (sequences, *_), (row,) in zip(kept, rows):
        fitted = _fit(row, settings, cut)
        if isinstance(fitted, str):  # repeats its own row: never crashes
            stats.kl_reused += 1
            fitted = sequences[0]
        pairs.append([sequences[0], fitted])
    return pairs


def _arrays(pairs, settings):
    """`(x, y, sample_weight)` of `(N, 2, L)` from pairs of sequences."""
    flat = [sequence for pair in pairs for sequence in pair]
    rows = _rows(flat, settings["length"] + 1, False, settings["pad"])
    x, y, sample_weight = _shift(*rows, False)
    n, length = len(pairs), y.shape[-1]
    x = {key: value.reshape(n, 2, length) for key, value in x.items()}
    return x, y.reshape(n, 2, length), sample_weight.reshape(n, 2, length)


def preference_examples(records_or_path, lm, *, format="prompt_chosen_rejected",
                        sequence_length=None, truncation="drop_long",
                        shuffle=True, seed=0, chat_template=None):
    """Preference examples as arrays, and what was kept, cut and skipped.

    The arrays are what `preference_dataset` batches (without
    `reference_logps`); see its docstring for the arguments.

    Returns:
        `((x, y, sample_weight), stats)`: numpy arrays, `x` a dict of
        `token_ids` int32 `(N, 2, L)`, `padding_mask` bool (and `label`
        float32 `(N,)` for `"unpaired"`); `y` int32 and `sample_weight`
        float32 `(N, 2, L)`; `stats` a `PreferenceStats`.
    """
    _check_options(format, truncation, None, PREFERENCE_FORMATS)
    settings = _settings(lm, "messages" if format == "messages" else "text",
                         sequence_length, chat_template)
    records = read_records(records_or_path)
    stats = PreferenceStats(records=len(records))
    unpaired = format == "unpaired"
    kept = (_unpaired_examples(records, settings, truncation, stats) if unpaired
            else _paired_examples(records, format, settings, truncation, stats))
    if not kept:
        raise ValueError(f"No preference example fits: {stats.summary()}.")
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(kept))
        kept = [kept[i] for i in order]
    pairs = _with_kl_rows(kept, settings, truncation, stats) if unpaired else kept
    x, y, sample_weight = _arrays(pairs, settings)
    if unpaired:
        x["label"] = np.array([label for _, label, *_ in kept], "float32")
        stats.desirable = int(x["label"].sum())
    stats.examples, stats.rows = len(kept), 2 * len(kept)
    stats.tokens = int(x["padding_mask"].sum())
    stats.loss_tokens = int(np.count_nonzero(sample_weight))
    return (x, y, sample_weight), stats


def _fingerprint(lm, x, sample_weight):
    """sha256 of the tokens, the answer weights and every variable of `lm`."""
    digest = hashlib.sha256()
    for array in (x["token_ids"], sample_weight):
        digest.update(np.ascontiguousarray(array).tobytes())
    for variable in lm.weights:
        digest.update(variable.path.encode())
        digest.update(np.ascontiguousarray(np.asarray(variable)).tobytes())
    return digest.hexdigest()


def reference_logps(lm, x, y, sample_weight, *, batch_size=8, cache=None):
    """Each sequence's answer log-probability under `lm`, once.

    Args:
        lm: the reference, a keras-hub `CausalLM` (e.g. the model before
            training).
        x: the inputs from `preference_examples` (`token_ids`,
            `padding_mask`).
        y: its next tokens.
        sample_weight: its answer weights.
        batch_size: pairs per forward pass.
        cache: an `.npz` path: read when it was written for the same tokens
            and the same weights of `lm` (a sha256 fingerprint), else
            computed and written.

    Returns:
        float32 `(N, 2)`: the sum of the log-probabilities of the weighted
        (answer) tokens of each sequence.
    """
    from kft.utils.safe_npz import read_npz

    fingerprint = _fingerprint(lm, x, sample_weight) if cache else None
    if cache and os.path.exists(cache):
        stored = read_npz(cache, "a kft reference log-probability cache")
        if str(stored.get("fingerprint", "")) == fingerprint:
            return stored["reference_logps"].astype("float32")
        logger.warning("reference_cache %s was written for other data or "
                       "weights: computing it again.", cache)
    n, length = y.shape[0], y.shape[-1]
    flat = {k: x[k].reshape(2 * n, length) for k in ("token_ids", "padding_mask")}
    targets, weights = y.reshape(2 * n, length), sample_weight.reshape(2 * n, length)
    step = 2 * batch_size
    logps = np.concatenate([np.asarray(answer_logps(
        lm({k: v[i:i + step] for k, v in flat.items()}, training=False),
        targets[i:i + step], weights[i:i + step])[0])
        for i in range(0, 2 * n, step)])
    logps = logps.reshape(n, 2).astype("float32")
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        np.savez(cache, reference_logps=logps, fingerprint=np.array(fingerprint))
    return logps


def preference_dataset(records_or_path, lm, *, format="prompt_chosen_rejected",
                       batch_size=8, shuffle=True, sequence_length=None,
                       truncation="drop_long", seed=0, chat_template=None,
                       reference=None, reference_cache=None):
    """A `tf.data.Dataset` of preference batches, loss on the answers only.

    Args:
        records_or_path: a list of records, or a `.jsonl` / `.json` / `.csv`
            / `.tsv` file of them (read as data, never code), with TRL's
            column names. `"prompt_chosen_rejected"`: `prompt`, `chosen`,
            `rejected` strings (each answer follows the prompt as is: put
            any separator in the data). `"messages"`: the prompt's turns in
            `messages` (or `prompt`), a list of `{"role", "content"}`, and
            `chosen` / `rejected` each an assistant reply (a string) or a
            list of turns; without `messages` / `prompt`, the turns that
            `chosen` and `rejected` share are the prompt (TRL's implicit
            prompt). Rendered with the checkpoint's chat template, as SFT
            does. `"unpaired"` (KTO): `prompt`, `completion` and `label`
            (true / false, 1 / 0).
        lm: a keras-hub `CausalLM` (from `kft.build_causal_lm`): its
            tokenizer, sequence length and chat template are used.
        format: one of `PREFERENCE_FORMATS`.
        batch_size: examples (pairs) per batch; each has two rows.
        shuffle: shuffle the examples once, and every epoch.
        sequence_length: tokens per row; default the preprocessor's.
        truncation: as `kft.sft.sft_dataset`'s, applied to each sequence;
            a pair is skipped (and counted) when either sequence is. A
            missing field is an error naming the record; an empty answer
            or a prompt that fills the sequence is a counted skip.
        seed: the shuffling seed.
        chat_template: a Jinja chat template for `"messages"`; default
            `lm.chat_template`.
        reference: a keras-hub `CausalLM` whose answer log-probabilities
            are computed now, once, into `x["reference_logps"]` (for
            `PreferenceCausalLM(reference="precomputed")`); e.g. `lm`
            itself before training.
        reference_cache: an `.npz` path that keeps those log-probabilities
            between runs (see `reference_logps`).

    Returns:
        A `tf.data.Dataset` of `(x, y, sample_weight)` batches (module
        docstring: shapes `(B, 2, L)`, chosen first).

    Example:

    ```python
    records = [{"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}]
    train = kft.data.preference_dataset(records, lm, batch_size=4)
    model = kft.preference.PreferenceCausalLM(lm, loss="dpo")
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    model.fit(train, epochs=3)
    ```
    """
    import tensorflow as tf

    _check_options(format, truncation, batch_size, PREFERENCE_FORMATS)
    (x, y, sample_weight), stats = preference_examples(
        records_or_path, lm, format=format, sequence_length=sequence_length,
        truncation=truncation, shuffle=shuffle, seed=seed,
        chat_template=chat_template)
    log = logger.warning if stats.skipped or stats.truncated else logger.info
    log("preference_dataset: %s.", stats.summary())
    if reference is not None:
        x["reference_logps"] = reference_logps(
            reference, x, y, sample_weight, batch_size=batch_size,
            cache=reference_cache)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, sample_weight))
    if shuffle:
        dataset = dataset.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def wordnet_preference_pairs(path=None, *, max_examples=None, seed=0):
    """WordNet's noun definitions as preference pairs, offline.

    "Define: word" is answered by the word's own gloss (chosen) or by the
    gloss of another noun of the draw (rejected): a preference a model
    can only learn by reading the word. Debian's `wordnet-base`; see
    `kft.data.load_wordnet_glosses`.

    Args:
        path: WordNet's `data.noun` (default: the Debian package's).
        max_examples: keep this many nouns, drawn at random with `seed`.
        seed: the draw's seed, and the pairing's.

    Returns:
        A list of `{"prompt": "Define: <word>\n", "chosen": <its gloss>,
        "rejected": <another noun's gloss>}`.
    """
    from kft.data.text import load_wordnet_glosses

    records = load_wordnet_glosses(path, max_examples=max_examples, seed=seed)
    if len(records) < 2:
        raise ValueError("wordnet_preference_pairs needs at least two nouns. "
                         f"Received: max_examples={max_examples!r}")
    # A cyclic shift along a random order: every noun gets another's gloss.
    order = np.random.default_rng(seed + 1).permutation(len(records))
    other = np.empty(len(records), dtype=int)
    other[order] = np.roll(order, 1)
    return [{"prompt": r["prompt"], "chosen": r["completion"],
             "rejected": records[j]["completion"]}
            for r, j in zip(records, other)]
