"""Supervised fine-tuning (SFT) data for causal LMs, and the model it trains.

`sft_dataset` turns prompt/completion pairs, chat conversations or plain
texts into the `(x, y, sample_weight)` batches keras-hub's
`CausalLMPreprocessor` gives `fit`, except that the loss falls on the
completion (or the assistant's turns) only:

- `x = {"token_ids": int32 (B, L), "padding_mask": bool (B, L)}` (and
  `"segment_ids"` when packed), `y` the next tokens, `sample_weight` 1.0 on
  the completion's tokens and the end token that follows them, 0.0 on the
  prompt and the padding;
- the tokenizer's start token is prepended and its end token appended, as
  the preprocessor does (a chat template places its own special tokens);
- long examples are dropped or truncated by an explicit policy, and every
  skipped example is counted (`sft_examples` returns the counts; one log
  line reports them).

`packing=True` puts several examples in one row. The rows carry
`segment_ids` (1, 2, ... per example, 0 for padding), and `SFTCausalLM`
runs the backbone's transformer layers with a block-diagonal causal mask:
no token attends to, or is trained to predict, another example's tokens.
`SFTCausalLM(lm)` shares the weights of `lm`, so `lm.generate` uses what it
learned.
"""

import bisect
import csv
import dataclasses
import json
import logging
import os
import re

import numpy as np

from kft.backbones.packing import packing_spec
from kft.data.chat import ChatRenderer
from kft.data.chat import check_messages
from kft.data.chat import require_template
from kft.utils.validation import check_one_of

__all__ = ["FORMATS", "TRUNCATIONS", "SFTStats", "read_records",
           "sft_dataset", "sft_examples"]

FORMATS = ("prompt_completion", "messages", "text")
TRUNCATIONS = ("drop_long", "truncate_completion", "truncate_prompt")

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SFTStats:
    """What `sft_examples` did with the records it was given.

    Attributes:
        records: records read.
        examples: examples kept (after skips).
        rows: sequences produced (fewer than `examples` when packed).
        truncated: kept examples that were cut to fit.
        skipped_empty: records with nothing to learn (an empty completion or
            text, a conversation without an assistant turn).
        skipped_prompt_too_long: prompts that alone fill the sequence.
        skipped_too_long: examples longer than the sequence that the
            truncation policy drops.
        tokens: real (non-padding) input tokens in all rows.
        loss_tokens: targets with weight 1.
    """

    records: int = 0
    examples: int = 0
    rows: int = 0
    truncated: int = 0
    skipped_empty: int = 0
    skipped_prompt_too_long: int = 0
    skipped_too_long: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    @property
    def skipped(self):
        return (self.skipped_empty + self.skipped_prompt_too_long
                + self.skipped_too_long)

    def summary(self):
        """One line: what was kept, skipped and truncated."""
        return (f"{self.records} records -> {self.examples} examples in "
                f"{self.rows} rows; skipped {self.skipped} ({self.skipped_empty} "
                f"empty, {self.skipped_prompt_too_long} prompt too long, "
                f"{self.skipped_too_long} too long), truncated {self.truncated}; "
                f"loss on {self.loss_tokens} of {self.tokens} tokens")


# === Records ===


def read_records(records_or_path):
    """Records from a list, or from a `.jsonl`, `.json` or `.csv` file.

    Files are parsed as data (json / csv), never executed. In a CSV file a
    `messages` column holds each conversation as a JSON list.

    Args:
        records_or_path: a list of dicts or strings, or a file path.

    Returns:
        A list of records.
    """
    if isinstance(records_or_path, (str, os.PathLike)):
        return _read_file(os.fspath(records_or_path))
    if isinstance(records_or_path, dict):
        raise ValueError("records_or_path must be a list of records or a file "
                         "path, not a single record. Received a dict with keys "
                         f"{sorted(records_or_path)}; wrap it in a list.")
    try:
        return list(records_or_path)
    except TypeError:
        raise ValueError("records_or_path must be a list of records or a path "
                         "to a .jsonl, .json or .csv file. Received: "
                         f"{type(records_or_path).__name__}") from None


