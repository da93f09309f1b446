"""The worker's sandbox: what experiment code may read and write on an envoy's machine.

The daemon computes a :class:`Policy` once from its config (``policy_for``) and gives each worker its
own folder; the worker enters the sandbox (``enter``) as the first thing it does, before it imports
numpy or JAX and long before it unpickles the experiment. Inside, experiment code can

- read Python, the installed packages, system libraries, ``/etc`` (less its secrets), ``/proc`` and
  ``/sys``; the shard descriptor's module (the config folder's ``*.py`` files and packages) and the
  data its params name; and the operator's ``settings.sandbox.read_paths``;
- write only its own folder (``<work_dir>/<envoy>/runs/<id>``, which holds its ``tmp`` and ``home``),
  its compilation cache when the envoy keeps one, and ``settings.sandbox.write_paths``;
- never read the envoy's config file, its TLS files, any ``*.key``/``*.pem``-like file in a folder it
  can otherwise see, the work dir (other experiments, the review desk, the proxy socket's folder), nor
  the daemon's environment or memory: the worker gives up every capability (so a root daemon's
  processes are out of reach), the daemon is not dumpable, and Landlock forbids ptrace-attaching to
  anything outside the sandbox.

Landlock does the file-system part (see landlock.py). Standard library only, like landlock.py.
"""
from __future__ import annotations

import ctypes
import dataclasses
import fnmatch
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from fedjax_core.envoy import landlock

# file names that hold secrets wherever they are found in a folder the worker could otherwise read
SECRET_PATTERNS = ("*.key", "*.pem", "*.p12", "*.pfx", "*.jks", "*.keystore", "id_rsa*", "id_ecdsa*",
                   "id_ed25519*", ".env", "*.env", ".netrc", ".git-credentials")
SYSTEM_READ = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc", "/proc", "/sys")
SYSTEM_SECRETS = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers",
                  "/etc/sudoers.d", "/etc/ssh", "/etc/ssl/private", "/etc/security/opasswd", "/etc/krb5.keytab",
                  "/etc/credstore", "/etc/credstore.encrypted")
CPU_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
GPU_DEVICE_GLOBS = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri", "/dev/dxg")
WORKER_PACKAGES = ("fedjax_core", "fedjax_proto")  # imported by every worker, wherever they are installed
POLICY_FILE = "sandbox.json"


class SandboxError(RuntimeError):
    """The sandbox cannot be entered as asked; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """Paths a worker may use, each with what it may do there (see landlock.READ, LIST, READ_WRITE, DEVICE)."""
    rules: tuple[tuple[str, int], ...]
    abi: int

    def with_folder(self, folder: Path) -> Policy:
        """This policy, plus read and write in a worker's own folder."""
        return dataclasses.replace(self, rules=(*self.rules, (str(folder), landlock.READ_WRITE)))

    def as_json(self) -> dict:
        return {"abi": self.abi, "rules": [list(rule) for rule in self.rules]}

    @staticmethod
    def read(path: Path) -> Policy | None:
        """The policy a daemon wrote to ``path``; None when the operator runs workers unsandboxed."""
        data = json.loads(Path(path).read_text())
        if data.get("unsandboxed") is True:
            return None
        return Policy(rules=tuple((str(p), int(rights)) for p, rights in data["rules"]), abi=int(data["abi"]))

    def paths(self, rights: int) -> list[str]:
        """The paths granted at least ``rights``."""
        return [path for path, granted in self.rules if granted & rights == rights]


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def _is_secret(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in SECRET_PATTERNS)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def grant(root: Path, rights: int, denied: Iterable[Path]) -> list[tuple[str, int]]:
    """Rules that grant ``rights`` on ``root`` except on ``denied`` paths and secret-looking files.

    Landlock can only allow, so a folder holding something denied is opened up one level: the folder
    may be listed (names only), each entry but the denied ones gets ``rights``, and entries that hold a
    denied path further down are opened up the same way. Inside a folder listed this way, files named
    like keys (SECRET_PATTERNS) are denied too. ``root`` inside a denied path is not granted at all."""
    denied = [_real(d) for d in denied]
    root = _real(root)
    if not root.exists() or any(_inside(root, d) for d in denied):
        return []
    if root.is_dir() and any(root in d.parents for d in denied):
        rules: list[tuple[str, int]] = [(str(root), landlock.LIST)]
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError:
            return []
        for entry in entries:
            if _is_secret(entry.name) and not entry.is_dir(follow_symlinks=False):
                continue
            rules.extend(grant(Path(entry.path), rights, denied))
        return rules
    return [(str(root), rights)]


def python_paths() -> list[Path]:
    """Where this Python and its packages live: the prefixes, sys.path, and the worker's own packages
    (an editable install keeps them outside site-packages)."""
    import importlib.util

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    cwd = os.getcwd()  # first on sys.path under `python -m`: the daemon's folder is not Python's
    paths.update(p for p in sys.path if p and os.path.isabs(p) and p != cwd)
    for package in WORKER_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None:
            paths.update(spec.submodule_search_locations or ())
    return [Path(p) for p in paths]


