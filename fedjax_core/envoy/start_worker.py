"""How a worker process begins: it enters its sandbox, then becomes the worker (worker.py).

    python -s -m fedjax_core.envoy.start_worker DAEMON_PID RUN_DIR            # a cold worker
    python -s -m fedjax_core.envoy.start_worker --standby DAEMON_PID RUN_DIR  # started ahead (launch.py)

RUN_DIR is the worker's own folder (workdir.py). The sandbox (sandbox.py) is entered first, from
RUN_DIR/sandbox.json, while this process has one thread: only the standard library is imported until
then (numpy's import starts a thread pool, which must start inside the sandbox). A standby then imports
JAX and the rest ahead and waits for one line on stdin, the daemon's word that its spec is in RUN_DIR.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
from pathlib import Path

from fedjax_core.envoy import sandbox

_PR_SET_PDEATHSIG = 1
STANDBY_IMPORTS = ("jax", "jax.numpy", "flax.linen", "flax.training.train_state", "optax", "cloudpickle",
                   "fedjax_core.runtime.model_tensors", "fedjax_core.codecs", "fedjax_core.runtime.tasks",
                   "fedjax_core.envoy.worker")


def die_with_parent(parent_pid: int) -> None:
    """Exit when the envoy daemon dies (even by SIGKILL), so a restarted daemon never finds a twin."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the daemon's shutdown still terminates us
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(1)


def enter_sandbox(run_dir: Path) -> sandbox.Policy | None:
    """The policy the daemon wrote for this worker, entered; None when the operator turned it off."""
    policy = sandbox.Policy.read(run_dir / sandbox.POLICY_FILE)
    if policy is not None:
        for gap in sandbox.enter(policy):
            print(f"[worker] sandbox: {gap}", file=sys.stderr, flush=True)
    return policy


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    standby = argv[:1] == ["--standby"]
    parent_pid, run_dir = int(argv[-2]), Path(argv[-1])
    die_with_parent(parent_pid)
    if standby:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the daemon's terminal is the daemon's
    try:
        policy = enter_sandbox(run_dir)
    except (OSError, ValueError, sandbox.SandboxError) as exc:
        print(f"[worker] cannot enter the sandbox described in {run_dir / sandbox.POLICY_FILE}: {exc}",
              file=sys.stderr, flush=True)
        return 3
    if standby:
        for module in STANDBY_IMPORTS:
            importlib.import_module(module)
        if not sys.stdin.readline().strip():  # end of input: the daemon stopped, or wants no standby
            return 0
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, a worker like a cold one
    from fedjax_core.envoy import worker

    return worker.main(run_dir / "worker.json", policy)


if __name__ == "__main__":
    sys.exit(main())
