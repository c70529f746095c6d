"""Validation errors that name the key, the value and what is allowed.

Shared by the library (`kft.fine_tune` stages) and the recipes (YAML): a
pydantic error becomes one line per problem, with "did you mean" drawn
only from the keys valid where the typo is (a misspelt stage key is
matched against stage keys, never against `data:` keys).
"""

import difflib
import typing

import pydantic

__all__ = ["Strict", "check_one_of", "format_validation_error"]


class Strict(pydantic.BaseModel):
    """A config section: unknown keys are errors, not silently ignored."""

    model_config = pydantic.ConfigDict(extra="forbid",
                                       arbitrary_types_allowed=True)


def _models_in(annotation):
    """The pydantic models an annotation holds (`X | None`, `list[X]`...)."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def _models_at(root, loc):
    """The models that can stand at `loc` under `root`."""
    models = [root]
    for item in loc:
        if not isinstance(item, str):
            continue  # a list index: same models
        nested = [m for model in models if item in model.model_fields
                  for m in _models_in(model.model_fields[item].annotation)]
        if nested:
            models = nested
        # Otherwise a union member pydantic names in the path, or a key of
        # a plain dict: the models stay.
    return models


def _is_union_tag(item):
    # pydantic adds the union member tried as a path element
    # ("function-after[...]", "LastNBlocks", "literal['head']").
    return isinstance(item, str) and (
        "[" in item or item[:1].isupper() or item in ("str", "int", "float", "bool"))


def _path(loc, prefix):
    parts = [prefix] if prefix else []
    parts += [str(item) for item in loc if not _is_union_tag(item)]
    return ".".join(parts) or "<recipe>"


def _unknown_key_line(path, loc, model):
    key = str(loc[-1])
    line = f"{path}: unknown key"
    if model is None:
        return line
    allowed = sorted({name for m in _models_at(model, loc[:-1])
                      for name in m.model_fields})
    hint = difflib.get_close_matches(key, allowed, n=1)
    if hint:
        return line + f" (did you mean '{hint[0]}'?)"
    return line + (f"; allowed: {', '.join(allowed)}" if allowed else "")


def format_validation_error(error, prefix="", model=None, title="Invalid recipe"):
    """Turns a `pydantic.ValidationError` into one line per problem.

    Args:
        error: the `pydantic.ValidationError`.
        prefix: key path of the validated value (e.g. `"stages.0"`).
        model: the pydantic model class that was validated; it scopes the
            "did you mean" hints to the keys valid at the typo's place.
        title: the first line.

    Returns:
        `"<title>:\\n  <key.path>: <problem>; received <value>"`, one line
        per problem (at most six, then a count).
    """
    lines = []
    for item in error.errors():
        path = _path(item["loc"], prefix)
        if item["type"] == "extra_forbidden":
            line = _unknown_key_line(path, item["loc"], model)
        else:
            message = item["msg"].removeprefix("Value error, ")
            line = f"{path}: {message}"
            if item["loc"]:
                line += f"; received {item.get('input')!r}"
        if line not in lines:
            lines.append(line)
    # A union reports one error per member; keep the first few.
    if len(lines) > 6:
        lines = lines[:6] + [f"... and {len(lines) - 6} more"]
    return f"{title}:\n  " + "\n  ".join(lines)


def check_one_of(name, value, allowed):
    """Raises `ValueError("<name> must be one of <allowed>. Received:
    <name>=<value>")` unless `value` is in `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}. Received: "
                         f"{name}={value!r}")
