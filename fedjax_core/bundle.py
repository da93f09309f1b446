"""The experiment bundle: a JSON header anyone may read, then an opaque cloudpickle payload.

The director stores and forwards bundles without opening them. A worker reads the header
first, so a Python or package mismatch that would break unpickling is refused with a
message naming both versions, before any user code runs.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MAGIC = b"FJXBUNDLE1\n"
_LEN = struct.Struct("<I")
RECORDED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "cloudpickle", "fedjax-core")
# A mismatch of these breaks unpickling; the rest are reported but tolerated.
STRICT_PACKAGES = ("cloudpickle",)


class BundleError(RuntimeError):
    pass


def environment_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass(frozen=True)
class Bundle:
    meta: dict[str, Any]
    payload: bytes


def pack(meta: dict[str, Any], payload: bytes) -> bytes:
    header = json.dumps({**meta, "versions": environment_versions()}).encode()
    return _MAGIC + _LEN.pack(len(header)) + header + payload


def read(path: Path) -> Bundle:
    return parse(Path(path).read_bytes(), str(path))


def parse(data: bytes, where: str = "the data") -> Bundle:
    """A bundle from its bytes (the simulation's, which never touch a disk)."""
    if not data.startswith(_MAGIC):
        raise BundleError(f"{where} is not an experiment bundle")
    start = len(_MAGIC) + _LEN.size
    (size,) = _LEN.unpack(data[len(_MAGIC):start])
    return Bundle(meta=json.loads(data[start:start + size]), payload=data[start + size:])


def read_meta(path: Path) -> dict[str, Any]:
    """Only the JSON header of the bundle at ``path`` (the payload is neither read nor unpickled)."""
    with open(path, "rb") as f:
        if f.read(len(_MAGIC)) != _MAGIC:
            raise BundleError(f"{path} is not an experiment bundle")
        (size,) = _LEN.unpack(f.read(_LEN.size))
        return json.loads(f.read(size))


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def check_versions(meta: dict[str, Any]) -> list[str]:
    """Raise BundleError on a mismatch that breaks unpickling; return warnings for the others."""
    theirs, ours = meta.get("versions", {}), environment_versions()
    problems, warnings = [], []
    if _major_minor(theirs.get("python", "?")) != _major_minor(ours["python"]):
        problems.append(f"Python {theirs.get('python')} in the notebook vs {ours['python']} on this envoy")
    for name in RECORDED_PACKAGES:
        mine, yours = ours.get(name), theirs.get(name)
        if yours is None or mine == yours:
            continue
        line = f"{name} {yours} in the notebook vs {mine} on this envoy"
        if name in STRICT_PACKAGES and yours.split(".")[0] != str(mine).split(".")[0]:
            problems.append(line)
        else:
            warnings.append(line)
    if problems:
        raise BundleError("the experiment cannot be loaded here: " + "; ".join(problems)
                          + ". Install matching versions on the envoy or in the notebook.")
    return warnings
