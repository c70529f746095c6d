"""Prompts for RL: `PromptDataset` and a checkable task offline.

A prompt record is a dict with a `prompt` (the text the model continues)
and any other columns the rewards read (`answer`, say). `PromptDataset`
serves batches of records by step number: step `s` gets the records at
positions `s * batch_size ...` of an endless sequence of shuffled passes,
each pass's order drawn from `(seed, pass)`. No iterator state: a resumed
run asks for step `s` and gets what the first run got.

`arithmetic_prompts` makes the two-digit addition task ("What is 47 +
38?" with `answer` "85"); `split_prompts` holds out prompts that training
never sees.
"""

import numpy as np

__all__ = ["PromptDataset", "arithmetic_prompts", "render_prompts",
           "split_prompts"]

DEFAULT_INSTRUCTION = "What is {a} + {b}? Reply with only the number."


class PromptDataset:
    """Prompt records served in batches by step.

    Args:
        records: a list of `{"prompt": str, ...}` dicts.
        batch_size: prompts per step (each gets `G` completions).
        shuffle: a new random order each pass over the records.
        seed: the orders' seed.

    Example:

    ```python
    data = PromptDataset([{"prompt": "a"}, {"prompt": "b"}], batch_size=1,
                         shuffle=False)
    [data.batch(s)[0]["prompt"] for s in range(3)]  # prompts a, b, a
    ```
    """

    def __init__(self, records, batch_size=4, shuffle=True, seed=0):
        records = list(records)
        if not records:
            raise ValueError("PromptDataset: no prompt records")
        for i, record in enumerate(records):
            if not isinstance(record, dict) or not isinstance(
                    record.get("prompt"), str):
                raise ValueError(f"Prompt record {i} has no 'prompt' string. "
                                 f"Received: {record!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError("batch_size must be a positive integer. Received: "
                             f"batch_size={batch_size!r}")
        self.records, self.batch_size = records, batch_size
        self.shuffle, self.seed = shuffle, seed
        self._orders = {}

    def __len__(self):
        return len(self.records)

    def _order(self, epoch):
        if not self.shuffle:
            return np.arange(len(self.records))
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng(
                [self.seed, epoch]).permutation(len(self.records))
        return self._orders[epoch]

    def batch(self, step):
        """The records of step `step` (0-based)."""
        count = len(self.records)
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [self.records[self._order(p // count)[p % count]] for p in positions]


def arithmetic_prompts(count, seed=0, instruction=DEFAULT_INSTRUCTION, low=10,
                       high=99):
    """Two-digit addition questions with their answers.

    Args:
        count: how many (distinct pairs).
        seed: which pairs.
        instruction: the question, with `{a}` and `{b}`.
        low: the smallest operand.
        high: the largest operand.

    Returns:
        `[{"prompt": question, "question": question, "answer": "85"}]`
        (`prompt` is the bare question: render it with `render_prompts`
        for a chat model).
    """
    span = high - low + 1
    if count > span * span:
        raise ValueError(f"Only {span * span} distinct pairs lie in "
                         f"[{low}, {high}]. Received: count={count}")
    codes = np.random.default_rng(seed).choice(span * span, count, replace=False)
    records = []
    for code in codes:
        a, b = low + int(code) // span, low + int(code) % span
        question = instruction.format(a=a, b=b)
        records.append({"prompt": question, "question": question,
                        "answer": str(a + b)})
    return records


def render_prompts(lm, records, system=None):
    """Records whose `prompt` is the user turn rendered with `lm`'s chat
    template (and the assistant's header), ready for generation."""
    from kft.data.chat import render_chat

    rendered = []
    for record in records:
        messages = [{"role": "user", "content": record["prompt"]}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        rendered.append({**record, "prompt": render_chat(lm, messages)})
    return rendered


def split_prompts(records, validation_split=0.1, seed=0):
    """`(train, held_out)`: a random `validation_split` of the records held
    out (never trained on)."""
    held = int(round(len(records) * validation_split))
    order = np.random.default_rng(seed).permutation(len(records))
    return ([records[i] for i in order[held:]],
            [records[i] for i in order[:held]])
