"""Text augmentation: the EDA operations (Wei and Zou, 2019).

Synonym replacement, random insertion, random swap and random deletion,
each changing at most a given share of the words; synonyms from WordNet
(read directly from its database files: Debian's `wordnet-base`, or
`nltk`'s WordNet data) or from a user dictionary; back-translation through
a callable the user supplies.
"""

import os
import random
import re

__all__ = ["TextAugmentation", "WordNet", "STOPWORDS"]

STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because
been before being below between both but by can did do does doing down
during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more
most my myself no nor not now of off on once only or other our ours
ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too
under until up very was we were what when where which while who whom why
will with you your yours yourself yourselves
""".split())

WORDNET_DIRS = ("/usr/share/wordnet",)
_POS = ("noun", "verb", "adj", "adv")


def _nltk_wordnet_dirs():
    try:
        import nltk
    except ImportError:
        return []
    return [os.path.join(p, "corpora", "wordnet") for p in nltk.data.path]


class WordNet:
    """Synonyms from the WordNet database files (index.* and data.*).

    Args:
        path: folder with `index.noun`, `data.noun`, ...; by default
            Debian's `wordnet-base` (`/usr/share/wordnet`) or `nltk`'s
            WordNet data.
    """

    def __init__(self, path=None):
        candidates = [path] if path else [*WORDNET_DIRS, *_nltk_wordnet_dirs()]
        for folder in candidates:
            if folder and os.path.exists(os.path.join(folder, "index.noun")):
                self.path = folder
                break
        else:
            raise FileNotFoundError(
                "WordNet not found. Install it (`apt-get install wordnet-base`, "
                "or `nltk.download('wordnet')`), pass WordNet(path=...), or "
                "give TextAugmentation a synonyms={word: [synonyms]} dict.")
        self._index = None
        self._cache = {}

    def _load_index(self):
        index = {}
        for pos in _POS:
            with open(os.path.join(self.path, f"index.{pos}"), encoding="utf-8",
                      errors="replace") as f:
                for line in f:
                    if line.startswith(" "):
                        continue  # licence header
                    parts = line.split()
                    lemma, synset_count = parts[0], int(parts[2])
                    offsets = parts[-synset_count:]
                    index.setdefault(lemma, []).extend(
                        (pos, int(o)) for o in offsets)
        self._index = index

    def synonyms(self, word):
        """Synonyms of `word` (lowercase, spaces for underscores), sorted."""
        word = word.lower()
        if word in self._cache:
            return self._cache[word]
        if self._index is None:
            self._load_index()
        found = set()
        for pos, offset in self._index.get(word, ()):
            with open(os.path.join(self.path, f"data.{pos}"), "rb") as f:
                f.seek(offset)
                fields = f.readline().decode("utf-8", "replace").split()
            count = int(fields[3], 16)
            for i in range(count):
                lemma = re.sub(r"\(.*\)$", "", fields[4 + 2 * i])
                found.add(lemma.replace("_", " ").lower())
        found.discard(word)
        result = sorted(found)
        self._cache[word] = result
        return result


class TextAugmentation:
    """EDA augmentation of sentences.

    Each operation changes at most `max(1, int(share * n_words))` words of
    a sentence (none when its share is 0): synonym replacement replaces
    words (not stopwords) by a synonym, random insertion inserts a synonym
    of a random word at a random place, random swap swaps two words,
    random deletion deletes each word with probability `share` (never all
    of them).

    Args:
        synonym_replacement: the share of words this operation changes.
        random_insertion: the share of words this operation changes.
        random_swap: the share of words this operation changes.
        random_deletion: the share of words this operation changes.
        synonyms: `"wordnet"` (default), a `WordNet`, or a dict
            `{word: [synonyms]}`.
        back_translate: a callable `text -> text` (e.g. translate to
            another language and back) applied with probability
            `back_translate_probability`.
        stopwords: words never replaced.
        seed: the same seed gives the same augmentations.

    Example:

    ```python
    augment = kft.augment.TextAugmentation(synonym_replacement=0.1,
                                           random_swap=0.1, seed=0)
    texts, labels = augment.augment(texts, labels, copies=2)
    dataset = augment.map(dataset)   # a tf.data dataset of (text, label)
    ```
    """

    def __init__(self, synonym_replacement=0.0, random_insertion=0.0,
                 random_swap=0.0, random_deletion=0.0, synonyms="wordnet",
                 back_translate=None, back_translate_probability=0.0,
                 stopwords=STOPWORDS, seed=None):
        shares = {"synonym_replacement": synonym_replacement,
                  "random_insertion": random_insertion,
                  "random_swap": random_swap,
                  "random_deletion": random_deletion,
                  "back_translate_probability": back_translate_probability}
        for name, value in shares.items():
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1]. Received: {value!r}")
        if back_translate_probability and not callable(back_translate):
            raise ValueError(
                "back_translate_probability > 0 needs back_translate, a "
                "callable text -> text.")
        # The four EDA operations' rates.
        (self.synonym_replacement, self.random_insertion, self.random_swap,
         self.random_deletion) = (synonym_replacement, random_insertion,
                                  random_swap, random_deletion)
        self.back_translate = back_translate
        self.back_translate_probability = back_translate_probability
        self.stopwords = frozenset(stopwords)
        if isinstance(synonyms, dict):
            self._synonyms = {k.lower(): list(v) for k, v in synonyms.items()}
            self._lookup = lambda w: self._synonyms.get(w.lower(), [])
        elif synonyms == "wordnet" or isinstance(synonyms, WordNet):
            wordnet = synonyms if isinstance(synonyms, WordNet) else None
            self._wordnet = wordnet
            self._lookup = self._wordnet_lookup
        else:
            raise ValueError(
                "synonyms must be 'wordnet', a kft.augment.WordNet or a dict "
                f"{{word: [synonyms]}}. Received: {type(synonyms).__name__}")
        self.random = random.Random(seed)

    def _wordnet_lookup(self, word):
        if self._wordnet is None:
            self._wordnet = WordNet()
        return self._wordnet.synonyms(word)

    @staticmethod
    def _count(share, n):
        return 0 if not share or not n else max(1, int(share * n))

    def _candidates(self, words):
        return [i for i, w in enumerate(words)
                if w.lower() not in self.stopwords and self._lookup(w)]

    def synonym_replace(self, words, share):
        words = list(words)
        candidates = self._candidates(words)
        self.random.shuffle(candidates)
        for i in candidates[: self._count(share, len(words))]:
            words[i] = self.random.choice(self._lookup(words[i]))
        return words

    def random_insert(self, words, share):
        words = list(words)
        candidates = [words[i] for i in self._candidates(words)]
        for _ in range(self._count(share, len(words))):
            if not candidates:
                break
            synonym = self.random.choice(self._lookup(
                self.random.choice(candidates)))
            words.insert(self.random.randint(0, len(words)), synonym)
        return words

    def random_swap_words(self, words, share):
        words = list(words)
        if len(words) < 2:
            return words
        for _ in range(self._count(share, len(words)) // 2 or
                       (1 if share else 0)):
            i, j = self.random.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
        return words

    def random_delete(self, words, share):
        if not share or len(words) <= 1:
            return list(words)
        budget = self._count(share, len(words))
        order = list(range(len(words)))
        self.random.shuffle(order)
        drop = {i for i in order[:budget] if self.random.random() < share}
        kept = [w for i, w in enumerate(words) if i not in drop]
        # Never return an empty sentence.
        return kept or [self.random.choice(words)]

    def __call__(self, text):
        """One augmented version of `text`."""
        if (self.back_translate is not None
                and self.random.random() < self.back_translate_probability):
            text = self.back_translate(text)
        words = text.split()
        if not words:
            return text
        words = self.synonym_replace(words, self.synonym_replacement)
        words = self.random_insert(words, self.random_insertion)
        words = self.random_swap_words(words, self.random_swap)
        words = self.random_delete(words, self.random_deletion)
        return " ".join(words)

    def augment(self, texts, labels=None, copies=1, keep_original=True):
        """Augments a list of texts; labels are repeated alongside.

        Returns:
            `texts` or `(texts, labels)`: the originals (if
            `keep_original`) then `copies` augmented versions of each.
        """
        out_texts, out_labels = [], []
        for index, text in enumerate(texts):
            versions = ([text] if keep_original else []) + [
                self(text) for _ in range(copies)]
            out_texts.extend(versions)
            if labels is not None:
                out_labels.extend([labels[index]] * len(versions))
        return out_texts if labels is None else (out_texts, out_labels)

    def map(self, dataset):
        """Augments a `tf.data` dataset of strings or `(string, label)`.

        Runs the Python operations through `tf.py_function`; apply it
        before batching.
        """
        import tensorflow as tf

        def augment_one(text):
            value = text.numpy().decode("utf-8")
            return self(value)

        def fn(text, *rest):
            out = tf.py_function(augment_one, [text], tf.string)
            out.set_shape(text.shape)
            return (out, *rest) if rest else out

        return dataset.map(fn)
