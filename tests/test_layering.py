"""The architecture's rules, checked: layers point down, one module holds
Keras' private attributes, `import kft` and the quick commands stay light.

The static checks read the source with `ast` (every import, including
those inside functions); the dynamic ones run a fresh interpreter, since
this process has TensorFlow loaded already.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

KFT = pathlib.Path(__file__).resolve().parent.parent / "kft"
# The layers above the library: they may import it, never the reverse.
APPLICATION = ("kft.recipes", "kft.cli")


def _module_name(path):
    parts = path.relative_to(KFT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(p): p for p in sorted(KFT.rglob("*.py"))}


def _imports(path):
    """Every module an import statement in `path` names, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_application(name):
    return any(name == top or name.startswith(top + ".") for top in APPLICATION)


LIBRARY = sorted(name for name in _modules() if not _is_application(name))


# One rule per package: the kft packages its modules may import (at any
# depth, imports inside functions included), besides its own modules and
# the helpers every package may use. A new package adds its line here.
HELPERS = {"kft", "kft.utils", "kft._keras_internals", "kft._lazy", "kft._aliases"}
PACKAGE_RULES = {
    "kft.convert": set(),
    "kft.losses": set(),
    "kft.backbones": {"kft.convert"},
    "kft.data": {"kft.backbones", "kft.losses"},
    "kft.augment": {"kft.data"},
    "kft.lora": {"kft.backbones"},
    "kft.sft": {"kft.backbones", "kft.data", "kft.losses"},
    "kft.prompt": {"kft.backbones", "kft.sft"},
    "kft.models": {"kft.backbones", "kft.convert", "kft.data", "kft.prompt"},
    "kft.preference": {"kft.backbones", "kft.data", "kft.lora", "kft.losses",
                       "kft.sft"},
    "kft.rl": {"kft.backbones", "kft.data", "kft.lora", "kft.losses",
               "kft.models", "kft.preference", "kft.sft"},
    "kft.training": {"kft.backbones", "kft.lora", "kft.losses", "kft.models",
                     "kft.sft"},
    "kft.distribute": {"kft.backbones", "kft.lora", "kft.models"},
    "kft.vision": {"kft.augment", "kft.backbones", "kft.data", "kft.lora",
                   "kft.models", "kft.training"},
}


def _package(module):
    return ".".join(module.split(".")[:2])


def _kft_imports(module):
    """The kft modules `module` imports, resolved to existing modules."""
    modules = _modules()
    found = set()
    for name in _imports(modules[module]):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith("kft"):
            found.add(name)
    return found - {module}


def test_every_package_has_a_rule_and_the_rules_have_no_cycle():
    packages = {_package(m) for m in LIBRARY if "." in m} - HELPERS
    assert packages == set(PACKAGE_RULES), (
        f"packages without a rule: {sorted(packages - set(PACKAGE_RULES))}; "
        f"rules without a package: {sorted(set(PACKAGE_RULES) - packages)}")
    for module in (m for m in LIBRARY if _package(m) == "kft.utils"):
        assert {_package(m) for m in _kft_imports(module)} <= {"kft.utils"}, module
    order = []
    while len(order) < len(PACKAGE_RULES):
        ready = [p for p, uses in PACKAGE_RULES.items()
                 if p not in order and uses <= set(order)]
        assert ready, f"the package rules form a cycle among " \
            f"{sorted(set(PACKAGE_RULES) - set(order))}"
        order.extend(sorted(ready))


@pytest.mark.parametrize("module", [m for m in LIBRARY if _package(m) in PACKAGE_RULES])
def test_each_module_imports_only_what_its_package_rule_allows(module):
    package = _package(module)
    allowed = PACKAGE_RULES[package] | HELPERS | {package}
    wrong = sorted(m for m in _kft_imports(module)
                   if _package(m) not in allowed and m not in HELPERS)
    assert not wrong, (f"{module} imports {wrong}; {package} may import "
                       f"{sorted(PACKAGE_RULES[package])}")


def test_no_module_import_cycle_even_inside_functions():
    graph = {m: _kft_imports(m) - HELPERS for m in _modules()}
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


