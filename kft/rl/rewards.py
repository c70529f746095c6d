"""Verifiable rewards: Python callables that score completions.

A reward has TRL's signature, `reward(prompts, completions, **columns) ->
list[float]`: `prompts` and `completions` are lists of strings of one
length, and `columns` holds every other field of the prompt records (an
`answer`, say), one value per completion. Users bring their own
functions; recipes name the built-ins registered here (never code from
the YAML):

- `exact_answer`: 1 when the answer extracted from the completion equals
  the record's `answer` column, else 0.
- `format`: 1 when the completion matches a regular expression, else 0.
- `length`: 1 up to `max_words` words (or `max_chars` characters), then
  falling as `max / length`.

`score_rewards` calls several rewards, checks what each returns (a
reward that raises, returns the wrong number of values, a NaN or a
non-number is a `RewardError` naming it) and weighs them.
"""

import dataclasses
import difflib
import math
import re

import numpy as np

__all__ = ["REWARDS", "RewardError", "RewardSpec", "exact_answer_reward",
           "format_reward", "get_reward", "length_reward", "register_reward",
           "reward_name", "score_rewards"]


class RewardError(ValueError):
    """A reward function raised, or returned something other than one
    finite number per completion; the message names the reward."""


def _normalise(text):
    return " ".join(str(text).strip().lower().rstrip(".").split())


def exact_answer_reward(pattern=None):
    """A reward: 1.0 where the completion's answer equals `answer`.

    Args:
        pattern: a regular expression that finds the answer in the
            completion (its first group, or the whole match; the last
            match counts); `None`: the whole completion. Compared after
            stripping, lower-casing and dropping a final period.

    Returns:
        `reward(prompts, completions, answer, **columns) -> list[float]`.

    Example:

    >>> reward = exact_answer_reward(r"(-?\\d+)")
    >>> reward(["2 + 2?"], ["It is 4."], answer=["4"])
    [1.0]
    """
    compiled = re.compile(pattern) if pattern else None

    def extract(completion):
        if compiled is None:
            return completion
        matches = list(compiled.finditer(completion))
        if not matches:
            return None
        last = matches[-1]
        return last.group(1) if compiled.groups else last.group(0)

    def exact_answer(prompts, completions, answer=None, **columns):
        if answer is None:
            raise ValueError("exact_answer compares with the prompts' 'answer' "
                             "column, and these prompts have none")
        scores = []
        for completion, expected in zip(completions, answer):
            found = extract(completion)
            scores.append(float(found is not None
                                and _normalise(found) == _normalise(expected)))
        return scores

    return exact_answer


def format_reward(pattern, full_match=True):
    """A reward: 1.0 where the completion matches `pattern`.

    Args:
        pattern: a regular expression (`re.DOTALL`: `.` matches newlines).
        full_match: the whole stripped completion must match
            (`re.fullmatch`); `False`: anywhere (`re.search`).

    Returns:
        `reward(prompts, completions, **columns) -> list[float]`.

    Example:

    >>> format_reward(r"-?\\d+")(["2 + 2?"] * 2, ["4", "2 + 2 = 4"])
    [1.0, 0.0]
    """
    compiled = re.compile(pattern, re.DOTALL)
    match = compiled.fullmatch if full_match else compiled.search

    def format(prompts, completions, **columns):
        return [float(match(c.strip()) is not None) for c in completions]

    return format


def length_reward(max_words=None, max_chars=None):
    """A reward for brevity: 1.0 up to the limit, then `limit / length`.

    Args:
        max_words: the most whitespace-separated words that score 1.
        max_chars: or the most characters (one of the two).

    Returns:
        `reward(prompts, completions, **columns) -> list[float]`.

    Example:

    >>> length_reward(max_words=2)(["q"] * 2, ["one two", "one two three four"])
    [1.0, 0.5]
    """
    if (max_words is None) == (max_chars is None):
        raise ValueError("length takes one of max_words or max_chars. "
                         f"Received: max_words={max_words!r}, "
                         f"max_chars={max_chars!r}")
    limit = max_words if max_words is not None else max_chars
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"length's limit is a positive integer. Received: {limit!r}")

    def size(completion):
        return len(completion.split()) if max_words is not None else len(completion)

    def length(prompts, completions, **columns):
        return [min(1.0, limit / max(size(c), 1)) for c in completions]

    return length


