"""Kinds of run (tasks): each says how its recipes build data and model,
evaluate, generate, export and compare methods.

Built in, in the order they claim a recipe that names no `task:`:
`causal_lm_sft` (`model.causal_lm`), `audio_classification`
(`model.audio`), `text_classification` (`model.text`),
`image_classification` (`model.backbone` / `model.preset`) and
`causal_lm_preference` (`model.causal_lm` with `preference:`, which
`causal_lm_sft` leaves to it). Add a kind with a `Task` subclass and
`register_task`. The built-ins live in `classification.py`,
`causal_lm.py` and `preference.py` beside this file, imported on first
use (so `kft validate` never loads Keras).
"""

from kft.recipes.tasks.base import Task
from kft.recipes.tasks.base import get_task
from kft.recipes.tasks.base import register_task
from kft.recipes.tasks.base import registered_tasks
from kft.recipes.tasks.base import task_for
from kft.recipes.tasks.base import unregister_task

__all__ = ["Task", "get_task", "register_task", "registered_tasks", "task_for",
           "unregister_task"]
