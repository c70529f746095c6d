"""Causal language models from keras-hub presets, HF checkpoints or local dirs.

`build_causal_lm` loads any architecture keras-hub's `CausalLM.from_preset`
knows (Llama, Llama 3, Gemma, Mistral, Qwen, GPT-2, SmolLM3, Phi-3 ...),
optionally in another dtype or quantized, and records the checkpoint's chat
template (from `tokenizer_config.json`, which keras-hub does not keep) on
the model as `lm.chat_template`, where `kft.sft.sft_dataset` finds it.
keras-hub tasks describe themselves: `kft.anatomy.describe(lm)` gives
`task="causal_lm"` and the backbone's transformer layers as its blocks.
"""

import json
import os
import warnings

from kft.utils import offline

__all__ = ["CAUSAL_LM_PRESETS", "QUANTIZE_MODES", "build_causal_lm",
           "read_chat_template", "resolve_causal_lm_preset"]

# Weight-only modes of keras' `Model.quantize` that need no calibration data
# ("gptq" and "awq" need a dataset; "float8" is a training-time format).
QUANTIZE_MODES = (None, "int8", "int4")


def _smollm2_path():
    from kft.convert.assets import converted_path

    return converted_path("smollm2", "smollm2")


# Short names for checkpoints converted from pip packages; anything else
# goes to keras-hub as a preset name, `hf://` address or directory.
CAUSAL_LM_PRESETS = {"smollm2": _smollm2_path}


def resolve_causal_lm_preset(preset):
    """A short name of `CAUSAL_LM_PRESETS` -> its local path; others as given."""
    resolver = CAUSAL_LM_PRESETS.get(str(preset))
    return resolver() if resolver else str(preset)

def build_causal_lm(preset, *, sequence_length=None, dtype=None, quantize=None,
                    remat=False):
    """A keras-hub causal LM (with its tokenizer / preprocessor) from a preset.

    `generate` takes raw strings; train it on `kft.sft.sft_dataset` batches
    through `kft.sft.SFTCausalLM(lm)`, which shares its weights.

    Args:
        preset: a keras-hub preset name (`"llama3_8b_en"`), an `hf://`
            address, a local directory in keras-hub or Hugging Face format
            (`config.json`, `model.safetensors`, `tokenizer.json` ...), or a
            short name of `CAUSAL_LM_PRESETS` (`"smollm2"`, after `kft
            convert smollm2`). Only a local directory works offline.
        sequence_length: the preprocessor's sequence length (tokens per
            training example); None keeps the preset's.
        dtype: the weights' and computations' dtype, e.g. `"bfloat16"`;
            None keeps the preset's.
        quantize: None, `"int8"` or `"int4"`: quantize the backbone's
            weights after loading with keras' `Model.quantize`, weight-only
            (activations stay in `dtype`); with `"int4"` the token embedding
            (the output head when tied) is int8.
        remat: rematerialise each transformer block in training
            (`kft.remat.set_remat`): the backward pass runs the blocks'
            forward pass again instead of keeping their activations, for
            long sequences that would not fit otherwise (about a third more
            compute per step). `kft.plan_memory` says what it saves.

    Returns:
        A `keras_hub.models.CausalLM`, with `chat_template` (a Jinja string
        or None) set from the checkpoint's `tokenizer_config.json`.

    Example:

    ```python
    lm = kft.build_causal_lm("/data/smollm2_135m_instruct",
                             sequence_length=256, quantize="int8")
    lm.generate("What is Keras?", max_length=64)
    ```
    """
    import keras_hub

    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}. "
                         f"Received: quantize={quantize!r}")
    if sequence_length is not None and (
            not isinstance(sequence_length, int) or sequence_length < 2):
        raise ValueError("sequence_length must be an integer >= 2 or None. "
                         f"Received: sequence_length={sequence_length!r}")
    preset = os.path.expanduser(resolve_causal_lm_preset(preset))
    _check_local_path(preset)
    offline.require_preset(
        preset, "a local directory in keras-hub or Hugging Face format "
        "(config.json, model.safetensors, tokenizer.json; e.g. 'smollm2' "
        "after `kft convert smollm2`)", what="the causal LM preset")
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        lm = keras_hub.models.CausalLM.from_preset(preset, **kwargs)
    except Exception as error:
        raise _load_error(preset, error) from None
    if sequence_length is not None and lm.preprocessor is not None:
        lm.preprocessor.sequence_length = sequence_length
    if quantize is not None:
        _quantize(lm, quantize)
    if remat:
        from kft.backbones.remat import set_remat

        set_remat(lm)
    lm.chat_template = read_chat_template(preset)
    return lm


