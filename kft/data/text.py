"""Text data that installs offline (fortunes, WordNet glosses) and text
files (CSV, JSON lines) -> `(texts, labels)` datasets.
"""

import os

import numpy as np
import tensorflow as tf

from kft.data.arrays import DataBundle
from kft.data.arrays import check_labels
from kft.data.arrays import train_val_split

__all__ = ["from_texts", "load_fortunes", "load_text_file", "load_wordnet_glosses"]

_AUTOTUNE = tf.data.AUTOTUNE
FORTUNES_DIRS = ("/usr/share/games/fortunes",)
FORTUNES_TOPICS = ("art", "computers", "politics", "science")

WORDNET_NOUNS = ("/usr/share/wordnet/data.noun",)


def load_fortunes(topics=FORTUNES_TOPICS, *, data_dir=None, per_topic=None,
                  min_chars=20, seed=0):
    """A real topic-classification text set: the `fortune` files by topic.

    Debian's `fortunes` package installs one plain-text file per topic
    (`computers`, `politics`, `science`, `art`, ...), entries separated by
    `%` lines. Each entry is an example labelled with its file's topic.
    Whitespace is collapsed; entries shorter than `min_chars` and entries
    found under two topics are dropped.

    Args:
        topics: file names to read; classes in this order.
        data_dir: the folder of the files (default: Debian's).
        per_topic: keep at most this many entries per topic (a seeded
            random choice), for balanced or smaller sets.
        min_chars: drop shorter entries.
        seed: for the `per_topic` choice.

    Returns:
        `(texts, labels, class_names)`.
    """
    folders = [data_dir] if data_dir else list(FORTUNES_DIRS)
    folder = next((f for f in folders if f and os.path.isdir(f)), None)
    if folder is None:
        raise RuntimeError(
            "The fortunes files are not installed. Install them with "
            "`apt-get install fortunes` or pass data_dir=<folder of the files>.")
    topics = list(topics)
    if len(topics) < 2:
        raise ValueError(f"Give at least 2 topics. Received: {topics!r}")
    entries = {}
    for topic in topics:
        path = os.path.join(folder, topic)
        if not os.path.isfile(path):
            available = sorted(
                f for f in os.listdir(folder)
                if "." not in f and os.path.isfile(os.path.join(folder, f)))
            raise ValueError(
                f"No fortunes topic {topic!r} in {folder}. Available: {available}")
        with open(path, encoding="utf-8", errors="replace") as f:
            chunks = f.read().split("\n%\n")
        entries[topic] = [" ".join(c.split()) for c in chunks
                          if len(" ".join(c.split())) >= min_chars]
    seen = {}
    for texts in entries.values():
        for text in set(texts):
            seen[text] = seen.get(text, 0) + 1
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for label, topic in enumerate(topics):
        kept = list(dict.fromkeys(t for t in entries[topic] if seen[t] == 1))
        if per_topic is not None and len(kept) > per_topic:
            kept = [kept[i] for i in sorted(rng.choice(len(kept), per_topic,
                                                       replace=False))]
        texts.extend(kept)
        labels.extend([label] * len(kept))
    return texts, labels, topics


def load_text_file(path, text_column="text", label_column="label"):
    """Reads texts and labels from a `.csv` (with a header row) or `.jsonl`.

    Labels may be integers or names; names are mapped to indices in
    alphabetical order.

    Returns:
        `(texts, labels, class_names)`.
    """
    import csv

    if not os.path.isfile(path):
        raise ValueError(f"Text file not found: {path!r}")
    try:
        rows = _text_rows(path)
    except (UnicodeDecodeError, RecursionError, csv.Error) as error:
        # Plain parsers, nothing runs; say which file and what broke.
        raise ValueError(f"{path}: not readable as text data "
                         f"({type(error).__name__}: {error})") from None
    if not rows:
        raise ValueError(f"{path!r} holds no examples.")
    for key in (text_column, label_column):
        if key not in rows[0]:
            raise ValueError(
                f"{path!r} has no column {key!r}. Columns: {sorted(rows[0])}")
    texts = [str(r[text_column]) for r in rows]
    raw = [r[label_column] for r in rows]
    try:
        labels = [int(v) for v in raw]
        class_names = [str(i) for i in range(max(labels) + 1)]
    except (TypeError, ValueError):
        class_names = sorted({str(v) for v in raw})
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[str(v)] for v in raw]
    return texts, labels, class_names