def descriptor_paths(config_dir: Path, params: dict) -> list[Path]:
    """What the shard descriptor needs from the config folder: its ``*.py`` files, packages and
    ``__pycache__`` (so the descriptor module and helpers beside it import), and every file or folder a
    param names (a string, or a list of strings, resolved against the config folder)."""
    paths = [p for p in config_dir.iterdir()
             if (p.is_file() and p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())
             or p.name == "__pycache__"]
    values = [v for value in params.values() for v in (value if isinstance(value, list) else [value])]
    for value in values:
        if isinstance(value, str) and value and "\0" not in value and len(value) < 4096:
            candidate = Path(value).expanduser()
            candidate = candidate if candidate.is_absolute() else config_dir / candidate
            if candidate.exists():
                paths.append(candidate)
    return paths


def device_paths(gpus: bool) -> list[Path]:
    import glob

    found = [Path(p) for p in CPU_DEVICES if os.path.exists(p)]
    if gpus:
        found += [Path(p) for pattern in GPU_DEVICE_GLOBS for p in glob.glob(pattern)]
    return found


def policy_for(*, abi: int, config_dir: Path, denied: Iterable[Path], shard_params: dict, gpus: bool,
               read_paths: Iterable[Path] = (), write_paths: Iterable[Path] = (),
               cache_dir: Path | None = None) -> Policy:
    """The sandbox every worker of an envoy shares (each adds its own folder with Policy.with_folder).

    ``denied``: the envoy config file, its TLS files and its work dir; they stay out of reach even where
    a granted folder holds them. ``gpus``: also the NVIDIA device files (and /dev/shm, which NCCL uses)."""
    denied = [*denied, *map(Path, SYSTEM_SECRETS)]
    rules: list[tuple[str, int]] = []
    for path in (*map(Path, SYSTEM_READ), *python_paths(), *descriptor_paths(config_dir, shard_params),
                 *read_paths):
        rules += grant(path, landlock.READ, denied)
    for path in write_paths:
        rules += grant(path, landlock.READ_WRITE, denied)
    rules += [(str(p), landlock.DEVICE) for p in device_paths(gpus)]
    if gpus and os.path.isdir("/dev/shm"):
        rules.append(("/dev/shm", landlock.READ_WRITE))
    if cache_dir is not None:
        rules.append((str(cache_dir), landlock.READ_WRITE))
    unique = dict.fromkeys(rules)  # the same path may come from several places
    return Policy(rules=tuple(unique), abi=abi)


# ----------------------------------------------------------------------------------- the worker's side
_PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 4, 24, 47, 4
_CAP_LAST = 63
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Give up every capability, for good: a worker of a root daemon is then root without root's powers
    (it cannot read other processes' memory or environment, override file permissions, or chown)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(_CAP_LAST + 1):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # fails once past the kernel's last capability, or without CAP_SETPCAP
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data):
        raise SandboxError(f"could not drop the worker's capabilities: {os.strerror(ctypes.get_errno())}")


def make_undumpable() -> None:
    """Keep processes of the same account (experiment code included) out of this one's /proc files and
    memory; the daemon calls it at start."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def enter(policy: Policy) -> None:
    """Enter the sandbox: drop every capability, then restrict the file system to ``policy``.
    Must run while the process has one thread: Landlock restricts the calling thread and those it starts."""
    if threads() != 1:
        raise SandboxError(f"the worker has {threads()} threads when entering its sandbox; it must enter it "
                           "before anything starts a thread (numpy's import does)")
    drop_capabilities()
    landlock.restrict_self(policy.rules, policy.abi)


class ModulesBeside:
    """Finds top-level modules and packages in ``folder`` without listing it, which the sandbox forbids
    (Python's own finder lists a folder and finds nothing when it cannot): the shard descriptor's module
    beside the envoy config imports, and the names of the other files there stay unseen."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def find_spec(self, fullname: str, path=None, target=None):
        import importlib.util

        if path is not None or "." in fullname:  # submodules: their package's folder may be listed
            return None
        package = self.folder / fullname
        if (package / "__init__.py").is_file():
            return importlib.util.spec_from_file_location(fullname, package / "__init__.py",
                                                          submodule_search_locations=[str(package)])
        if (self.folder / f"{fullname}.py").is_file():
            return importlib.util.spec_from_file_location(fullname, self.folder / f"{fullname}.py")
        return None

    def install(self) -> None:
        """First among the finders of files (after built-in and frozen modules), as the folder's place at the
        head of sys.path gives it without a sandbox."""
        from importlib.machinery import PathFinder

        at = next((i for i, finder in enumerate(sys.meta_path) if finder is PathFinder), len(sys.meta_path))
        sys.meta_path.insert(at, self)


def explain(exc: BaseException, policy: Policy | None) -> str:
    """A hint for a PermissionError that the sandbox may have caused; empty otherwise."""
    seen = exc
    while seen is not None and not isinstance(seen, PermissionError):
        seen = seen.__cause__ or seen.__context__
    if policy is None or seen is None:
        return ""
    where = f" ({seen.filename})" if getattr(seen, "filename", None) else ""
    return (f"\n[the envoy's sandbox refused an access{where}: experiment code may write only in its own folder "
            f"and temp dir, and read only Python, its packages, the shard descriptor's module and data. If the "
            f"shard descriptor needs more, the envoy's operator can allow it with settings.sandbox.read_paths or "
            f"write_paths in the envoy config]")
