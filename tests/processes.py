"""Real director and envoy processes for tests: free loopback ports, readiness by log line, cleanup."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from fedjax_core.local import Process, free_port  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDJAX_CIFAR10_DIR", REPO.parent / "shared" / "data" / "cifar10-subset"))
FEDJAX = [sys.executable, "-m", "fedjax_core"]


def write_director_config(path: Path, port: int, **settings) -> Path:
    config = {"settings": {"listen_host": "127.0.0.1", "listen_port": port, "sample_shape": ["32", "32", "3"],
                           "target_shape": ["1"], "envoy_health_check_period": 1,
                           "state_dir": str(path.parent / "director_state"), "log_dir": str(path.parent / "logs"),
                           **settings}}
    path.write_text(yaml.safe_dump(config))
    return path


def write_envoy_config(path: Path, rank: int, world: int, **params) -> Path:
    config = {"params": {"cuda_devices": [], "work_dir": str(path.parent / "envoy_workspace"), **params},
              "optional_plugin_components": {},
              "shard_descriptor": {"template": "cifar10_shard_descriptor.CIFAR10ShardDescriptor",
                                   "params": {"rank_worldsize": f"{rank}, {world}", "data_dir": str(SHARED_DATA)}}}
    path.write_text(yaml.safe_dump(config))
    return path


class Stack:
    """A director and envoys on loopback, started with the CLI; ``stop()`` ends every process."""

    def __init__(self, workdir: Path, n_envoys: int = 2, port: int | None = None, envoy_params: dict | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.processes: list[Process] = []
        self.director_config = write_director_config(workdir / "director_config.yaml", self.port)
        for i in range(n_envoys):
            config = write_envoy_config(workdir / f"envoy_{i + 1}.yaml", i + 1, n_envoys, **(envoy_params or {}))
            # the shard descriptor module lives in the tutorial's envoy folder
            (workdir / "cifar10_shard_descriptor.py").write_text((REPO / "envoy" / "cifar10_shard_descriptor.py").read_text())
            self.envoy_configs = [*getattr(self, "envoy_configs", []), config]
        self.director: Process | None = None

    def start_director(self) -> Process:
        self.director = Process([*FEDJAX, "director", "start", "-c", str(self.director_config), "--disable-tls"],
                                cwd=self.workdir, name="director")
        self.processes.append(self.director)
        self.director.wait_for(r"DIRECTOR READY")
        return self.director

    def start_envoy(self, index: int, env: dict | None = None) -> Process:
        name = f"env{index + 1}"
        p = Process([*FEDJAX, "envoy", "start", "-n", name, "-c", str(self.envoy_configs[index]),
                     "-dh", "127.0.0.1", "-dp", str(self.port), "--disable-tls"], cwd=self.workdir, name=name, env=env)
        self.processes.append(p)
        return p

    def start(self, envoy_env: dict[int, dict] | None = None) -> Stack:
        """Director, then every envoy (``envoy_env`` adds environment variables per envoy index)."""
        self.start_director()
        envoys = [self.start_envoy(i, (envoy_env or {}).get(i)) for i in range(len(self.envoy_configs))]
        for e in envoys:
            e.wait_for(r"ENVOY READY")
        return self

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()

    def logs(self) -> str:
        return "\n\n".join(f"===== {p.name} =====\n{p.output()}" for p in self.processes)
