"""Rollouts: `G` sampled completions per prompt with keras-hub's cached
generation, as token arrays ready for the policy's log-probabilities.

`RolloutGenerator` runs the causal LM's own compiled generate step
(`CausalLM.make_generate_function`: one prefill, then one token at a time
against the key/value cache) with a keras-hub sampler of its own, on a
batch of `prompts * G` rows of a fixed length (`max_prompt_length +
max_new_tokens`, so the step is traced once). The sampler's seed is set
from `(seed, step)` before each batch: a rollout is a function of the
weights and the step alone, and a resumed run draws what the
uninterrupted one drew.
"""

import dataclasses

import keras
import numpy as np

__all__ = ["RolloutConfig", "RolloutGenerator", "Rollouts"]


@dataclasses.dataclass
class RolloutConfig:
    """How completions are sampled.

    Args:
        num_generations: completions per prompt (`G`).
        max_new_tokens: the most tokens a completion has.
        max_prompt_length: the most tokens a prompt has (with the start
            token); a longer prompt is an error.
        temperature: sampling temperature (0: greedy); the log-probabilities
            are computed at the same temperature, as TRL does.
        top_p: nucleus sampling's `p` (1: the whole distribution).
        top_k: sample among the `k` likeliest tokens (`None`: all).
        stop_token_ids: token ids that end a completion (kept as its last
            token); `"auto"`: the tokenizer's end token(s).
    """

    num_generations: int = 8
    max_new_tokens: int = 64
    max_prompt_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop_token_ids: object = "auto"

    def __post_init__(self):
        for name in ("num_generations", "max_new_tokens", "max_prompt_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer. "
                                 f"Received: {name}={value!r}")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0. Received: "
                             f"temperature={self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]. Received: top_p={self.top_p!r}")

    @property
    def sequence_length(self):
        return self.max_prompt_length + self.max_new_tokens


@dataclasses.dataclass
class Rollouts:
    """A batch of sampled completions.

    Attributes:
        token_ids: `(N, L)` int32, each row a prompt then its completion.
        prompt_mask: `(N, L)` bool, the prompt's tokens.
        completion_mask: `(N, L)` bool, the completion's tokens (its stop
            token included).
        completions: `N` decoded completions (special tokens dropped).
        prompt_index: `(N,)` which prompt of the batch each row answers.
    """

    token_ids: np.ndarray
    prompt_mask: np.ndarray
    completion_mask: np.ndarray
    completions: list
    prompt_index: np.ndarray

    def lengths(self):
        return self.completion_mask.sum(axis=1)

    def training_inputs(self, advantages=None):
        """The model's inputs: the tokens but the last (`token_ids`,
        `padding_mask`), the next tokens (`targets`), 1 on completion
        targets (`completion_mask`), and `advantages` when given."""
        keep = self.prompt_mask | self.completion_mask
        x = {"token_ids": self.token_ids[:, :-1],
             "padding_mask": keep[:, :-1],
             "targets": self.token_ids[:, 1:],
             "completion_mask": self.completion_mask[:, 1:].astype("float32")}
        if advantages is not None:
            x["advantages"] = np.asarray(advantages, "float32")
        return x


def make_sampler(config, seed=0):
    """The keras-hub sampler for `config` (greedy at temperature 0)."""
    import keras_hub

    if config.temperature == 0:
        return keras_hub.samplers.GreedySampler()
    if config.top_p < 1:
        return keras_hub.samplers.TopPSampler(p=config.top_p, k=config.top_k,
                                              temperature=config.temperature,
                                              seed=seed)
    if config.top_k is not None:
        return keras_hub.samplers.TopKSampler(k=config.top_k,
                                              temperature=config.temperature,
                                              seed=seed)
    return keras_hub.samplers.RandomSampler(temperature=config.temperature,
                                            seed=seed)


def _stop_ids(lm, stop_token_ids):
    if stop_token_ids != "auto":
        return None if stop_token_ids is None else tuple(stop_token_ids)
    tokenizer = lm.preprocessor.tokenizer
    ids = [tokenizer.end_token_id]
    if getattr(tokenizer, "end_token2_id", None) is not None:
        ids.append(tokenizer.end_token2_id)
    return tuple(ids)


