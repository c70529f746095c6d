"""Recipes: validated YAML configs and the runner that executes them."""

from kft.recipes.errors import RecipeError
from kft.recipes.loader import list_recipes
from kft.recipes.loader import load_recipe
from kft.recipes.loader import resolve_recipe_path
from kft.recipes.schema import RecipeConfig

__all__ = [
    "RecipeConfig",
    "RecipeError",
    "list_recipes",
    "load_recipe",
    "resolve_recipe_path",
]