def _read_file(path):
    try:
        return _parse_file(path)
    except (UnicodeDecodeError, RecursionError, csv.Error) as error:
        # Plain parsers, nothing runs; say which file and what broke.
        raise ValueError(f"{path}: not readable as SFT data "
                         f"({type(error).__name__}: {error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def _parse_file(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such SFT data file: {path!r}")
    extension = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as f:
        if extension == ".jsonl":
            return [_json_line(line, path, number)
                    for number, line in enumerate(f, 1) if line.strip()]
        if extension == ".json":
            records = json.load(f)
            if not isinstance(records, list):
                raise ValueError(f"{path}: a .json SFT file must hold a list of "
                                 f"records. Received: {type(records).__name__}")
            return records
        if extension in (".csv", ".tsv"):
            return list(csv.DictReader(
                f, delimiter="\t" if extension == ".tsv" else ","))
    raise ValueError("SFT data files must be .jsonl, .json, .csv or .tsv. "
                     f"Received: {path!r}")


def _json_line(line, path, number):
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from None


def _field(record, index, key):
    """`record[key]` as a string, or a clear error naming the record."""
    if not isinstance(record, dict) or key not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"Record {index} has no {key!r} field. Received: {found}")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"Record {index}: {key!r} must be a string. Received: "
                         f"{type(value).__name__}")
    return value


# === Chat templates ===


def _segments(record, index, format, renderer):
    """`[(text, weighted), ...]` of one record; None when there is nothing
    to learn."""
    if format == "text":
        text = record if isinstance(record, str) else _field(record, index, "text")
        return [(text, True)] if text else None
    if format == "prompt_completion":
        prompt = _field(record, index, "prompt")
        completion = _field(record, index, "completion")
        return [(prompt, False), (completion, True)] if completion else None
    messages = record.get("messages") if isinstance(record, dict) else record
    messages = check_messages(messages, index)
    if not any(m["role"] == "assistant" for m in messages):
        return None
    return renderer.segments(messages, index)


