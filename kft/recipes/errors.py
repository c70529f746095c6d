"""Readable errors for recipes: key path, value received, what is allowed."""

import difflib
import typing

__all__ = ["RecipeError", "format_validation_error", "known_keys"]

_KNOWN_KEYS = set()


class RecipeError(ValueError):
    """A recipe is invalid or cannot be found (CLI exit code 2)."""


def _nested_models(annotation):
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _nested_models(arg)


def known_keys(*models):
    """Registers the field names of pydantic models, and of the models in
    their fields, for "did you mean"."""
    for model in models:
        _KNOWN_KEYS.update(model.model_fields)
        for field in model.model_fields.values():
            for nested in _nested_models(field.annotation):
                if not set(nested.model_fields) <= _KNOWN_KEYS:
                    known_keys(nested)


def _path(loc, prefix):
    parts = [prefix] if prefix else []
    for item in loc:
        # pydantic adds the union member tried as a path element
        # ("function-after[...]", "LastNBlocks", "literal['head']").
        if isinstance(item, str) and (
            "[" in item or item[:1].isupper() or item in ("str", "int", "float", "bool")
        ):
            continue
        parts.append(str(item))
    return ".".join(parts) or "<recipe>"


def format_validation_error(error, prefix=""):
    """Turns a `pydantic.ValidationError` into one line per problem.

    Each line names the key path, the value received and what is allowed,
    with a "did you mean" for misspelt keys.
    """
    lines = []
    seen = set()
    for item in error.errors():
        path = _path(item["loc"], prefix)
        if item["type"] == "extra_forbidden":
            key = str(item["loc"][-1])
            hint = difflib.get_close_matches(key, sorted(_KNOWN_KEYS), n=1)
            line = f"{path}: unknown key"
            if hint:
                line += f" (did you mean '{hint[0]}'?)"
        else:
            value = item.get("input")
            message = item["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, "):]
            if item["loc"]:
                line = f"{path}: {message}; received {value!r}"
            else:
                line = f"{path}: {message}"
        if (path, line) in seen:
            continue
        seen.add((path, line))
        lines.append(line)
    # A union reports one error per member; keep the first few.
    if len(lines) > 6:
        lines = lines[:6] + [f"... and {len(lines) - 6} more"]
    return "Invalid recipe:\n  " + "\n  ".join(lines)
