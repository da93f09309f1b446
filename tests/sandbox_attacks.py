"""Experiment code that attacks the envoy it runs on: each attempt is a metric, 1.0 when it succeeded.

It travels to the envoy like any notebook code (pickled by value) and runs as a training task inside
the worker. ``targets`` names what the attacker knows of the machine's layout (the envoy's key, a key
beside the descriptor, the work dir, the director's state on the same machine)."""
from __future__ import annotations

import ctypes
import glob
import json
import os
import socket
import subprocess
import tempfile
from pathlib import Path

from fedjax_core import TaskInterface

SECRET = "hunter2"  # the value of a variable in the envoy daemon's environment


def _tried(attempt) -> float:
    try:
        return 1.0 if attempt() else 0.0
    except OSError:
        return 0.0


def _read(path: str | Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(64) or b"(empty)"


def _write(path: str | Path, text: str = "planted by an experiment") -> bool:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return True


def _config_from_cmdline(pid: int) -> bytes:
    """The file after -c on the daemon's command line: the envoy's config."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return _read(argv[argv.index("-c") + 1])


def _earlier_bundles(work_dir: str) -> bool:
    """Any bundle of another experiment: found by listing the work dir, or where one used to be left."""
    guessed = glob.glob(f"{work_dir}/*/*/bundle.bin") + glob.glob(f"{work_dir}/*/bundles/*.bin") + glob.glob(
        f"{work_dir}/*/runs/*/bundle.bin") + [f"{work_dir}/env1/review/bundle.bin", f"{work_dir}/env1/bundles/review.bin"]
    own = targets_own_bundle()
    return any(_tried(lambda p=p: _read(p)) for p in guessed if os.path.realpath(p) not in own)


def targets_own_bundle() -> set[str]:
    """This worker's own bundle (the one file named bundle.bin it may read), under either layout."""
    return {os.path.realpath(Path(tempfile.gettempdir()).parent / "bundle.bin")}


def _daemon_memory(pid: int) -> bool:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            start = int(line.split("-", 1)[0], 16)
            try:
                mem.seek(start)
                return bool(mem.read(16))
            except OSError:
                continue
    return False


def _ptrace_daemon(pid: int) -> bool:
    """PTRACE_SEIZE attaches without stopping the daemon; the kernel detaches when this worker exits."""
    return ctypes.CDLL(None, use_errno=True).ptrace(0x4206, pid, 0, 0) == 0


def _service_socket(path: str) -> bool:
    """A root service's Unix socket (docker.sock, systemd, a root tmux): Landlock does not cover connect()."""
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(5)
        client.connect(path)
        return client.recv(16) == b"root shell\n"


def _leftover_child() -> int:
    """A process the experiment leaves behind in its worker's process group; its pid."""
    return subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL).pid


def _multiprocessing_lock() -> bool:
    import multiprocessing

    with multiprocessing.Lock():  # a POSIX semaphore in /dev/shm
        return True


def attacks(targets: dict[str, str]) -> dict[str, float]:
    daemon = os.getppid()
    work_dir, config_dir = targets["work_dir"], targets["config_dir"]
    return {
        "daemon_environ": _tried(lambda: SECRET.encode() in Path(f"/proc/{daemon}/environ").read_bytes()),
        "daemon_memory": _tried(lambda: _daemon_memory(daemon)),
        "daemon_ptrace": _tried(lambda: _ptrace_daemon(daemon)),
        "daemon_signal": _tried(lambda: os.kill(daemon, 0) is None),
        "config_from_cmdline": _tried(lambda: _config_from_cmdline(daemon)),
        "envoy_key": _tried(lambda: _read(targets["envoy_key"])),
        "key_beside_descriptor": _tried(lambda: _read(targets["key_beside"])),
        "work_dir_listing": _tried(lambda: os.listdir(work_dir) is not None),
        "earlier_bundle": _tried(lambda: _earlier_bundles(work_dir)),
        "director_state": _tried(lambda: _read(targets["director_db"])),
        "review_decision": _tried(lambda: _write(f"{work_dir}/env1/review/decisions/later.json",
                                                 json.dumps({"experiment": "later", "approve": True}))),
        "sitecustomize": _tried(lambda: _write(f"{config_dir}/sitecustomize.py", "print('every later worker')")),
        "write_config_dir": _tried(lambda: _write(f"{config_dir}/planted.txt")),
        "write_tmp": _tried(lambda: _write("/tmp/fedjax-sandbox-attack/planted.txt")),
        "service_socket": _tried(lambda: _service_socket(targets["service_socket"])),
        "daemons_session": float(os.getsid(0) == os.getsid(daemon)),
        "daemons_folder": float(os.getcwd() == targets["daemon_cwd"]),
        # what the worker must still be able to do
        "own_tmp_write": _tried(lambda: _write(Path(tempfile.gettempdir()) / "fedjax-scratch.txt")),
        "own_home_write": _tried(lambda: _write(Path.home() / ".cache" / "fedjax-scratch.txt")),
        "multiprocessing_lock": _tried(_multiprocessing_lock),
        "dev_shm_write": _tried(lambda: _write(f"/dev/shm/{targets['shm_name']}")),  # its own /dev/shm
        "leftover_pid": float(_leftover_child()),
    }


def attack_tasks(targets: dict[str, str]) -> TaskInterface:
    """A training task that attacks (and trains nothing), and a validation task that measures nothing."""
    TI = TaskInterface()

    @TI.register_fl_task(model="state", data_loader="dataset", optimizer="optimizer", device="device")
    def train(state, dataset, optimizer, device):
        return attacks(targets)

    @TI.register_fl_task(model="state", data_loader="dataset", device="device")
    def validate(state, dataset, device):
        return {"samples": float(len(dataset["label"]))}

    return TI
