"""kft: fine-tune pretrained Keras models with plain `model.fit`.

`import kft` is cheap and changes nothing global: the public names below
load on first use, so the command line answers `kft list` without
starting TensorFlow. The first use of any kft name loads all of kft, and
with it kft's Keras objects, which `keras.saving.load_model` needs
(`import keras` before `import kft`, as isort orders them, does the same).
"""

import importlib
import sys

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "ImagePreprocessing": "kft.preprocessing",
    "Stage": "kft.stages",
    "backbone_blocks": "kft.backbones",
    "build_audio_classifier": "kft.audio",
    "build_causal_lm": "kft.causal_lm",
    "build_classifier": "kft.models",
    "build_text_classifier": "kft.text",
    "compare": "kft.recipes.compare",
    "describe": "kft.anatomy",
    "fine_tune": "kft.finetune",
    "format_trainable_summary": "kft.freezing",
    "freeze": "kft.freezing",
    "list_backbones": "kft.families",
    "lr_find": "kft.callbacks",
    "plan_memory": "kft.memory_plan",
    "register_backbone": "kft.families",
    "trainable_summary": "kft.freezing",
    "tune": "kft.recipes.tune",
    "unfreeze": "kft.freezing",
}
_SUBMODULES = (
    "anatomy", "augment", "backbones", "callbacks", "causal_lm", "data",
    "distribute", "families", "heads", "lora", "memory_plan", "optimizers",
    "preference", "prompt", "prompt_causal", "remat", "report", "rl", "sft",
    "stages",
)
# What `import kft` loads on first use: the library, with every Keras
# object it registers for `keras.saving.load_model`.
_LIBRARY = tuple(f"kft.{name}" for name in _SUBMODULES) + (
    "kft.audio", "kft.audio_data", "kft.finetune", "kft.freezing", "kft.models",
    "kft.preprocessing", "kft.text")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def _load_library():
    for module in _LIBRARY:
        importlib.import_module(module)


def __getattr__(name):
    if name in _EXPORTS:
        _load_library()
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        _load_library()
        value = importlib.import_module(f"kft.{name}")
    else:
        raise AttributeError(f"module 'kft' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


# Keras is already loaded (and TensorFlow with it): loading kft's objects
# now costs nothing and lets `keras.saving.load_model` find them.
if "keras" in sys.modules:
    _load_library()
