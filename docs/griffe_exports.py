"""Griffe extension: kft's lazy top-level names, for the API reference.

`kft/__init__.py` exports its public names through a module `__getattr__`
that reads the `_EXPORTS` table (so `import kft` stays cheap). Static
analysis does not run that function, so without this extension
`::: kft.build_classifier` would not be found. The extension reads the
same table from the source, without importing kft, and adds each name to
the `kft` module as an alias of the object that defines it. When the
table changes (a name added, a module moved), the docs follow.
"""

import ast

import griffe


def _exports(source):
    """The `_EXPORTS = {...}` dict literal of `kft/__init__.py`."""
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign)
                and any(isinstance(target, ast.Name) and target.id == "_EXPORTS"
                        for target in node.targets)):
            return ast.literal_eval(node.value)
    raise ValueError("kft/__init__.py has no _EXPORTS = {...} table")


class LazyExports(griffe.Extension):
    """Adds `kft.<name>` aliases for the names in `kft._EXPORTS`."""

    def on_package(self, *, pkg, **kwargs):
        if pkg.path != "kft":
            return
        exports = _exports(pkg.filepath.read_text(encoding="utf-8"))
        for name, module in exports.items():
            if name not in pkg.members:
                pkg.set_member(name, griffe.Alias(name, f"{module}.{name}", parent=pkg))

    # Griffe before 1.10 calls the same event on_package_loaded.
    on_package_loaded = on_package