@pytest.mark.parametrize("module", LIBRARY)
def test_the_library_never_imports_recipes_or_the_cli(module):
    wrong = sorted(n for n in _imports(_modules()[module]) if _is_application(n))
    assert not wrong, f"{module} imports {wrong}: the library must not"


def test_the_package_init_exports_only_library_names_except_compare_and_tune():
    """`kft.compare` and `kft.tune` are the public names from the
    application layer (lazy: `import kft` and its library do not load
    them)."""
    import kft

    outside = {name: module for name, module in kft._EXPORTS.items()
               if _is_application(module)}
    assert outside == {"compare": "kft.recipes.compare",
                       "tune": "kft.recipes.tune"}
    assert not any(_is_application(m) for m in kft._LIBRARY)


def _private_keras_attributes():
    """The private attributes `kft._keras_internals` reaches for."""
    source = (KFT / "_keras_internals.py").read_text()
    names = {node.attr for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Attribute) and node.attr.startswith("_")}
    names |= {node.value for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith("_") and node.value.isidentifier()}
    return names - {"__init__", "__name__"}


def test_keras_private_attributes_are_used_in_one_module_only():
    private = _private_keras_attributes()
    assert {"_flatten_layers", "_tracker", "_kernel",
            "_trainable_variables"} <= private
    offenders = []
    for name, path in _modules().items():
        if name == "kft._keras_internals":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and (
                    node.attr in private or node.attr == "fset"):
                offenders.append(f"{name}:{node.lineno} .{node.attr}")
    assert not offenders, offenders


def _fresh_python(code):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_loading_the_whole_library_loads_no_recipe_module():
    _fresh_python(
        "import sys, kft\n"
        "kft.fine_tune, kft.lora, kft.data, kft.augment, kft.prompt\n"
        "loaded = [m for m in sys.modules if m.startswith(('kft.recipes', "
        "'kft.cli'))]\n"
        "assert not loaded, loaded\n"
        "assert 'tensorflow' in sys.modules\n")


def test_import_kft_changes_no_environment_variable_or_keras_setting():
    """`import kft` loads nothing heavy; loading the library (after the
    libraries it stands on, which have their own habits: JAX sets
    TF_CPP_MIN_LOG_LEVEL) changes no variable and no Keras setting."""
    _fresh_python(
        "import os, sys\n"
        "before = dict(os.environ)\n"
        "import kft\n"
        "assert 'keras' not in sys.modules, 'import kft loaded keras'\n"
        "assert dict(os.environ) == before\n"
        "import keras, keras_hub, tensorflow\n"
        "before = dict(os.environ)\n"
        "kft.build_classifier, kft.lora, kft.callbacks, kft.augment\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ "
        "set(before.items())\n"
        "assert keras.config.dtype_policy().name == 'float32'\n"
        "assert keras.config.floatx() == 'float32'\n")


def test_the_quick_commands_never_import_tensorflow():
    result = _fresh_python(
        "import sys\n"
        "from kft.cli import main\n"
        "for argv in (['list'], ['show', 'quickstart'], "
        "['validate', 'quickstart'], ['validate', 'fortunes_minilm_lora']):\n"
        "    assert main(argv) == 0, argv\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'keras_hub', 'jax')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n")
    assert "quickstart" in result.stdout


def test_bad_recipe_message_has_no_native_log_lines(tmp_path):
    """`kft run` loads TensorFlow; its C++ start-up lines are filtered."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nmodel: {backbone: mobilenet_v2, input_shape: [32, 32, 3], "
        "weights: /nonexistent.weights.h5}\n"
        "data: {source: builtin, name: fashion_mnist_holdout}\n"
        "stages: [{epochs: 1}]\n")
    result = subprocess.run(
        [sys.executable, "-m", "kft.cli", "run", str(recipe), "--output-dir",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines and lines[0].startswith("kft:"), result.stderr
    assert not any(line[:1] in "IWEF" and line[1:5].isdigit() for line in lines)
    assert "absl::InitializeLog" not in result.stderr
