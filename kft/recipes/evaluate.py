"""`kft eval` and `kft export`: use a finished run directory."""

import json
import os

import keras
import yaml

import kft.data as kft_data
from kft.heads import head_kind
from kft.heads import loss_and_metrics
from kft.heads import outputs_logits
from kft.lora import load_adapter
from kft.lora import lora_layers
from kft.lora import merge_lora
from kft.prompt_causal import load_prompt
from kft.recipes.audio import audio_data_from_path
from kft.recipes.builders import build_data
from kft.recipes.builders import build_model
from kft.recipes.builders import evaluate
from kft.recipes.builders import generate_samples
from kft.recipes.builders import input_shape_of
from kft.recipes.builders import load_arrays
from kft.recipes.causal import evaluate_causal_run
from kft.recipes.causal import export_causal_run
from kft.recipes.errors import RecipeError
from kft.recipes.schema import GenerateConfig
from kft.recipes.schema import RecipeConfig

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
    if config.model.causal_lm is not None:
        return config, _load_causal_lm_run(run_dir, config)
    model_path = os.path.join(run_dir, "model.keras")
    if not os.path.exists(model_path):
        raise RecipeError(
            f"{run_dir!r} is not a finished kft run (no model.keras).")
    # safe_mode: a Lambda's bytecode or an arbitrary callable in the file's
    # config is refused, never run (Keras' default, stated on purpose).
    return config, keras.saving.load_model(model_path, safe_mode=True)


def _load_causal_lm_run(run_dir, config):
    """The run's `SFTCausalLM`: the base rebuilt from its recipe, then the
    adapters (`adapter.npz`), the virtual tokens (`prompt.npz`, in a
    `PromptTunedCausalLM`) or the trained weights (`model.weights.h5`)."""
    name = ("adapter.npz" if config.lora else "prompt.npz"
            if config.prompt_tuning else "model.weights.h5")
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        raise RecipeError(f"{run_dir!r} is not a finished causal-LM run (no "
                          f"{name}).")
    model = build_model(config, 0, ())
    if config.lora:
        load_adapter(model.lm, path)
    elif config.prompt_tuning:
        load_prompt(model, path)
    else:
        model.lm.load_weights(path)
    return model


def generate_run(run_dir, prompts, max_length=64):
    """Greedy completions of `prompts` by a finished causal-LM run."""
    config, model = load_run(run_dir)
    if config.model.causal_lm is None:
        raise RecipeError(f"kft generate: {run_dir!r} is not a causal-LM run "
                          "(model.causal_lm).")
    generate = GenerateConfig(prompts=list(prompts), max_length=max_length)
    # A prompt-tuned run completes through its virtual tokens.
    return generate_samples(model if config.prompt_tuning else model.lm,
                            generate)


def _text_data_from_path(path, config):
    if not os.path.isfile(path):
        raise RecipeError(f"--data: no such file {path!r}")
    try:
        texts, labels, names = kft_data.load_text_file(
            path, config.data.text_column, config.data.label_column)
    except ValueError as error:
        raise RecipeError(f"--data: {error}") from None
    bundle = kft_data.from_texts(texts, labels, batch_size=config.data.batch_size,
                                 validation_split=0.0, shuffle=False,
                                 class_names=names)
    return kft_data.DataBundle(None, bundle.train, bundle.class_names, ())


def _data_from_path(path, input_shape, batch_size):
    if os.path.isdir(path):
        return kft_data.from_image_folder(
            path, image_size=input_shape[:2], channels=input_shape[2],
            batch_size=batch_size, validation_split=0.0)
    if not os.path.isfile(path):
        raise RecipeError(f"--data: no such file or folder {path!r}")
    x, y, x_val, y_val, names = load_arrays(path, "--data")
    if x_val is not None:
        x, y = x_val, y_val
    bundle = kft_data.from_numpy(
        x, y, batch_size=batch_size, shuffle=False, image_size=input_shape[:2],
        channels=input_shape[2], class_names=names,
        num_classes=len(names) if names else None)
    return kft_data.DataBundle(None, bundle.train, bundle.class_names,
                               bundle.input_shape)


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
    if config.model.causal_lm is not None:
        return evaluate_causal_run(run_dir, config, model, data_path)
    text = config.model.text is not None
    input_shape = () if text else tuple(model.input_shape[1:])
    if text:
        # keras-hub models come back compiled with their own defaults.
        loss, metrics = loss_and_metrics(head_kind(model),
                                         from_logits=outputs_logits(model))
        model.compile(loss=loss, metrics=metrics)
    audio = config.model.audio is not None
    if audio:  # the model takes any length: the recipe's clip length
        input_shape = input_shape_of(config)
    if data_path and text:
        bundle = _text_data_from_path(data_path, config)
    elif data_path and audio:
        bundle = audio_data_from_path(data_path, input_shape[0],
                                      config.model.sample_rate,
                                      config.data.batch_size)
    elif data_path:
        bundle = _data_from_path(data_path, input_shape, config.data.batch_size)
    else:
        bundle = build_data(config.data, input_shape, config.model.sample_rate)
    data = bundle.val if bundle.val is not None else bundle.train
    os.makedirs(os.path.join(run_dir, "plots"), exist_ok=True)
    result = evaluate(model, data, bundle.class_names, run_dir, prefix="eval_")
    result["data"] = data_path or "recipe validation data"
    result["path"] = os.path.join(run_dir, "eval.json")
    with open(result["path"], "w") as f:
        json.dump(result, f, indent=2)
    return result


def export_run(run_dir, format=None, merge=False, output=None):
    """Writes the run's model as a `.keras` file (the default) or a TF
    SavedModel; a causal-LM run's, adapters merged, as a Hugging Face
    checkpoint or Keras weights (`kft.recipes.causal.export_causal_run`)."""
    config, model = load_run(run_dir)
    if config.model.causal_lm is not None:
        return export_causal_run(config, model, output or os.path.join(
            run_dir, "export"), format)
    format = format or "keras"
    if merge:
        if not lora_layers(model):
            raise RecipeError(
                "--merge-lora: this model has no LoRA adapters to merge.")
        merge_lora(model)
    output = output or os.path.join(run_dir, "export")
    os.makedirs(output, exist_ok=True)
    if format == "keras":
        path = os.path.join(output, "model.keras")
        model.save(path)
        return path
    if format == "saved_model":
        path = os.path.join(output, "saved_model")
        model.export(path, format="tf_saved_model", verbose=False)
        return path
    raise RecipeError(
        f"--format must be 'keras' or 'saved_model'. Received: {format!r}")