class RolloutGenerator:
    """Samples completions of prompts from a keras-hub `CausalLM`.

    Args:
        lm: a keras-hub `CausalLM` with a preprocessor (LoRA adapters, if
            any, take part: the policy samples).
        config: a `RolloutConfig`.
        seed: the base of every batch's sampling seed.

    Example:

    ```python
    generator = RolloutGenerator(lm, RolloutConfig(num_generations=4))
    rollouts = generator.generate(["What is 2 + 3?"], step=0)
    rollouts.completions  # 4 strings
    ```
    """

    def __init__(self, lm, config=None, seed=0):
        if lm.preprocessor is None:
            raise ValueError("Rollouts tokenize prompts with the model's "
                             "preprocessor, and this CausalLM has none.")
        self.lm, self.config, self.seed = lm, config or RolloutConfig(), seed
        self.sampler = make_sampler(self.config, seed)
        self.stop_token_ids = _stop_ids(lm, self.config.stop_token_ids)
        self._function = None

    def encode(self, prompts):
        """`{"token_ids", "padding_mask"}` of the prompts, padded to the
        rollout length; an error names a prompt that is too long."""
        config = self.config
        tokenizer = self.lm.preprocessor.tokenizer
        lengths = [int(np.size(keras.ops.convert_to_numpy(tokenizer(p))))
                   for p in dict.fromkeys(prompts)]
        start = int(bool(getattr(self.lm.preprocessor, "add_start_token", False)))
        longest = max(lengths) + start
        if longest > config.max_prompt_length:
            index = int(np.argmax(lengths))
            raise ValueError(
                f"A prompt has {longest} tokens, more than max_prompt_length="
                f"{config.max_prompt_length}: {list(dict.fromkeys(prompts))[index]!r}")
        x = self.lm.preprocessor.generate_preprocess(
            list(prompts), sequence_length=config.sequence_length)
        return {key: keras.ops.convert_to_numpy(value) for key, value in x.items()}

    def _generate_function(self):
        """The LM's compiled generate step, traced with this sampler (the
        LM's own sampler and function are put back afterwards)."""
        lm = self.lm
        saved = (getattr(lm, "sampler", None), getattr(lm, "generate_function", None))
        lm.sampler, lm.generate_function = self.sampler, self._function
        try:
            self._function = lm.make_generate_function()
        finally:
            lm.sampler, lm.generate_function = saved
        return self._function

    def _seed(self, step):
        for variable in self.sampler.variables:  # the seed generator's state
            variable.assign(np.asarray([self.seed, step], variable.dtype))

    def generate(self, prompts, step=0, repeat=True):
        """Completions of `prompts`.

        Args:
            prompts: prompt strings (already rendered with a chat template
                if the model wants one).
            step: the sampling step (with the seed, it fixes the draw).
            repeat: `G` completions per prompt (rows `G i .. G i + G - 1`
                answer prompt `i`); `False`: one each.

        Returns:
            `Rollouts`.
        """
        copies = self.config.num_generations if repeat else 1
        rows = [p for p in prompts for _ in range(copies)]
        x = self.encode(rows)
        self._seed(step)
        function = self._generate_function()
        lm = self.lm
        saved = getattr(lm, "sampler", None)
        lm.sampler = self.sampler  # read again if the step retraces
        try:
            out = function(x, stop_token_ids=self.stop_token_ids)
        finally:
            lm.sampler = saved
        token_ids = keras.ops.convert_to_numpy(out["token_ids"]).astype("int32")
        kept = keras.ops.convert_to_numpy(out["padding_mask"]).astype(bool)
        prompt_mask = x["padding_mask"].astype(bool)
        completion = kept & ~prompt_mask
        # At most max_new_tokens each (a short prompt's row has room for more).
        completion &= np.cumsum(completion, axis=1) <= self.config.max_new_tokens
        return Rollouts(token_ids, prompt_mask, completion,
                        self.decode(token_ids, completion),
                        np.repeat(np.arange(len(prompts)), copies))

    def decode(self, token_ids, mask):
        """The completions' text, special tokens dropped."""
        tokenizer = self.lm.preprocessor.tokenizer
        special = set(getattr(tokenizer, "special_token_ids", None) or ())
        texts = []
        for row, keep in zip(token_ids, mask):
            ids = [int(t) for t in row[keep] if int(t) not in special]
            texts.append(_to_text(tokenizer.detokenize(ids)) if ids else "")
        return texts


def _to_text(value):
    value = keras.ops.convert_to_numpy(value) if not isinstance(value, str) else value
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
