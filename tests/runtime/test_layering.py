"""The worker's side does not depend on the notebook API: no module under fedjax_core/envoy/ or
fedjax_core/runtime/ imports fedjax_core.api (checked on the source with ast, so an import inside a
function counts too)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fedjax_core"
FORBIDDEN = "fedjax_core.api"
LOADERS = {"import_module", "__import__"}  # importlib.import_module("...") and __import__("...") with a literal


def _names(module: str, tree: ast.AST) -> list[tuple[int, str]]:
    """Every module name ``tree`` (the source of ``module``) imports, relative imports resolved."""
    package = module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # from fedjax_core import api
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in LOADERS):
            out.append((node.lineno, node.args[0].value))
    return out


def api_imports(module: str, source: str) -> list[str]:
    """``line: name`` for each import of fedjax_core.api in ``source``, the text of module ``module``."""
    found = {}
    for line, name in _names(module, ast.parse(source)):
        if name == FORBIDDEN or name.startswith(FORBIDDEN + "."):
            found.setdefault(line, name)  # the module a line imports, not each name taken from it
    return [f"{line}: {name}" for line, name in sorted(found.items())]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("layer", ["envoy", "runtime"])
def test_the_layer_does_not_import_the_notebook_api(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    offenders = {str(p.relative_to(PACKAGE.parent)): found for p in files
                 if (found := api_imports(_module_name(p), p.read_text()))}
    assert offenders == {}


@pytest.mark.parametrize("source", [
    "import fedjax_core.api",
    "import fedjax_core.api.experiment as e",
    "from fedjax_core.api.interfaces import TaskInterface",
    "from fedjax_core import api",
    "from fedjax_core.api import interfaces",
    "from ..api import interfaces",
    "from .. import api",
    "def f():\n    from fedjax_core.api.model_tensors import canonicalize",
    "import importlib\nimportlib.import_module('fedjax_core.api.model_tensors')",
    "__import__('fedjax_core.api')",
])
def test_the_check_finds_each_way_of_importing_it(source):
    assert api_imports("fedjax_core.envoy.worker", source)


@pytest.mark.parametrize("source", [
    "import fedjax_core.apiary",
    "from fedjax_core import apis, records",
    "from fedjax_core.runtime.interfaces import TaskInterface",
    "from . import tasks",
    "from .. import runtime",
    "x = 'fedjax_core.api'",
])
def test_the_check_lets_other_imports_be(source):
    assert api_imports("fedjax_core.envoy.worker", source) == []
