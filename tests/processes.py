"""Real director and envoy processes for tests: free loopback ports, readiness by log line, cleanup."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import yaml

from fedjax_core.local import Process, free_port  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDJAX_CIFAR10_DIR", REPO.parent / "shared" / "data" / "cifar10-subset"))
FEDJAX = [sys.executable, "-m", "fedjax_core"]


@contextlib.contextmanager
def fake_servers(add_to_server: Callable, connect: Callable[[int], Any]) -> Iterator[Callable[[Any], Any]]:
    """Fake gRPC services on loopback: yields ``start(servicer)``, which serves it (``add_to_server``, a generated
    ``add_..._to_server``) on a free port and returns ``connect(port)``, a client; every client is closed and
    every server stopped at the end."""
    started = []

    def start(servicer):
        server = grpc.server(futures.ThreadPoolExecutor(4))
        add_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append((server, None))
        client = connect(port)
        started[-1] = (server, client)
        return client

    try:
        yield start
    finally:
        for server, client in started:
            if client is not None:
                client.close()
            server.stop(None)


def run_benchmark(script: str, *args: str, timeout_s: float) -> str:
    """Run ``benchmarks/<script>`` to its end and return its output; fails the test if it exits non-zero or
    runs past ``timeout_s`` (then SIGTERM lets it stop the processes it started in their own sessions)."""
    proc = subprocess.Popen([sys.executable, "-u", str(REPO / "benchmarks" / script), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        raise AssertionError(f"{script} took over {timeout_s} s; output:\n{output}")
    assert proc.returncode == 0, f"{script} exited {proc.returncode}; output:\n{output}"
    return output


def assert_positive(record: dict, *keys: str) -> None:
    """Each dotted ``key`` of ``record`` (``"a.b"`` is ``record["a"]["b"]``) is a positive number."""
    for key in keys:
        value = record
        for part in key.split("."):
            value = value[part]
        assert isinstance(value, (int, float)) and value > 0, f"{key} = {value!r}, expected a positive number"


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def loaded_jax(pid: int) -> bool:
    """Whether process ``pid`` has JAX's native library mapped (False once it is gone)."""
    try:
        return "jaxlib" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def wait_until(condition, timeout_s: float, what: str):
    """``condition()`` once it is truthy; fails the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


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


def set_settings(config: Path, **settings) -> None:
    """Merge ``settings`` into the ``settings:`` of the envoy config at ``config``."""
    data = yaml.safe_load(config.read_text())
    data["settings"] = {**data.get("settings", {}), **settings}
    config.write_text(yaml.safe_dump(data))


class Stack:
    """A director and envoys on loopback, started with the CLI; ``stop()`` ends every process.

    With ``tls=True`` a PKI is made in ``workdir/pki`` (a certificate of role envoy per envoy, one
    of role director named ``director``, and one of role api for the notebook, ``api``) and every
    party talks mTLS.
    """

    def __init__(self, workdir: Path, n_envoys: int = 2, port: int | None = None, envoy_params: dict | None = None,
                 tls: bool = False, director_settings: dict | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.processes: list[Process] = []
        self.pki = workdir / "pki" if tls else None
        self.director_config = write_director_config(workdir / "director_config.yaml", self.port,
                                                     **(director_settings or {}))
        # the shard descriptor module lives in the tutorial's envoy folder
        (workdir / "cifar10_shard_descriptor.py").write_text((REPO / "envoy" / "cifar10_shard_descriptor.py").read_text())
        self.envoy_configs = [write_envoy_config(workdir / f"envoy_{i + 1}.yaml", i + 1, n_envoys, **(envoy_params or {}))
                              for i in range(n_envoys)]
        if self.pki is not None:
            from fedjax_core import pki

            pki.init_ca(self.pki)
            for name, config, role in [("director", self.director_config, "director"), ("api", None, "api"),
                                       *((f"env{i + 1}", c, "envoy") for i, c in enumerate(self.envoy_configs))]:
                pki.certify(self.pki, name, role=role)
                if config is not None:
                    add_tls_section(config, self.pki, name)
        self.director: Process | None = None

    @property
    def tls_flag(self) -> list[str]:
        return [] if self.pki else ["--disable-tls"]

    def federation(self):
        """A notebook-side connection to this stack's director."""
        from fedjax_core import Federation

        if self.pki is None:
            return Federation(director_node_fqdn="127.0.0.1", director_port=self.port, tls=False)
        return Federation(director_node_fqdn="127.0.0.1", director_port=self.port, tls=True,
                          cert_chain=str(self.pki / "root_ca.crt"), api_cert=str(self.pki / "api.crt"),
                          api_private_key=str(self.pki / "api.key"))

    def start_director(self) -> Process:
        self.director = Process([*FEDJAX, "director", "start", "-c", str(self.director_config), *self.tls_flag],
                                cwd=self.workdir, name="director")
        self.processes.append(self.director)
        self.director.wait_for(r"DIRECTOR READY")
        return self.director

    def start_envoy(self, index: int, env: dict | None = None, name: str | None = None,
                    args: Sequence[str] = ()) -> Process:
        """Envoy ``index`` (its config), under ``name`` if given; ``args`` go to `fedjax envoy start`."""
        name = name or f"env{index + 1}"
        p = Process([*FEDJAX, "envoy", "start", "-n", name, "-c", str(self.envoy_configs[index]),
                     "-dh", "127.0.0.1", "-dp", str(self.port), *self.tls_flag, *args], cwd=self.workdir, name=name,
                    env=env)
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


def add_tls_section(config_path: Path, pki_dir: Path, name: str) -> None:
    config = yaml.safe_load(config_path.read_text())
    config["tls"] = {"root_certificate": str(pki_dir / "root_ca.crt"), "certificate": str(pki_dir / f"{name}.crt"),
                     "private_key": str(pki_dir / f"{name}.key")}
    config_path.write_text(yaml.safe_dump(config))


def copy_tutorial(tmp_path: Path, port: int) -> tuple[Path, Path]:
    """director/ and envoy/ copied out of the repository, on a free port, reading the shared data."""
    skip = shutil.ignore_patterns("director_state", "logs", "envoy_workspace", "__pycache__")
    director = Path(shutil.copytree(REPO / "director", tmp_path / "director", ignore=skip))
    envoy = Path(shutil.copytree(REPO / "envoy", tmp_path / "envoy", ignore=skip))
    config = yaml.safe_load((director / "director_config.yaml").read_text())
    config["settings"]["listen_port"] = port
    (director / "director_config.yaml").write_text(yaml.safe_dump(config))
    for name in ("envoy_config.yaml", "envoy_config_2.yaml"):
        config = yaml.safe_load((envoy / name).read_text())
        config["shard_descriptor"]["params"]["data_dir"] = str(SHARED_DATA)
        (envoy / name).write_text(yaml.safe_dump(config))
    return director, envoy


def notebook_text(nb) -> str:
    """Everything an executed notebook printed (stdout streams and plain-text results), in cell order."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                parts.append(out["text"])
            elif out.get("output_type") in ("execute_result", "display_data") and "text/plain" in out.get("data", {}):
                parts.append(out["data"]["text/plain"] + "\n")
    return "".join(parts)
