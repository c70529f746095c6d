"""Griffe extension: kft's lazy exports and public module names, for the
API reference.

`kft/__init__.py` and each package's `__init__.py` export their public
names through a module `__getattr__` that reads an `_EXPORTS` table (so
`import kft` stays cheap), and `kft._aliases.ALIASES` keeps public module
names (`kft.optimizers` is `kft.training.optimizers`). Static analysis runs
neither, so without this extension `::: kft.build_classifier` or `:::
kft.optimizers.discriminative` would not be found. The extension reads the
same tables from the source, without importing kft, and adds aliases of
the objects that define each name. When a table changes (a name added, a
module moved), the docs follow.
"""

import ast

import griffe


def _table(source, name):
    """The `name = {...}` dict literal of a module's source, or `{}`."""
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign)
                and any(isinstance(target, ast.Name) and target.id == name
                        for target in node.targets)):
            return ast.literal_eval(node.value)
    return {}


def _packages(module):
    """`module` and every package below it."""
    yield module
    for member in module.members.values():
        if (not member.is_alias and member.is_module
                and member.filepath.name == "__init__.py"):
            yield from _packages(member)


class LazyExports(griffe.Extension):
    """Adds aliases for `_EXPORTS` names and `kft._aliases.ALIASES`."""

    def on_package(self, *, pkg, **kwargs):
        if pkg.path != "kft":
            return
        for package in _packages(pkg):
            source = package.filepath.read_text(encoding="utf-8")
            for name, module in _table(source, "_EXPORTS").items():
                if name not in package.members:
                    package.set_member(
                        name, griffe.Alias(name, f"{module}.{name}", parent=package))
        aliases = pkg.members["_aliases"].filepath.read_text(encoding="utf-8")
        for public, target in _table(aliases, "ALIASES").items():
            name = public.rpartition(".")[2]
            if name not in pkg.members:
                pkg.set_member(name, griffe.Alias(name, target, parent=pkg))

    # Griffe before 1.10 calls the same event on_package_loaded.
    on_package_loaded = on_package
