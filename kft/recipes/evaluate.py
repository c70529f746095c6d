"""`kft eval` and `kft export`: use a finished run directory."""

import json
import os

import yaml

from kft.recipes.errors import RecipeError
from kft.recipes.schema import RecipeConfig
from kft.recipes.tasks import task_for

__all__ = ["evaluate_run", "export_run", "generate_run", "load_run"]


def _run_config(run_dir):
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(config_path):
        raise RecipeError(f"{run_dir!r} is not a kft run (no config.yaml).")
    try:  # safe_load: plain data, a `!!python/...` tag is refused
        with open(config_path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as error:
        raise RecipeError(f"{config_path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{config_path}: a run's config.yaml is a YAML "
                          f"mapping. Received: {type(raw).__name__}")
    raw.pop("recipe_hash", None)
    return RecipeConfig.model_validate(raw)


def load_run(run_dir):
    """`(config, model)` of a finished run."""
    config = _run_config(run_dir)
    return config, task_for(config).load_run(run_dir, config)


def generate_run(run_dir, prompts, max_length=64):
    """Greedy completions of `prompts` by a finished causal-LM run."""
    config, model = load_run(run_dir)
    return task_for(config).generate(config, model, prompts, max_length)


def evaluate_run(run_dir, data_path=None):
    """Evaluates a run's model; writes `eval.json` and the confusion matrix.

    Args:
        run_dir: a finished run directory.
        data_path: an `.npz` or image folder (a `.csv` / `.tsv` / `.jsonl`
            for text runs, SFT records for causal-LM runs, a folder of
            `.wav` class folders for audio runs); default: the run's own
            validation data, rebuilt from its `config.yaml`.

    Returns:
        The metrics dict (also in `RUN_DIR/eval.json`), with `per_class`
        precision / recall / F1 and `confusion_matrix` for classifiers;
        completion loss, perplexity and token accuracy for causal LMs.
    """
    config, model = load_run(run_dir)
    os.makedirs(os.path.join(run_dir, "plots"), exist_ok=True)
    result = task_for(config).evaluate_run(run_dir, config, model, data_path)
    result["data"] = data_path or "recipe validation data"
    result["path"] = os.path.join(run_dir, "eval.json")
    with open(result["path"], "w") as f:
        json.dump(result, f, indent=2)
    return result


def export_run(run_dir, format=None, merge=False, output=None):
    """Writes the run's model as its task says: a `.keras` file (the
    default) or a TF SavedModel; a causal-LM run's, adapters merged, as a
    Hugging Face checkpoint or Keras weights
    (`kft.recipes.causal.export_causal_run`)."""
    config, model = load_run(run_dir)
    return task_for(config).export_run(run_dir, config, model, format=format,
                                       merge=merge, output=output)
