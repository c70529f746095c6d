"""`kft plan RECIPE`: a causal-LM recipe's memory, before it runs.

Reads the recipe (and its `--set` overrides), the model's shape from its
`config.json` (or `kft.memory_plan.KNOWN_SHAPES`, e.g. `smollm2` before
`kft convert`), and asks `kft.plan_memory` with the recipe's settings:
`lora:` plans LoRA (QLoRA with `model.quantize`), `prompt_tuning:` a frozen
base (adapters of rank 0: the virtual tokens are a few kilobytes), neither
full fine-tuning; `model.sequence_length`, `data.batch_size`,
`precision`, `model.remat` and the first stage's optimizer.
"""

from kft.models.causal_lm import resolve_causal_lm_preset
from kft.recipes.errors import RecipeError
from kft.recipes.loader import load_recipe
from kft.training.memory_plan import KNOWN_SHAPES
from kft.training.memory_plan import LORA_TARGETS
from kft.training.memory_plan import OPTIMIZER_SLOTS
from kft.training.memory_plan import model_shape
from kft.training.memory_plan import plan_memory

__all__ = ["plan_recipe", "recipe_plan_arguments"]


def recipe_plan_arguments(config):
    """The `plan_memory` keyword arguments a validated recipe stands for."""
    model = config.model
    kwargs = dict(sequence_length=model.sequence_length,
                  batch_size=config.data.batch_size, remat=model.remat,
                  dtype=config.precision, method="full")
    if config.lora is not None:
        targets = config.lora.targets
        kwargs.update(
            method="qlora" if model.quantize else "lora",
            quantize=model.quantize, lora_rank=config.lora.rank,
            # Custom target lists: all seven projections, an upper bound.
            lora_targets=targets if targets in LORA_TARGETS else "all-linear")
    elif config.prompt_tuning is not None:
        kwargs.update(method="lora", lora_rank=0)
    optimizer = config.stages[0].optimizer if config.stages else "adamw"
    if isinstance(optimizer, str) and optimizer in OPTIMIZER_SLOTS:
        kwargs["optimizer"] = optimizer
    return kwargs


def plan_recipe(name_or_path, overrides=None):
    """The `MemoryPlan` of a causal-LM recipe.

    Args:
        name_or_path: a packaged recipe name or a YAML path.
        overrides: `["key.path=value", ...]`, as `kft run --set`.

    Returns:
        A `kft.memory_plan.MemoryPlan`.

    Raises:
        RecipeError: not a causal-LM recipe, or no model config to read.
    """
    config = load_recipe(name_or_path, overrides)
    name = config.model.causal_lm
    if name is None:
        raise RecipeError("kft plan is for causal-LM recipes (model.causal_lm); "
                          f"{config.name!r} trains another kind of model.")
    try:
        shape = model_shape(name if name in KNOWN_SHAPES
                            else resolve_causal_lm_preset(name))
    except (ValueError, FileNotFoundError) as error:
        raise RecipeError(f"model.causal_lm: {error}") from None
    return plan_memory(shape, **recipe_plan_arguments(config))
