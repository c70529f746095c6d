"""Finding, reading and overriding recipes."""

import copy
import hashlib
import json
import os

import pydantic
import yaml

from kft.recipes.errors import RecipeError
from kft.recipes.errors import format_validation_error
from kft.recipes.schema import RecipeConfig
from kft.recipes.search import check_search_space
from kft.recipes.tasks.base import get_task
from kft.recipes.tasks.base import registered_tasks

__all__ = [
    "PACKAGED_DIR",
    "apply_overrides",
    "config_hash",
    "list_recipes",
    "load_recipe",
    "recipe_description",
    "resolve_recipe_path",
    "resolved",
    "trial_base",
]

PACKAGED_DIR = os.path.join(os.path.dirname(__file__), "packaged")


def list_recipes():
    """Names of the packaged recipes, sorted."""
    return sorted(
        f[: -len(".yaml")] for f in os.listdir(PACKAGED_DIR) if f.endswith(".yaml")
    )


def resolve_recipe_path(name_or_path):
    """A packaged recipe name or a path -> the YAML file's path."""
    if os.path.isfile(name_or_path):
        return name_or_path
    packaged = os.path.join(PACKAGED_DIR, f"{name_or_path}.yaml")
    if os.path.isfile(packaged):
        return packaged
    raise RecipeError(
        f"No recipe {name_or_path!r}: not a file, and not a packaged recipe "
        f"({', '.join(list_recipes())})."
    )


def _read_yaml(path):
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path}: a recipe is a YAML mapping (model:, data:, stages:). "
            f"Received: {type(raw).__name__}"
        )
    return raw


def recipe_description(name):
    """The `description` of a packaged recipe (one line)."""
    raw = _read_yaml(resolve_recipe_path(name))
    return " ".join(str(raw.get("description", "")).split())


def apply_overrides(raw, overrides):
    """Applies `key.path=value` overrides (values parsed as YAML scalars).

    List items are addressed by index: `stages.1.epochs=3`.
    """
    raw = copy.deepcopy(raw)
    for override in overrides or ():
        if "=" not in override:
            raise RecipeError(
                f"--set {override!r}: expected key.path=value, e.g. "
                "stages.0.epochs=2"
            )
        key, value = override.split("=", 1)
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise RecipeError(f"--set {override!r}: value is not valid YAML") from None
        parts = key.strip().split(".")
        node = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(
                        f"--set {override!r}: {where} is not an index of a list "
                        f"of {len(node)} item(s)"
                    )
                part = int(part)
            elif not isinstance(node, dict):
                raise RecipeError(
                    f"--set {override!r}: {'.'.join(parts[:depth])} is not a mapping"
                )
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and part not in node:
                    node[part] = {}
                node = node[part]
    return raw


def load_recipe(name_or_path, overrides=None):
    """Reads, overrides and validates a recipe.

    Args:
        name_or_path: a packaged recipe name (`kft list`) or a YAML path.
        overrides: `["key.path=value", ...]`.

    Returns:
        A validated `RecipeConfig`.

    Raises:
        RecipeError: with one line per problem, naming the key.
    """
    path = resolve_recipe_path(name_or_path)
    raw = apply_overrides(_read_yaml(path), overrides)
    try:
        config = RecipeConfig.model_validate(raw)
    except pydantic.ValidationError as error:
        raise RecipeError(
            f"{path}: " + format_validation_error(error, model=RecipeConfig)
        ) from None
    if config.task is not None and config.task not in registered_tasks():
        get_task(config.task)  # the RecipeError naming the registered tasks
    if config.search is not None:
        problems = check_search_space(trial_base(config), config.search.space,
                                      RecipeConfig)
        if problems:
            raise RecipeError(f"{path}: Invalid recipe:\n  " + "\n  ".join(problems))
    return config


_PYTHON_ONLY = {"stages": {"__all__": {"callbacks", "loss", "metrics"}}}


def resolved(config):
    """The recipe with every default filled in, as plain data (without
    `task:` when the model section picks the task, without an empty
    `search:` and without `model.remat: false`: recipes from before those
    keys existed keep their hash)."""
    data = config.model_dump(mode="json", exclude=_PYTHON_ONLY)
    for key in ("task", "search", "preference"):  # empty preference: too
        if data.get(key) is None:
            data.pop(key, None)
    if not data["model"].get("remat"):  # likewise `model.remat: false`
        data["model"].pop("remat", None)
    return data


def config_hash(config):
    """sha256 of the resolved recipe (what the run really used)."""
    text = json.dumps(resolved(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def trial_base(config):
    """The resolved recipe a trial starts from: no `search:`, and stages
    already expanded from any `policy:`."""
    data = resolved(config)
    data.pop("search", None)
    data["policy"] = None
    return data
