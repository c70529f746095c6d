"""Causal-LM runs beyond training: prompt files, `kft compare` methods,
`kft eval` and `kft export`.

A causal-LM recipe (`model.causal_lm`) trains one of four ways: every
weight (`full`), LoRA adapters (`lora:`), LoRA over a quantized base
(`lora:` + `model.quantize`, QLoRA) or virtual tokens (`prompt_tuning:`).
This module holds what the runner, `kft compare`, `kft eval` and `kft
export` need to know about those four, so that their shared code keeps one
branch each.
"""

import json
import math
import os
import shutil
import tempfile

from kft._keras_internals import all_layers
from kft.lora.base import lora_layers
from kft.lora.model import merge_lora
from kft.prompt.causal_lm import PromptTunedCausalLM
from kft.prompt.causal_lm import save_prompt
from kft.recipes.builders import evaluate_sft
from kft.recipes.builders import sft_data
from kft.recipes.errors import RecipeError

__all__ = ["CAUSAL_METHODS", "causal_method_changes", "causal_stored",
           "evaluate_causal_run", "export_causal_run", "variable_bytes",
           "write_prompt"]

PROMPT_FILE = "prompt.npz"
EXPORT_INFO = "kft_export.json"

# `kft compare` on a causal LM: method -> (learning rate, description).
# The rates are those of benchmarks/sft.py, where each method's held-out
# NLL visibly drops within 12 steps on SmolLM2-135M.
CAUSAL_METHODS = {
    "full": (2e-5, "every weight trains at one small rate"),
    "lora": (2e-4, "LoRA rank 8 on every linear layer (all-linear)"),
    "qlora": (2e-4, "LoRA rank 8 (all-linear) over the base quantized to "
                    "int4 (model.quantize: int4)"),
    "prompt": (3e-2, "20 virtual tokens before every prompt; the LM frozen "
                     "(unpacked data)"),
}
_NO_HEAD = ("a causal LM has no separate head: its output layer is the "
            "(often tied) token embedding")
_SKIP_REASONS = {
    "head": _NO_HEAD,
    "gradual": _NO_HEAD + ", so there is nothing to train first",
    "discriminative": "per-layer rates are not a causal-LM compare method",
}


def write_prompt(model, run_dir):
    """Writes a prompt-tuned run's virtual tokens (`prompt.npz`) and
    describes the file for `metrics.json`."""
    path = save_prompt(model, os.path.join(run_dir, PROMPT_FILE))
    return {"file": PROMPT_FILE, "bytes": os.path.getsize(path),
            "num_virtual_tokens": model.num_virtual_tokens}


def variable_bytes(model):
    """Bytes of every variable of `model` (int8 / int4 kernels count as
    stored, with their scales)."""
    return int(sum(math.prod(v.shape) * _itemsize(v.dtype)
                   for v in model.weights))


def _itemsize(dtype):
    import numpy as np

    name = str(getattr(dtype, "name", dtype))
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


# === kft compare ===


def causal_method_changes(method, epochs, base):
    """The recipe changes a `kft compare` method stands for on a causal LM.

    Every method keeps the recipe's first stage (its optimizer, schedule,
    `steps_per_epoch` ...) with the method's learning rate, `epochs` and
    what trains.

    Args:
        method: a `kft compare` method name.
        epochs: the epoch budget.
        base: the recipe, resolved to plain data.

    Returns:
        `(changes, reason)`: the top-level recipe keys to set, or `None` and
        why the method does not apply.
    """
    if method not in CAUSAL_METHODS:
        reason = _SKIP_REASONS.get(method, "not a causal-LM method")
        return None, (f"{reason}; causal-LM methods: "
                      f"{', '.join(CAUSAL_METHODS)}")
    stage = {**base["stages"][0], "name": method, "epochs": epochs,
             "learning_rate": CAUSAL_METHODS[method][0],
             "trainable": "all" if method == "full" else "keep"}
    for key in ("unfreeze", "layer_decay", "lora_lr_ratio", "lr_find"):
        stage.pop(key, None)  # another method's settings
    model = {**base["model"], "quantize": "int4" if method == "qlora" else None}
    data = dict(base["data"])
    if method == "prompt":
        data["packing"] = False  # virtual tokens need unpacked rows
    lora = ({"targets": "all-linear", "rank": 8, "alpha": 16}
            if method in ("lora", "qlora") else None)
    prompt = {"num_virtual_tokens": 20} if method == "prompt" else None
    return {"stages": [stage], "policy": None, "model": model, "data": data,
            "lora": lora, "prompt_tuning": prompt}, None


def causal_stored(metrics, run_dir):
    """`(bytes, what)` a causal-LM run must keep besides its base."""
    if "prompt" in metrics:
        return metrics["prompt"]["bytes"], PROMPT_FILE
    if "adapter" in metrics:
        return metrics["adapter"]["bytes"], "adapter.npz"
    return (os.path.getsize(os.path.join(run_dir, "model.weights.h5")),
            "model.weights.h5")