def _text_rows(path):
    """The records of a `.jsonl` (objects) or `.csv` / `.tsv` file."""
    import csv
    import json

    rows = []
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(
                            f"{path}:{number}: not valid JSON: {error}") from None
                    if not isinstance(rows[-1], dict):
                        raise ValueError(
                            f"{path}:{number}: not a JSON object (a "
                            f"{type(rows[-1]).__name__}).")
    elif path.endswith((".csv", ".tsv")):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(
                f, delimiter="\t" if path.endswith(".tsv") else ","))
    else:
        raise ValueError(
            f"Text data must be .csv, .tsv or .jsonl. Received: {path!r}")
    return rows


def from_texts(texts, labels, *, batch_size=32, validation_split=0.2,
               shuffle=True, seed=0, class_names=None):
    """Batched `tf.data` pipelines of `(string, label)` for text models.

    A keras-hub text classifier (`kft.build_text_classifier`) takes these
    raw strings. The validation split is stratified.

    Returns:
        A `DataBundle` (`input_shape` is `()`).
    """
    texts = np.asarray([str(t) for t in texts], dtype=object)
    labels = np.asarray(labels)
    if len(texts) != len(labels):
        raise ValueError(
            f"texts and labels differ in length: {len(texts)} and {len(labels)}")
    num_classes = check_labels(labels, len(class_names) if class_names else None,
                               where="labels")
    (train_x, train_y), val = train_val_split(texts, labels.astype("int32"),
                                     validation_split, seed)

    def pipeline(x, y, shuffle_it):
        ds = tf.data.Dataset.from_tensor_slices((x.astype(str), y))
        if shuffle_it:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(_AUTOTUNE)

    train = pipeline(train_x, train_y, shuffle)
    val_ds = pipeline(*val, False) if val is not None else None
    names = class_names or [str(i) for i in range(num_classes)]
    return DataBundle(train, val_ds, names, ())


def load_wordnet_glosses(path=None, *, max_examples=None, seed=0):
    """WordNet's noun definitions as SFT records: "Define: word" -> gloss.

    A real supervised fine-tuning task that installs offline (Debian
    `wordnet-base`): 82,115 noun synsets, each with a human-written gloss.
    The first lemma of each synset is the word (underscores become
    spaces); the gloss is its text before the first example sentence.

    Args:
        path: WordNet's `data.noun` (default: the Debian package's).
        max_examples: keep this many, drawn at random with `seed`.
        seed: the draw's seed.

    Returns:
        A list of `{"prompt": "Define: <word>\n", "completion": <gloss>}`.
    """
    path = path or next((p for p in WORDNET_NOUNS if os.path.exists(p)), None)
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(
            "WordNet is not installed: apt-get install wordnet-base (or pass "
            "path= to a WordNet data.noun file).")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" ") or "|" not in line:
                continue  # the licence header
            fields, gloss = line.split("|", 1)
            word = fields.split()[4].replace("_", " ")
            gloss = gloss.split(';"', 1)[0].split('; "', 1)[0].strip()
            if gloss:
                records.append({"prompt": f"Define: {word}\n", "completion": gloss})
    if max_examples is not None and max_examples < len(records):
        rng = np.random.default_rng(seed)
        keep = sorted(rng.choice(len(records), max_examples, replace=False))
        records = [records[i] for i in keep]
    return records
