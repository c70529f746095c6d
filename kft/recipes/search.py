"""A recipe's search space: the `search:` section `kft tune` reads.

Plain data, free of Keras and Optuna, so that `kft validate` checks a
space without starting TensorFlow. `Distribution` is one searched key
(`{loguniform: [low, high]}`, `{uniform: [low, high]}`, `{int: [low,
high]}`, `{choice: [values...]}`); `check_search_space` checks every
dotted key against the resolved recipe (with "did you mean") and the
recipe with each end of its range, before any training; `trial_recipe`
is the recipe a trial runs: the resolved recipe with the trial's values
set at their dotted keys.
"""

import copy
import difflib
from typing import Literal

import pydantic

from kft.utils.validation import Strict
from kft.utils.validation import format_validation_error

__all__ = ["DISTRIBUTIONS", "Distribution", "check_search_space", "set_key_path",
           "trial_recipe"]

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
# What `choice:` may hold: values Optuna stores as they are.
Scalar = bool | int | float | str | None


class Distribution(Strict):
    """One searched recipe key, written `{KIND: [values]}` in YAML.

    `loguniform: [low, high]` (a rate: 0 < low < high, sampled on a log
    scale), `uniform: [low, high]` (low < high), `int: [low, high]`
    (integers, both ends included) or `choice: [values...]` (at least
    one scalar: a number, a string, true / false or null).
    """

    kind: Literal["loguniform", "uniform", "int", "choice"]
    values: list[Scalar]

    @pydantic.model_validator(mode="before")
    @classmethod
    def _from_mapping(cls, value):
        if not isinstance(value, dict) or set(value) == {"kind", "values"}:
            return value
        if len(value) != 1:
            raise ValueError(f"give one distribution: one of "
                             f"{', '.join(DISTRIBUTIONS)}, e.g. "
                             "{loguniform: [1.0e-5, 1.0e-2]}")
        (kind, values), = value.items()
        if kind not in DISTRIBUTIONS:
            hint = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
            raise ValueError(f"unknown distribution {kind!r}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; allowed: {', '.join(DISTRIBUTIONS)}")
        if not isinstance(values, list):
            raise ValueError(f"{kind} takes a list, e.g. {{{kind}: "
                             f"{'[a, b, c]' if kind == 'choice' else '[low, high]'}}}")
        if any(isinstance(v, (list, dict)) for v in values):
            raise ValueError(f"{kind} takes scalars (numbers, strings, "
                             "true / false, null), not lists or mappings")
        return {"kind": kind, "values": values}

    @pydantic.model_validator(mode="after")
    def _check_range(self):
        kind, values = self.kind, self.values
        if kind == "choice":
            if not values:
                raise ValueError("choice needs at least one value")
            return self
        numbers = [v for v in values
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(values) != 2 or len(numbers) != 2:
            raise ValueError(f"{kind} takes [low, high], two numbers")
        low, high = values
        if kind == "int" and not all(isinstance(v, int) for v in values):
            raise ValueError("int takes two integers [low, high]")
        if kind == "loguniform" and low <= 0:
            raise ValueError("loguniform needs low > 0 (a log scale)")
        if low >= high:
            raise ValueError(f"{kind} needs low < high")
        return self

    @pydantic.model_serializer
    def _as_mapping(self):
        return {self.kind: list(self.values)}

    @property
    def ends(self):
        """The values a recipe must accept: both ends, or every choice."""
        return list(self.values)


def _find(data, key):
    """`(parent, last)` of a dotted key in plain data, or `(None, problem)`."""
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the recipe"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return None, (f"{where} is a list of {len(node)} item(s); "
                              f"{part!r} is not one of its indexes "
                              f"(0-{len(node) - 1})")
            part = int(part)
        elif isinstance(node, dict):
            if part not in node:
                hint = difflib.get_close_matches(part, [str(k) for k in node], n=1)
                return None, ("unknown key" + (f" (did you mean "
                              f"'{'.'.join([*parts[:depth], hint[0]])}'?)"
                              if hint else f" {part!r} in {where}"))
        elif node is None:
            return None, (f"{where} is not set in this recipe (null); give "
                          f"the recipe a {where}: section to search {key}")
        else:
            return None, f"{where} is {node!r}, not a section with keys"
        if depth == len(parts) - 1:
            return node, part
        node = node[part]
    return None, "empty key"


def set_key_path(data, key, value):
    """Sets a dotted key (`stages.1.learning_rate`) that exists in `data`."""
    parent, last = _find(data, key)
    if parent is None:
        raise KeyError(f"{key}: {last}")
    parent[last] = value


def trial_recipe(base, params):
    """`base` (from `trial_base`) with `params` (dotted key -> value) set."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_key_path(data, key, value)
    return data


def check_search_space(base, space, recipe_class):
    """The problems of a search space, one line each (empty: none).

    Args:
        base: the resolved recipe a trial starts from (`trial_base`).
        space: `config.search.space`: dotted key -> `Distribution`.
        recipe_class: the recipe schema each end must validate against.

    Each key must name a value of the resolved recipe (list items by
    index: `stages.1.learning_rate`); an integer key takes `int` or
    `choice`; the recipe must stay valid with each end of the range.
    """
    problems = []
    for key, distribution in space.items():
        parent, last = _find(base, key)
        if parent is None:
            problems.append(f"search.space.{key}: {last}")
            continue
        current = parent[last]
        if (isinstance(current, int) and not isinstance(current, bool)
                and distribution.kind in ("uniform", "loguniform")):
            problems.append(f"search.space.{key}: an integer key ({current}); "
                            f"search it with int: [low, high] or choice:, "
                            f"not {distribution.kind}")
            continue
        for value in distribution.ends:
            try:
                recipe_class.model_validate(trial_recipe(base, {key: value}))
            except pydantic.ValidationError as error:
                reason = format_validation_error(error, model=recipe_class)
                reason = reason.split("\n", 1)[-1].strip().split("\n")[0]
                problems.append(f"search.space.{key}: the recipe is invalid "
                                f"with {value!r} ({reason})")
                break
    return problems