# Registered name -> factory(**options) -> reward function.
REWARDS = {"exact_answer": exact_answer_reward, "format": format_reward,
           "length": length_reward}


def register_reward(name, factory, *, override=False):
    """Adds a reward factory that recipes can name.

    Args:
        name: the name recipes use (`rl.rewards: [{name: ...}]`).
        factory: `factory(**options) -> reward function`.
        override: replace a registered name.

    Raises:
        ValueError: a bad or taken name, or a factory that is not callable.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"A reward's name is an identifier. Received: {name!r}")
    if not callable(factory):
        raise ValueError(f"register_reward takes a callable factory. "
                         f"Received: {factory!r}")
    if name in REWARDS and not override:
        raise ValueError(f"A reward named {name!r} is registered already; "
                         "pass override=True to replace it.")
    REWARDS[name] = factory


def get_reward(name, **options):
    """The registered reward `name`, built with `options`.

    Raises:
        ValueError: an unknown name (with the registered ones) or options
            the factory refuses.
    """
    if name not in REWARDS:
        close = difflib.get_close_matches(str(name), list(REWARDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown reward {name!r}; registered: "
                         f"{', '.join(REWARDS)}.{hint}")
    try:
        return REWARDS[name](**options)
    except TypeError as error:
        raise ValueError(f"reward {name!r}: {error}") from None


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One reward of a run: the function, its weight and its name in the
    metrics (`reward_<name>`)."""

    function: object
    weight: float = 1.0
    name: str = ""


def reward_name(function):
    """The name a reward function reports under (its `__name__`)."""
    return getattr(function, "__name__", None) or type(function).__name__


def _as_specs(rewards, weights):
    if callable(rewards) or isinstance(rewards, RewardSpec):
        rewards = [rewards]
    rewards = list(rewards)
    if not rewards:
        raise ValueError("rewards: give at least one reward function")
    if weights is not None and len(weights) != len(rewards):
        raise ValueError(f"reward_weights has {len(weights)} values for "
                         f"{len(rewards)} rewards")
    specs, seen = [], set()
    for i, reward in enumerate(rewards):
        if not isinstance(reward, RewardSpec):
            if not callable(reward):
                raise ValueError(f"A reward is a callable reward(prompts, "
                                 f"completions, **columns). Received: {reward!r}")
            reward = RewardSpec(reward, 1.0 if weights is None else weights[i])
        name = reward.name or reward_name(reward.function)
        while name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        specs.append(dataclasses.replace(reward, name=name,
                                         weight=float(reward.weight)))
    return specs


def _check_scores(name, scores, count):
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise RewardError(f"reward {name!r} returned {type(scores).__name__} "
                          "with a value that is not a number; a reward returns "
                          "one float per completion") from None
    if len(values) != count:
        raise RewardError(f"reward {name!r} returned {len(values)} values for "
                          f"{count} completions; a reward returns one float "
                          "per completion")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise RewardError(f"reward {name!r} returned a non-finite value "
                          f"({values[bad[0]]}) for completion {bad[0]}")
    return values


def score_rewards(rewards, prompts, completions, columns=None, weights=None):
    """Calls every reward and weighs them.

    Args:
        rewards: a reward function, a list of them, or `RewardSpec`s.
        prompts: `N` prompt strings (one per completion).
        completions: `N` completion strings.
        columns: `{column: N values}`, passed as keyword arguments.
        weights: one weight per reward (default 1 each; a `RewardSpec`
            carries its own).

    Returns:
        `(total, per_reward)`: float32 arrays `(N,)` (the weighted sum) and
        `{name: (N,)}`.

    Raises:
        RewardError: naming the reward that raised, returned the wrong
            number of values, a non-number or a NaN.
    """
    specs = _as_specs(rewards, weights)
    columns = dict(columns or {})
    per_reward = {}
    for spec in specs:
        try:
            scores = spec.function(list(prompts), list(completions), **columns)
        except RewardError:
            raise
        except Exception as error:  # noqa: BLE001 - any user error, named
            raise RewardError(f"reward {spec.name!r} raised "
                              f"{type(error).__name__}: {error}") from error
        per_reward[spec.name] = np.asarray(
            _check_scores(spec.name, scores, len(completions)), "float32")
    total = sum(spec.weight * per_reward[spec.name] for spec in specs)
    return np.asarray(total, "float32"), per_reward
