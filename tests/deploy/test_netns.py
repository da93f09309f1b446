"""A director, two envoys and a notebook as four hosts: Linux network namespaces on one bridge, over mTLS.

Each party runs in a network namespace of its own with its own address (10.231.7.0/24); the
namespaces are joined by veth pairs to a bridge that lives in a fifth namespace, so nothing
changes in the machine's own network. Needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN): the
test tries ``ip netns add`` and a veth pair first and skips, saying why, where it cannot.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fedjax_core import pki
from processes import FEDJAX, REPO, Process, add_tls_section, write_director_config, write_envoy_config

SUBNET = "10.231.7"
ADDRESSES = {"director": f"{SUBNET}.1", "env1": f"{SUBNET}.2", "env2": f"{SUBNET}.3", "notebook": f"{SUBNET}.4"}
PORT = 50055  # each namespace has its own ports: no clash with anything on the machine
NOTEBOOK = Path(__file__).with_name("netns_notebook.py")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def netns_unavailable() -> str | None:
    """Why network namespaces with veth pairs cannot be made here (found by trying), or None."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"fjx-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return (f"`ip netns add` is not allowed here (uid {os.getuid()}; needs root or CAP_SYS_ADMIN): "
                    f"{made.stderr.strip()}")
        veth = _ip("-n", probe, "link", "add", "name", "probe0", "type", "veth", "peer", "name", "probe1",
                   check=False)
        if veth.returncode != 0:
            return f"cannot make a veth pair in a network namespace: {veth.stderr.strip()}"
        return None
    finally:
        _ip("netns", "del", probe, check=False)


class Hosts:
    """One network namespace per host, each with ``eth0`` at its address, bridged in a hub namespace."""

    def __init__(self, addresses: dict[str, str]):
        self.addresses = addresses
        self.tag = f"fjx-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def _add(self, host: str) -> str:
        _ip("netns", "add", self.ns(host))
        self.made.append(self.ns(host))
        _ip("-n", self.ns(host), "link", "set", "lo", "up")
        return self.ns(host)

    def up(self) -> None:
        hub = self._add("hub")
        _ip("-n", hub, "link", "add", "name", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, (host, address) in enumerate(self.addresses.items()):
            ns = self._add(host)
            _ip("-n", ns, "link", "add", "name", "eth0", "type", "veth", "peer", "name", f"port{i}", "netns", hub)
            _ip("-n", hub, "link", "set", f"port{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def down(self) -> None:
        """Delete every namespace made (their veth pairs go with them)."""
        for ns in reversed(self.made):
            _ip("netns", "del", ns, check=False)
        self.made.clear()

    def start(self, host: str, args: list[str], cwd: Path) -> Process:
        return Process(["ip", "netns", "exec", self.ns(host), *args], cwd=cwd, name=host)

    def connects(self, host: str, address: str, port: int) -> bool:
        """Whether a TCP connection from ``host`` to ``address:port`` is accepted."""
        probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=5).close()"
        return subprocess.run(["ip", "netns", "exec", self.ns(host), sys.executable, "-c", probe],
                              capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def netns_ok() -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"needs Linux network namespaces: {reason}")


def _federation_files(workdir: Path) -> tuple[Path, list[Path], Path]:
    """Configs for the director (listening on its own address) and two envoys, and a PKI whose
    director certificate carries the director's address."""
    pki_dir = workdir / "pki"
    pki.init_ca(pki_dir)
    director_config = write_director_config(workdir / "director_config.yaml", PORT,
                                            listen_host=ADDRESSES["director"])
    shutil.copy(REPO / "envoy" / "cifar10_shard_descriptor.py", workdir)
    envoy_configs = [write_envoy_config(workdir / f"envoy_{rank}.yaml", rank, 2) for rank in (1, 2)]
    pki.certify(pki_dir, "director", [ADDRESSES["director"]], role="director")
    add_tls_section(director_config, pki_dir, "director")
    for name, config in zip(("env1", "env2"), envoy_configs):
        pki.certify(pki_dir, name, role="envoy")
        add_tls_section(config, pki_dir, name)
    pki.certify(pki_dir, "api", role="api")
    return director_config, envoy_configs, pki_dir


def test_experiment_across_network_namespaces(netns_ok, tmp_path):
    hosts = Hosts(ADDRESSES)
    processes: list[Process] = []
    try:
        director_config, envoy_configs, pki_dir = _federation_files(tmp_path)
        hosts.up()
        director = hosts.start("director", [*FEDJAX, "director", "start", "-c", str(director_config)], tmp_path)
        processes.append(director)
        director.wait_for(rf"DIRECTOR READY {ADDRESSES['director']}:{PORT}")
        for name, config in zip(("env1", "env2"), envoy_configs):
            processes.append(hosts.start(name, [*FEDJAX, "envoy", "start", "-n", name, "-c", str(config),
                                                "-dh", ADDRESSES["director"], "-dp", str(PORT)], tmp_path))
        for envoy in processes[1:]:
            envoy.wait_for(r"ENVOY READY")
        assert "mTLS" in director.output()
        # separate hosts: from an envoy's namespace the director is at its address, not on loopback
        assert hosts.connects("env1", ADDRESSES["director"], PORT)
        assert not hosts.connects("env1", "127.0.0.1", PORT)

        notebook = hosts.start("notebook", [sys.executable, str(NOTEBOOK), ADDRESSES["director"], str(PORT),
                                            str(pki_dir)], tmp_path)
        processes.append(notebook)
        notebook.wait_for(r"REGISTRY \['env1', 'env2'\]", timeout=120)
        state = notebook.wait_for(r"^STATE (\w+)", timeout=400)
        assert state.group(1) == "finished", notebook.output()
        assert notebook.proc.wait(timeout=60) == 0
    except BaseException:
        print("\n\n".join(f"===== {p.name} =====\n{p.output()}" for p in processes))
        raise
    finally:
        for p in reversed(processes):
            p.stop()
        hosts.down()
