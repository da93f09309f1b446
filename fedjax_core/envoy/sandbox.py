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
import stat
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
    gpus: bool = False  # the NVIDIA device files, as found when the worker starts
    keep_socket: str | None = None  # the daemon's proxy: the one Unix socket the worker reaches

    def with_folder(self, folder: Path) -> Policy:
        """This policy, plus read and write in a worker's own folder."""
        return dataclasses.replace(self, rules=(*self.rules, (str(folder), landlock.READ_WRITE)))

    def as_json(self) -> dict:
        return {"abi": self.abi, "rules": [list(rule) for rule in self.rules], "gpus": self.gpus,
                "keep_socket": self.keep_socket}

    @staticmethod
    def read(path: Path) -> Policy | None:
        """The policy a daemon wrote to ``path``; None when the operator runs workers unsandboxed."""
        data = json.loads(Path(path).read_text())
        if data.get("unsandboxed") is True:
            return None
        return Policy(rules=tuple((str(p), int(rights)) for p, rights in data["rules"]), abi=int(data["abi"]),
                      gpus=bool(data.get("gpus")), keep_socket=data.get("keep_socket"))


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
    like keys (SECRET_PATTERNS) are denied too. ``root`` inside a denied path is not granted at all;
    links are followed once (a link back up the tree is not followed again)."""
    return _grant(_real(root), rights, [_real(d) for d in denied], set())


def _grant(root: Path, rights: int, denied: list[Path], seen: set[Path]) -> list[tuple[str, int]]:
    if root in seen or not root.exists() or any(_inside(root, d) for d in denied):
        return []
    seen.add(root)
    if not (root.is_dir() and any(root in d.parents for d in denied)):
        return [(str(root), rights)]
    rules: list[tuple[str, int]] = [(str(root), landlock.LIST)]
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        if _is_secret(entry.name) and not entry.is_dir(follow_symlinks=False):
            continue
        rules.extend(_grant(_real(entry.path), rights, denied, seen))
    return rules


def not_world_readable(root: Path, limit: int = 20000) -> list[Path]:
    """Files and folders under ``root`` that not everyone may read (``/etc/kubernetes/admin.conf``,
    ``/etc/ssl/private``): a worker of a root daemon keeps root's uid, so file permissions would not
    stop it; the sandbox does. At most ``limit`` entries are looked at."""
    found, looked = [], 0
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            looked += 1
            path = os.path.join(folder, name)
            try:
                mode = os.stat(path).st_mode
            except OSError:
                continue
            wanted = 0o005 if stat.S_ISDIR(mode) else 0o004
            if mode & wanted != wanted and (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                found.append(Path(path))
        dirs[:] = [d for d in dirs if Path(folder, d) not in found]
        if looked > limit:
            break
    return found


def python_paths() -> list[Path]:
    """Where this Python and its packages live: the prefixes, the standard library, site-packages, and the
    worker's own packages (an editable install keeps them outside site-packages). Not the rest of
    sys.path: a PYTHONPATH entry or a .pth line may name a whole checkout, configs and state included."""
    import importlib.util
    import site
    import sysconfig

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()}
    paths.update(sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))
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
    """The device files a worker uses, as they are when it starts (a GPU's appear once its driver loaded)."""
    import glob

    found = [Path(p) for p in CPU_DEVICES if os.path.exists(p)]
    if gpus:
        found += [Path(p) for pattern in GPU_DEVICE_GLOBS for p in glob.glob(pattern)]
    return found


def policy_for(*, abi: int, config_dir: Path, denied: Iterable[Path], shard_params: dict, gpus: bool,
               read_paths: Iterable[Path] = (), write_paths: Iterable[Path] = (),
               cache_dir: Path | None = None, keep_socket: str | None = None) -> Policy:
    """The sandbox every worker of an envoy shares (each adds its own folder with Policy.with_folder).

    ``denied``: the envoy config file, its TLS files and its work dir; they stay out of reach even where
    a granted folder holds them. ``gpus``: also the NVIDIA device files. ``keep_socket``: the one Unix
    socket the worker may reach (the daemon's proxy); the others it finds are covered (see ``isolate``)."""
    denied = [*denied, *map(Path, SYSTEM_SECRETS), *not_world_readable(Path("/etc"))]
    rules: list[tuple[str, int]] = []
    for path in (*map(Path, SYSTEM_READ), *python_paths(), *descriptor_paths(config_dir, shard_params),
                 *read_paths):
        rules += grant(path, landlock.READ, denied)
    for path in write_paths:
        rules += grant(path, landlock.READ_WRITE, denied)
    if cache_dir is not None:
        rules.append((str(cache_dir), landlock.READ_WRITE))
    unique = dict.fromkeys(rules)  # the same path may come from several places
    return Policy(rules=tuple(unique), abi=abi, gpus=gpus, keep_socket=keep_socket)


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


def enter(policy: Policy) -> list[str]:
    """Enter the sandbox: a mount namespace of its own where it can have one (``isolate``), then no
    capability, then the file system restricted to ``policy`` (plus the device files and, when private,
    /dev/shm). Must run while the process has one thread: Landlock restricts the calling thread and those
    it starts. Returns what could not be isolated, in words (the worker logs it)."""
    if threads() != 1:
        raise SandboxError(f"the worker has {threads()} threads when entering its sandbox; it must enter it "
                           "before anything starts a thread (numpy's import does)")
    private_shm, gaps = isolate(policy.keep_socket)
    rules = [*policy.rules, *((str(p), landlock.DEVICE) for p in device_paths(policy.gpus))]
    if private_shm:
        rules.append(("/dev/shm", landlock.READ_WRITE))
    drop_capabilities()
    landlock.restrict_self(rules, policy.abi)
    return gaps


_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 4096, 0x4000, 1 << 18
SOCKET_PLACES = ("/run", "/var/run", "/tmp", "/var/tmp", "/var/lib", "/dev")  # where services keep theirs


def isolate(keep_socket: str | None) -> tuple[bool, list[str]]:
    """A mount namespace of the worker's own (as root, or in a user namespace of its own otherwise) in
    which every Unix socket file under SOCKET_PLACES but ``keep_socket`` is covered with /dev/null and
    /dev/shm is a fresh tmpfs: Landlock does not control connecting to a socket by its path, and a worker of
    a root daemon would otherwise reach docker.sock, systemd or a root tmux. Returns whether /dev/shm is
    private, and what could not be done (a container without CAP_SYS_ADMIN and no user namespaces)."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNS if os.geteuid() == 0 else _CLONE_NEWNS | _CLONE_NEWUSER
    if libc.unshare(flags):
        why = os.strerror(ctypes.get_errno())
        return False, [f"no mount namespace of its own ({why}): the worker can connect to Unix sockets its uid may "
                       "reach (docker.sock, a tmux of the same user), and /dev/shm is not available to it"]
    try:
        if flags & _CLONE_NEWUSER:
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
            Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
        _mount(libc, b"none", b"/", None, _MS_REC | _MS_PRIVATE)  # nothing below reaches the host's mounts
    except OSError as exc:
        return False, [f"the worker's mount namespace could not be set up ({exc}): Unix sockets its uid may reach "
                       "stay reachable"]
    gaps, private_shm = [], False
    if os.path.isdir("/dev/shm"):
        try:
            _mount(libc, b"tmpfs", b"/dev/shm", b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=1777")
            private_shm = True
        except OSError as exc:
            gaps.append(f"/dev/shm stays out of reach ({exc})")
    keep = os.path.realpath(keep_socket) if keep_socket else None
    for socket_path in unix_sockets(SOCKET_PLACES):
        if socket_path != keep:
            try:
                _mount(libc, b"/dev/null", socket_path.encode(), None, _MS_BIND)
            except OSError as exc:
                gaps.append(f"could not cover the socket {socket_path} ({exc})")
    return private_shm, gaps


def _mount(libc, source: bytes, target: bytes, fstype: bytes | None, flags: int, data: bytes | None = None) -> None:
    if libc.mount(source, target, fstype, ctypes.c_ulong(flags), data):
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target.decode()}: {os.strerror(errno)}")


def unix_sockets(places: Iterable[str], depth: int = 4, limit: int = 50000) -> list[str]:
    """Socket files under ``places`` (real paths), at most ``depth`` folders down and ``limit`` entries."""
    found, looked = [], 0
    for place in places:
        if not os.path.isdir(place) or os.path.islink(place):
            continue
        base = place.rstrip("/").count("/")
        for folder, dirs, files in os.walk(place):
            looked += len(dirs) + len(files)
            if folder.count("/") - base >= depth or looked > limit:
                dirs[:] = []
            for name in files:
                path = os.path.join(folder, name)
                try:
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        found.append(os.path.realpath(path))
                except OSError:
                    continue
    return sorted(set(found))


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
