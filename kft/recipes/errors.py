"""The recipe error (CLI exit code 2)."""

from kft.utils.validation import format_validation_error

__all__ = ["RecipeError", "format_validation_error"]


class RecipeError(ValueError):
    """A recipe is invalid or cannot be found (CLI exit code 2)."""