def _special_pattern(tokenizer):
    specials = [t for t in getattr(tokenizer, "special_tokens", None) or [] if t]
    if not specials:
        return None
    specials.sort(key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")


def _tokenize_texts(tokenizer, texts, batch=2048):
    """Token ids of each text. Special-token strings become their ids (as
    keras-hub's byte-pair tokenizers do) whatever the tokenizer type."""
    pattern = _special_pattern(tokenizer)
    pieces, plans = [], []
    for text in texts:
        plan = []
        for i, part in enumerate(pattern.split(text) if pattern else [text]):
            if not part:
                continue
            if i % 2:
                plan.append(int(tokenizer.token_to_id(part)))
            else:
                plan.append(("piece", len(pieces)))
                pieces.append(part)
        plans.append(plan)
    ids = []
    for start in range(0, len(pieces), batch):
        out = tokenizer(pieces[start:start + batch])
        out = out.to_list() if hasattr(out, "to_list") else out  # tf.Ragged
        out = out.tolist() if hasattr(out, "tolist") else out  # numpy
        ids += [[int(t) for t in row] for row in out]
    return [[t for step in plan for t in (
        ids[step[1]] if isinstance(step, tuple) else [step])] for plan in plans]


def _stop_ids(tokenizer):
    names = ("end_token_id", "end_token2_id")
    return {getattr(tokenizer, n) for n in names
            if getattr(tokenizer, n, None) is not None}


def _assemble(segment_ids, segments, settings):
    """An example's `(tokens, weights)`: start token, segments, end token."""
    tokens, weights = [], []
    for ids, (_, weighted) in zip(segment_ids, segments, strict=True):
        part = [1.0 if weighted else 0.0] * len(ids)
        if weighted and settings["chat"]:
            # A turn trains up to its end token; what the template adds
            # after it (a newline) is not the assistant's to predict.
            last = max((i for i, t in enumerate(ids) if t in settings["stop"]),
                       default=len(ids) - 1)
            part[last + 1:] = [0.0] * (len(ids) - last - 1)
        tokens += ids
        weights += part
    start, end = settings["start"], settings["end"]
    if start is not None and not (settings["chat"] and tokens[:1] == [start]):
        tokens, weights = [start] + tokens, [0.0] + weights
    if end is not None and not settings["chat"]:
        tokens, weights = tokens + [end], weights + [1.0]
    return tokens, weights


def _fit_length(tokens, weights, capacity, truncation, has_start):
    """The example cut to `capacity` tokens per `truncation`, or the name of
    the reason it is skipped."""
    first = next((i for i, w in enumerate(weights) if w), None)
    if first is None:
        return "empty"
    if len(tokens) <= capacity:
        return tokens, weights
    if truncation == "truncate_prompt":
        begin = 1 if has_start else 0
        excess = len(tokens) - capacity
        if excess > first - begin:
            return "too_long"
        cut = slice(begin, begin + excess)
        del tokens[cut], weights[cut]
        return tokens, weights
    if first >= capacity:
        return "prompt_too_long"
    if truncation == "drop_long":
        return "too_long"
    return tokens[:capacity], weights[:capacity]


def _pack(lengths, capacity):
    """Best-fit-decreasing bins of example indices, each summing to at most
    `capacity` tokens; each bin keeps its examples in their given order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins, spaces = [], []  # spaces: sorted (free space, bin index)
    for i in order:
        k = bisect.bisect_left(spaces, (lengths[i], -1))
        if k == len(spaces):
            bins.append([i])
            space, b = capacity - lengths[i], len(bins) - 1
        else:
            space, b = spaces.pop(k)
            bins[b].append(i)
            space -= lengths[i]
        if space >= 2:  # an example has at least two tokens
            bisect.insort(spaces, (space, b))
    return [sorted(b) for b in bins]


def _rows(examples, capacity, packing, pad_id):
    """Rows of `capacity` tokens: `(tokens, weights, segments)` arrays."""
    lengths = [len(tokens) for tokens, _ in examples]
    bins = (_pack(lengths, capacity) if packing
            else [[i] for i in range(len(examples))])
    tokens = np.full((len(bins), capacity), pad_id, dtype="int32")
    weights = np.zeros((len(bins), capacity), dtype="float32")
    segments = np.zeros((len(bins), capacity), dtype="int32")
    for row, members in enumerate(bins):
        offset = 0
        for segment, i in enumerate(members, 1):
            ids, w = examples[i]
            span = slice(offset, offset + len(ids))
            tokens[row, span], weights[row, span] = ids, w
            segments[row, span] = segment
            offset += len(ids)
    return tokens, weights, segments


def _shift(tokens, weights, segments, packing):
    """Rows of `L + 1` tokens -> `(x, y, sample_weight)` of length `L`.

    Position i predicts token i + 1, trained only when both belong to the
    same example: the first token of a packed example is never a target.
    """
    inputs, targets = segments[:, :-1], segments[:, 1:]
    same = (targets == inputs) & (targets > 0)
    x = {"token_ids": tokens[:, :-1], "padding_mask": inputs > 0}
    if packing:
        x["segment_ids"] = inputs
    return x, tokens[:, 1:], (weights[:, 1:] * same).astype("float32")


def _settings(lm, format, sequence_length, chat_template_string):
    preprocessor = getattr(lm, "preprocessor", None)
    if preprocessor is None or getattr(preprocessor, "tokenizer", None) is None:
        raise ValueError("lm must be a keras-hub CausalLM with a preprocessor "
                         "(its tokenizer tokenizes the records). Received: "
                         f"{type(lm).__name__} without one.")
    tokenizer = preprocessor.tokenizer
    length = sequence_length or getattr(preprocessor, "sequence_length", None)
    if not isinstance(length, int) or length < 2:
        raise ValueError("sequence_length must be an integer >= 2. Received: "
                         f"sequence_length={length!r}")
    add_start = getattr(preprocessor, "add_start_token", True)
    add_end = getattr(preprocessor, "add_end_token", True)
    renderer = (ChatRenderer(require_template(lm, chat_template_string),
                              tokenizer) if format == "messages" else None)
    return {"tokenizer": tokenizer, "length": length, "renderer": renderer,
            "chat": format == "messages", "stop": _stop_ids(tokenizer),
            "start": tokenizer.start_token_id if add_start else None,
            "end": tokenizer.end_token_id if add_end else None,
            "pad": getattr(tokenizer, "pad_token_id", None) or 0}


def _check_options(format, truncation, batch_size, formats=FORMATS):
    """Refuses a `format`, `truncation` or `batch_size` that is not allowed
    (`formats`: the record formats of the caller's data)."""
    check_one_of("format", format, formats)
    check_one_of("truncation", truncation, TRUNCATIONS)
    if batch_size is not None and (not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError("batch_size must be a positive integer. Received: "
                         f"batch_size={batch_size!r}")


def sft_examples(records_or_path, lm, *, format="prompt_completion",
                 sequence_length=None, packing=False, truncation="drop_long",
                 shuffle=True, seed=0, chat_template=None):
    """SFT examples as arrays, and what was kept, cut and skipped.

    The arrays are what `sft_dataset` batches; see its docstring for the
    arguments.

    Returns:
        `((x, y, sample_weight), stats)`: `x` a dict of numpy arrays
        `token_ids` (int32, (N, L)), `padding_mask` (bool) and, when packed,
        `segment_ids` (int32); `y` int32 (N, L); `sample_weight` float32
        (N, L); `stats` an `SFTStats`.
    """
    _check_options(format, truncation, None)
    if packing:
        packing_spec(lm.backbone)  # refuse an unsupported family up front
    settings = _settings(lm, format, sequence_length, chat_template)
    records = read_records(records_or_path)
    stats = SFTStats(records=len(records))
    segments = [_segments(r, i, format, settings["renderer"])
                for i, r in enumerate(records)]
    stats.skipped_empty = sum(s is None for s in segments)
    segments = [s for s in segments if s is not None]
    flat = _tokenize_texts(settings["tokenizer"],
                           [text for s in segments for text, _ in s])
    examples, offset = [], 0
    for s in segments:
        pair = _assemble(flat[offset:offset + len(s)], s, settings)
        offset += len(s)
        original = len(pair[0])
        kept = _fit_length(*pair, settings["length"] + 1, truncation,
                           settings["start"] is not None)
        if isinstance(kept, str):
            setattr(stats, f"skipped_{kept}", getattr(stats, f"skipped_{kept}") + 1)
            continue
        stats.truncated += len(kept[0]) < original
        examples.append(kept)
    if not examples:
        raise ValueError(f"No SFT example fits: {stats.summary()}.")
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(examples))
        examples = [examples[i] for i in order]
    rows = _rows(examples, settings["length"] + 1, packing, settings["pad"])
    x, y, sample_weight = _shift(*rows, packing)
    stats.examples, stats.rows = len(examples), len(y)
    stats.tokens = int(x["padding_mask"].sum())
    stats.loss_tokens = int(np.count_nonzero(sample_weight))
    return (x, y, sample_weight), stats


def sft_dataset(records_or_path, lm, *, format="prompt_completion", batch_size=8,
                packing=False, shuffle=True, sequence_length=None,
                truncation="drop_long", seed=0, chat_template=None):
    """A `tf.data.Dataset` of SFT batches with the loss on completions only.

    Args:
        records_or_path: a list of records, or a `.jsonl` / `.json` / `.csv`
            file of them. `"prompt_completion"`: dicts with `prompt` and
            `completion` strings (the completion follows the prompt as is:
            put any separator in the data). `"messages"`: dicts with
            `messages`, a list of `{"role": "system" | "user" | "assistant",
            "content": str}`. `"text"`: strings or dicts with `text`.
        lm: a keras-hub `CausalLM` (from `kft.build_causal_lm`): its
            tokenizer, sequence length and chat template are used.
        format: one of `FORMATS`. The loss falls on completions, on the
            assistant's turns (each through its end token), or on all of a
            text's tokens.
        batch_size: rows per batch.
        packing: put several examples in each row; train the rows with
            `SFTCausalLM(lm)`, which keeps attention inside each example (a
            plain keras-hub `CausalLM` would ignore `segment_ids`, with only
            a Keras warning, and attend across examples).
        shuffle: shuffle the examples once, and the rows every epoch.
        sequence_length: tokens per row; default the preprocessor's.
        truncation: for examples longer than the row: `"drop_long"` skips
            them; `"truncate_completion"` cuts their end; `"truncate_prompt"`
            cuts the start of the prompt (after the start token) so the
            whole completion fits. A prompt that leaves no room for a
            completion token is skipped under the first two. All skips are
            counted and logged.
        seed: the shuffling seed.
        chat_template: a Jinja chat template for `"messages"`; default
            `lm.chat_template`.

    Returns:
        A `tf.data.Dataset` of `(x, y, sample_weight)` batches: `x` a dict of
        `token_ids`, `padding_mask` (and `segment_ids` when packed).

    Example:

    ```python
    lm = kft.build_causal_lm(checkpoint_dir, sequence_length=128)
    train = kft.data.sft_dataset(
        [{"prompt": "2 + 2 =", "completion": " 4"}], lm, batch_size=4)
    model = kft.sft.SFTCausalLM(lm)
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    model.fit(train, epochs=3)
    ```
    """
    import tensorflow as tf

    _check_options(format, truncation, batch_size)
    (x, y, sample_weight), stats = sft_examples(
        records_or_path, lm, format=format, sequence_length=sequence_length,
        packing=packing, truncation=truncation, shuffle=shuffle, seed=seed,
        chat_template=chat_template)
    log = logger.warning if stats.skipped or stats.truncated else logger.info
    log("sft_dataset: %s.", stats.summary())
    dataset = tf.data.Dataset.from_tensor_slices((x, y, sample_weight))
    if shuffle:
        dataset = dataset.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