def _looks_like_path(preset):
    return (os.path.isabs(preset) or preset.startswith(("./", "../", "~"))
            or (os.sep in preset and "://" not in preset))


def _check_local_path(preset):
    if _looks_like_path(preset) and not os.path.isdir(preset):
        raise ValueError(f"No such model directory: {preset!r}. Pass a "
                         "directory in keras-hub or Hugging Face format (with "
                         "config.json), a keras-hub preset name or an hf:// "
                         "address.")


def _load_error(preset, error):
    cause = str(error).splitlines()[0] if str(error) else type(error).__name__
    if os.path.isdir(preset):
        return ValueError(
            f"Could not load a causal LM from {preset!r}: {cause}")
    return RuntimeError(
        f"Could not load the causal LM {preset!r} (no network, or not a "
        "keras-hub preset?). Pass a local directory in keras-hub or Hugging "
        "Face format instead (config.json, model.safetensors, tokenizer.json). "
        f"Cause: {cause}")


def _quantize(lm, mode):
    """Quantizes the backbone's weights (weight-only: activations stay float).

    Keras' plain `"int8"` mode also quantizes activations, which costs a
    small LM much of its accuracy (SmolLM2-135M: top-1 agreement with float
    77% vs 92% weight-only). `"int4"` quantizes the transformer layers in
    128-wide groups; the token embedding, which is also the output head
    when tied, gets int8, as llama.cpp's 4-bit formats keep the output
    layer at higher precision. Called on the backbone, not the task, whose
    unbuilt tokenizer `Model.quantize` refuses.
    """
    import keras

    from kft._keras_internals import one_gc_collect

    int8 = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)

    def embedding(layer):
        return isinstance(layer, keras.layers.Embedding)

    with warnings.catch_warnings(), one_gc_collect():
        # Layers without weights to quantize (norms, dropout, rotary
        # embeddings) each warn that they have no `quantize`.
        warnings.filterwarnings(
            "ignore", message=r".*does not have a `quantize` method")
        warnings.filterwarnings("ignore", message=r".*__array__ implementation")
        if mode == "int4":
            lm.backbone.quantize("int4", filters=lambda layer: not embedding(layer))
            lm.backbone.quantize(config=int8, filters=embedding)
        else:
            lm.backbone.quantize(config=int8)
    # A generate function compiled before quantizing holds the old weights.
    lm.generate_function = None


def read_chat_template(preset):
    """The chat template of a Hugging Face checkpoint, or None.

    Read from `chat_template.jinja` or `tokenizer_config.json`'s
    `chat_template` (a string, or a list of named templates: `"default"` is
    taken). A local directory is read directly; an `hf://` address through
    the Hugging Face cache that loading the model filled. keras-hub presets
    carry no chat template.

    Args:
        preset: a local directory or an `hf://` address.

    Returns:
        The Jinja template string, or None when there is none.
    """
    preset = os.path.expanduser(str(preset))
    template = _read_text(preset, "chat_template.jinja")
    if template:
        return template
    config = _read_text(preset, "tokenizer_config.json")
    if not config:
        return None
    try:
        template = json.loads(config).get("chat_template")
    except (ValueError, AttributeError):
        return None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template
                 if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _read_text(preset, name):
    """The text of file `name` of a local or `hf://` checkpoint, or None."""
    if os.path.isdir(preset):
        path = os.path.join(preset, name)
    elif preset.startswith("hf://"):
        path = _hf_cached_file(preset[len("hf://"):].strip("/"), name)
    else:
        return None
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _hf_cached_file(repo_id, name):
    try:
        from huggingface_hub import hf_hub_download

        # Offline, the cache only: no request, no retries.
        return hf_hub_download(repo_id, name,
                               local_files_only=offline.is_offline())
    except Exception:  # not in the repo, or offline: no such file
        return None
