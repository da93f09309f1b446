"""A fresh strategy registry per test, and packages installed the way pip leaves them (dist-info on sys.path)."""
from __future__ import annotations

import sys

import pytest

from fedjax_core.strategies import registry


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """``install(distribution, {entry point: "module:Class"}, {module: source})``: a package on sys.path whose
    dist-info declares those ``fedjax.strategies`` entry points; the registry loads plugins again afterwards."""
    monkeypatch.setattr(registry, "_plugins", None)
    monkeypatch.setattr(registry, "_refused", {})
    modules: list[str] = []

    def install(distribution: str, entry_points: dict[str, str], sources: dict[str, str] | None = None):
        root = tmp_path / distribution
        root.mkdir()
        for module, source in (sources or {}).items():
            (root / f"{module}.py").write_text(source)
            modules.append(module)
        info = root / f"{distribution.replace('-', '_')}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text(
            f"[{registry.ENTRY_POINT_GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
        monkeypatch.syspath_prepend(str(root))
        return root

    yield install
    for module in modules:
        sys.modules.pop(module, None)
