"""The package's layers import downward only (docs/architecture.md): a module may import its
own layer and the layers below, never one above, and the diffusion mathematics never imports
Pyro.  Read from the source with ``ast``, so a lazy import inside a function counts too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bdiff_pyro"

#: module (dotted, without "bdiff_pyro.") or package prefix -> layer
LAYERS = {
    "errors": 0, "registry": 0, "util": 0,
    "diffusion": 1, "networks": 1, "data": 1, "baselines": 1,
    "programs": 2,
    "config": 3, "checkpoints": 3, "train": 3, "evaluation": 3, "diagnostics": 3, "plots": 3, "memory": 3,
    "crosscheck": 3, "distributed": 3,
    "cli": 4, "__main__": 4,
}


def layer_of(module):
    """The layer of ``bdiff_pyro.<module>`` by its longest listed prefix."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in LAYERS:
            return LAYERS[name]
    raise KeyError(f"bdiff_pyro.{module} has no layer: add it to LAYERS and to docs/architecture.md")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in relative.parts if p != "__init__"]
        if parts:  # bdiff_pyro/__init__.py: the public face, exempt
            yield ".".join(parts), path


def imports_of(path):
    """Every bdiff_pyro module a file imports (absolute imports, as the package writes them)
    and every top-level package it imports."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError(f"{path}: relative import; the package uses absolute imports")
            if node.module == "bdiff_pyro":
                for alias in node.names:
                    yield f"bdiff_pyro.{alias.name}"
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_go_downward(module, path):
    own = layer_of(module)
    for imported in imports_of(path):
        if imported.startswith("bdiff_pyro."):
            target = imported[len("bdiff_pyro."):]
            assert layer_of(target) <= own, f"bdiff_pyro.{module} (layer {own}) imports {imported} " \
                                            f"(layer {layer_of(target)})"
        if module.startswith("diffusion") or module.startswith("networks"):
            assert imported.split(".")[0] != "pyro", f"bdiff_pyro.{module} must not import Pyro ({imported})"


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The check itself: a diffusion module importing the trainer is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from bdiff_pyro.train import train\n")
    found = [name for name in imports_of(bad) if name.startswith("bdiff_pyro.")]
    assert found and layer_of(found[0][len("bdiff_pyro."):]) > layer_of("diffusion.kernels")


def test_every_module_has_a_layer():
    for module, _ in modules():
        layer_of(module)
