"""kft: fine-tune pretrained Keras models with plain `model.fit`.

`import kft` is cheap and changes nothing global: the public names below
load on first use, so the command line answers `kft list` without
starting TensorFlow. The first use of any kft name loads all of kft, and
with it kft's Keras objects, which `keras.saving.load_model` needs
(`import keras` before `import kft`, as isort orders them, does the same).
"""

import importlib
import pkgutil
import sys

from kft import _aliases

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "ImagePreprocessing": "kft.backbones.preprocessing",
    "Stage": "kft.training.stages",
    "backbone_blocks": "kft.backbones.blocks",
    "build_audio_classifier": "kft.models.audio",
    "build_causal_lm": "kft.models.causal_lm",
    "build_classifier": "kft.models.image",
    "build_detector": "kft.vision.detector",
    "build_segmenter": "kft.vision.segmenter",
    "build_text_classifier": "kft.models.text",
    "compare": "kft.recipes.compare",
    "describe": "kft.backbones.anatomy",
    "fine_tune": "kft.training.finetune",
    "format_trainable_summary": "kft.backbones.freezing",
    "freeze": "kft.backbones.freezing",
    "list_backbones": "kft.backbones.families",
    "lr_find": "kft.training.callbacks",
    "plan_memory": "kft.training.memory_plan",
    "register_backbone": "kft.backbones.families",
    "trainable_summary": "kft.backbones.freezing",
    "tune": "kft.recipes.tune",
    "unfreeze": "kft.backbones.freezing",
}
_SUBMODULES = (
    "anatomy", "augment", "backbones", "callbacks", "causal_lm", "data",
    "distribute", "families", "heads", "lora", "losses", "memory_plan", "models",
    "optimizers", "preference", "prompt", "prompt_causal", "remat", "report",
    "rl", "sft", "stages", "training", "vision",
)
# What `import kft` loads on first use: every module of the library's
# packages, with every Keras object they register for
# `keras.saving.load_model` (the packages' own exports are lazy).
_LIBRARY = ("kft.backbones", "kft.losses", "kft.data", "kft.lora", "kft.models",
            "kft.prompt", "kft.sft", "kft.preference", "kft.training",
            "kft.distribute", "kft.augment", "kft.vision", "kft.rl")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def _load_library():
    for name in _LIBRARY:
        package = importlib.import_module(name)
        for module in pkgutil.iter_modules(package.__path__, f"{name}."):
            importlib.import_module(module.name)


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


_aliases.install()

# Keras is already loaded (and TensorFlow with it): loading kft's objects
# now costs nothing and lets `keras.saving.load_model` find them.
if "keras" in sys.modules:
    _load_library()
