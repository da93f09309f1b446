"""``Federation``: the notebook's connection to the director."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedjax_core import records as r
from fedjax_core.api.client import FederationClient
from fedjax_core.shard_descriptor import DummyShardDescriptor
from fedjax_core.transport import TLSFiles


class FederationView:
    """What a notebook reads of a federation through its ``client`` (a director's, or a simulation's): the
    shard registry, the samples' shapes, the experiments."""

    client: Any
    sample_shape: list[str]
    target_shape: list[str]

    def get_shard_registry(self) -> dict[str, dict]:
        """Per envoy: shard info, whether it is online, when it was last seen, its current experiment."""
        return registry_table(self.client.shard_registry())

    def get_dummy_shard_descriptor(self, size: int) -> DummyShardDescriptor:
        """A data-free stand-in with the federation's sample and target shapes, to build models against."""
        return DummyShardDescriptor(self.sample_shape, self.target_shape, size)

    def list_experiments(self) -> list[r.ExperimentStatus]:
        return self.client.experiments()

    def close(self) -> None:
        self.client.close()


class Federation(FederationView):
    """A director and the envoys registered with it.

    ``tls=True`` (the default) needs ``cert_chain`` (the federation's root CA),
    ``api_cert`` and ``api_private_key``, as made by ``fedjax pki``. Under mTLS the
    certificate's name identifies the notebook and ``client_id`` is ignored.
    """

    def __init__(self, client_id: str = "api", director_node_fqdn: str = "localhost", director_port: int = 50055,
                 tls: bool = True, cert_chain: str | None = None, api_cert: str | None = None,
                 api_private_key: str | None = None, timeout_s: float = 10.0):
        self.client_id = client_id
        self.director_node_fqdn = director_node_fqdn
        try:
            self.director_port = int(director_port)
        except (TypeError, ValueError):
            raise ValueError(f"director_port must be a port number such as 50055, got {director_port!r}") from None
        self.timeout_s = timeout_s
        tls_files = None
        if tls:
            if not (cert_chain and api_cert and api_private_key):
                raise ValueError("Federation(tls=True) needs cert_chain, api_cert and api_private_key "
                                 "(made by `fedjax pki`), or tls=False for a director started with --disable-tls")
            tls_files = TLSFiles(Path(cert_chain), Path(api_cert), Path(api_private_key))
        self.client = FederationClient(director_node_fqdn, self.director_port, tls_files, timeout_s)
        self.sample_shape, self.target_shape = self.client.dataset_info()


def registry_table(entries: Iterable[r.EnvoyEntry]) -> dict[str, dict]:
    """The shard registry as the notebook shows it, by envoy name (a federation's, or a simulation's)."""
    out = {}
    for entry in entries:
        info = entry.shard_info
        out[entry.name] = {
            "shard_info": {"description": info.description, "n_samples": {"train": info.train_size,
                                                                          "valid": info.valid_size},
                           "sample_shape": list(info.sample_shape), "target_shape": list(info.target_shape),
                           "hostname": info.hostname, "devices": list(info.devices),
                           "label_counts": list(info.label_counts)},
            "is_online": entry.is_online,
            "last_updated": entry.last_seen,
            "current_experiment": entry.current_experiment or None,
        }
    return out
