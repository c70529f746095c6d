"""Public module names that kept their place when kft became packages.

`kft.optimizers` and `kft.callbacks` (and the other names below) are part
of kft's public API; their code now lives in the package of its concept
(`kft.training.optimizers`, ...). `import kft.optimizers` and `from
kft.optimizers import discriminative` give that very module object, so
both names patch and compare as one.
"""

import importlib
import importlib.abc
import importlib.util
import sys

# Public name -> the module that holds it now.
ALIASES = {
    "kft.anatomy": "kft.backbones.anatomy",
    "kft.callbacks": "kft.training.callbacks",
    "kft.causal_lm": "kft.models.causal_lm",
    "kft.families": "kft.backbones.families",
    "kft.heads": "kft.models.heads",
    "kft.memory_plan": "kft.training.memory_plan",
    "kft.optimizers": "kft.training.optimizers",
    "kft.prompt_causal": "kft.prompt.causal_lm",
    "kft.remat": "kft.backbones.remat",
    "kft.report": "kft.training.report",
    "kft.stages": "kft.training.stages",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass  # already executed under its own name


class AliasFinder(importlib.abc.MetaPathFinder):
    """Finds `ALIASES` keys; every other name is left to Python's finders."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ALIASES:
            return None
        return importlib.util.spec_from_loader(
            fullname, _AliasLoader(ALIASES[fullname]))


def install():
    """Puts the finder after Python's own (idempotent)."""
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(AliasFinder())