# === kft eval ===


def evaluate_causal_run(run_dir, config, model, data_path=None):
    """Held-out completion loss, perplexity and token accuracy of a causal-LM
    run (rebuilt by `kft.recipes.evaluate.load_run`); `kft eval` writes
    them to `eval.json`.

    Args:
        run_dir: the run directory.
        config: its `RecipeConfig`.
        model: its `SFTCausalLM` (or `PromptTunedCausalLM`), adapters,
            prompt or weights loaded.
        data_path: SFT records (`.jsonl` / `.json` / `.csv` / `.tsv`, in the
            recipe's `data.format`), all evaluated; default the run's own
            held-out split, rebuilt from its recipe.

    Returns:
        The metrics dict.
    """
    from kft.data.sft import sft_dataset

    if data_path:
        data_config = config.data
        try:
            data = sft_dataset(data_path, model.lm, format=data_config.format,
                               batch_size=data_config.batch_size,
                               packing=data_config.packing, shuffle=False,
                               truncation=data_config.truncation)
        except (OSError, ValueError) as error:
            raise RecipeError(f"--data: {error}") from None
    else:
        bundle = sft_data(config, model.lm)
        data = bundle.val if bundle.val is not None else bundle.train
    model.compile()  # the SFT loss: mean NLL over completion tokens
    return evaluate_sft(model, data)  # kft eval writes eval.json


# === kft export ===


def export_causal_run(config, model, output, format=None):
    """Writes a causal-LM run's model with its adapters merged.

    A float base whose family keras-hub can export (`export_to_transformers`:
    Llama 3, Mistral, Qwen, Gemma, GPT-2 ... in keras-hub 0.32) becomes a
    Hugging Face checkpoint directory (`config.json`, `model.safetensors`,
    tokenizer files, the chat template) that `transformers` and
    `kft.build_causal_lm` load. Otherwise (a quantized base, whose int8 /
    int4 kernels have no Hugging Face form; or another family) the merged
    weights go to `model.weights.h5`, loaded with `kft.build_causal_lm(base,
    quantize=...)` then `lm.load_weights(...)`. `kft_export.json` says which.

    Args:
        config: the run's `RecipeConfig`.
        model: its `SFTCausalLM`, adapters or weights loaded.
        output: the directory to write.
        format: None (the best of the two), `"transformers"` or `"keras"`
            (`model.weights.h5`).

    Returns:
        `output`.
    """
    if format not in (None, "transformers", "keras"):
        raise RecipeError("--format for a causal-LM run is 'transformers' or "
                          f"'keras' (model.weights.h5). Received: {format!r}")
    if isinstance(model, PromptTunedCausalLM):
        raise RecipeError(
            "kft export: a prompt-tuning run's virtual tokens go before the "
            "input and cannot be merged into the weights; the run's "
            f"{PROMPT_FILE} with its base is the model "
            "(kft.prompt_causal.load_prompt, or `kft generate RUN_DIR`).")
    lm = model.lm
    merged = merge_lora(lm) if lora_layers(lm) else 0
    quantized = sorted({layer.quantization_mode for layer in all_layers(lm)
                        if layer.quantization_mode})
    info = {"base": config.model.causal_lm, "quantize": config.model.quantize,
            "merged_lora_layers": merged}
    os.makedirs(output, exist_ok=True)
    reason = (f"the base is quantized ({', '.join(quantized)})" if quantized
              else "--format keras" if format == "keras" else None)
    if reason is None:
        reason = _export_transformers(lm, output)
        if reason is None:
            info["format"] = "transformers"
    if reason is not None:
        if format == "transformers":
            raise RecipeError(f"--format transformers: {reason}.")
        lm.save_weights(os.path.join(output, "model.weights.h5"))
        info.update(format="keras_weights", weights="model.weights.h5",
                    why_not_transformers=reason)
    with open(os.path.join(output, EXPORT_INFO), "w") as f:
        json.dump(info, f, indent=2)
    return output


def _export_transformers(lm, output):
    """keras-hub's Hugging Face exporter into `output`; None when written,
    else why not (the family has no exporter)."""
    staging = tempfile.mkdtemp(prefix=".kft-export-", dir=output)
    try:
        lm.export_to_transformers(staging)
    except (ValueError, NotImplementedError, KeyError) as error:
        return f"keras-hub has no Hugging Face exporter for it ({error})"
    else:
        _add_chat_template(staging, getattr(lm, "chat_template", None))
        for name in os.listdir(staging):
            target = os.path.join(output, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _add_chat_template(directory, template):
    """Puts `template` in `tokenizer_config.json` (keras-hub's exporter
    leaves it out), so `transformers` and `kft.build_causal_lm` find it."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not template or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    tokenizer_config["chat_template"] = template
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)
