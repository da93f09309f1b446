"""Linux Landlock, through its three system calls: a process restricts itself to the paths it names.

Landlock (Linux 5.13+) lets an unprivileged process give up file-system access it does not need; the
restriction holds for the process and everything it starts, survives execve, and cannot be undone. It
also stops the process from ptrace-attaching to (or reading the memory of) processes outside its domain
and, from ABI 6 (Linux 6.12), from signalling them. Rights newer than the running kernel's ABI are left
out of the ruleset, so they are simply not enforced there (``missing_rights`` names them).

Standard library only: the worker enters its sandbox before it imports numpy, whose thread pool would
otherwise start outside the sandbox (Landlock restricts the calling thread and the threads it starts).
The constants are the kernel's (include/uapi/linux/landlock.h); the system call numbers are the same on
every architecture.
"""
from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

# the file-system rights each ABI added, and the scopes
_FS_BY_ABI = {1: (1 << 13) - 1, 2: REFER, 3: TRUNCATE, 5: IOCTL_DEV}
_SCOPES_BY_ABI = {6: SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL}
# rights that may be granted on a file (not a directory) rule
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

READ = EXECUTE | READ_FILE | READ_DIR
LIST = READ_DIR
READ_WRITE = (1 << 16) - 1 & ~(MAKE_CHAR | MAKE_BLOCK | IOCTL_DEV)
DEVICE = READ_FILE | WRITE_FILE | IOCTL_DEV


class LandlockUnavailable(OSError):
    """This kernel (or the container's seccomp filter) offers no Landlock."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def abi_version() -> int:
    """The kernel's Landlock ABI version; LandlockUnavailable says why there is none."""
    if sys.platform != "linux":
        raise LandlockUnavailable(f"Landlock is Linux's; this is {sys.platform}")
    libc = _libc()
    version = libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    if version < 0:
        errno = ctypes.get_errno()
        why = {38: "the kernel was built without Landlock (CONFIG_SECURITY_LANDLOCK)",
               95: "Landlock is built in but not enabled: add landlock to the kernel's lsm= boot parameter",
               1: "a seccomp filter (e.g. a container runtime's default profile) forbids the Landlock system calls"}
        raise LandlockUnavailable(why.get(errno, f"landlock_create_ruleset failed: {os.strerror(errno)}"))
    return version


def handled_rights(abi: int) -> tuple[int, int]:
    """(file-system rights, scopes) that a ruleset on this ABI controls."""
    fs = sum(bits for since, bits in _FS_BY_ABI.items() if abi >= since)
    scopes = sum(bits for since, bits in _SCOPES_BY_ABI.items() if abi >= since)
    return fs, scopes


def missing_rights(abi: int) -> list[str]:
    """What a sandbox on this ABI cannot control, in words (empty from ABI 6 on)."""
    missing = []
    if abi < 2:
        missing.append("moving files between folders is refused altogether (ABI 2 allows it within the rules)")
    if abi < 3:
        missing.append("truncating a file by path (truncate(2)) is not controlled (ABI 3, Linux 6.2)")
    if abi < 5:
        missing.append("ioctl on device files is not controlled (ABI 5, Linux 6.10)")
    if abi < 6:
        missing.append("signals to processes outside the sandbox are not blocked (ABI 6, Linux 6.12)")
    return missing


def restrict_self(rules: Iterable[tuple[str, int]], abi: int) -> None:
    """Allow each ``(path, rights)`` and nothing else of the file system, for this thread and every
    process and thread it starts from now on; set no_new_privs first, as Landlock requires. A rule on a
    file keeps only the rights a file can have. Raises OSError naming the path that cannot be added."""
    libc = _libc()
    fs, scopes = handled_rights(abi)
    attr = _RulesetAttr(fs, 0, scopes)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # the struct grew with ABI 4 (net) and 6 (scoped)
    ruleset = libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        for path, rights in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                allowed = rights & fs if os.path.isdir(path) else rights & fs & _FILE_RIGHTS
                rule = _PathBeneathAttr(allowed, fd)
                if libc.syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)):
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"landlock_add_rule for {path}: {os.strerror(errno)}")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)):
            errno = ctypes.get_errno()
            raise OSError(errno, f"landlock_restrict_self: {os.strerror(errno)}")
    finally:
        os.close(ruleset)
