"""Lazy package exports: a package names what it exports and where it
lives, and loads that module on first use (`scipy`, `keras_hub` and SPEC 1
do the same), so `kft validate` can read `kft.training.stages` without
`kft.training.finetune` starting TensorFlow.
"""

import importlib


def attach(package, exports):
    """Returns `(__getattr__, __dir__, __all__)` for `package`.

    Args:
        package: the package's `__name__`.
        exports: public name -> the module that defines it.
    """
    module_globals = importlib.import_module(package).__dict__

    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        module_globals[name] = value
        return value

    def __dir__():
        return sorted(set(module_globals) | set(exports))

    return __getattr__, __dir__, sorted(exports)
