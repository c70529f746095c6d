"""Recipes: validated YAML configs and the runner that executes them."""

from kft.recipes.errors import RecipeError
from kft.recipes.loader import list_recipes
from kft.recipes.loader import load_recipe
from kft.recipes.loader import resolve_recipe_path
from kft.recipes.schema import RecipeConfig
from kft.recipes.tasks import Task
from kft.recipes.tasks import register_task
from kft.recipes.tasks import registered_tasks
from kft.recipes.tasks import unregister_task

__all__ = [
    "RecipeConfig",
    "RecipeError",
    "Task",
    "list_recipes",
    "load_recipe",
    "register_task",
    "registered_tasks",
    "resolve_recipe_path",
    "unregister_task",
]
