"""``Federation``: the notebook's connection to the director."""
from __future__ import annotations

from pathlib import Path

import grpc

from fedjax_core import records as r
from fedjax_core import serde
from fedjax_core.proto import federation_service_pb2 as fed_pb
from fedjax_core.proto import federation_service_pb2_grpc as fed_grpc
from fedjax_core.shard_descriptor import DummyShardDescriptor
from fedjax_core.transport import TLSFiles, open_channel, raise_domain_error


class Federation:
    """A director and the envoys registered with it.

    ``tls=True`` (the default) needs ``cert_chain`` (the federation's root CA),
    ``api_cert`` and ``api_private_key``, as made by ``fedjax pki``.
    """

    def __init__(self, client_id: str = "api", director_node_fqdn: str = "localhost", director_port: int = 50055,
                 tls: bool = True, cert_chain: str | None = None, api_cert: str | None = None,
                 api_private_key: str | None = None, timeout_s: float = 10.0):
        self.client_id = client_id
        self.director_node_fqdn = director_node_fqdn
        self.director_port = int(director_port)
        self.timeout_s = timeout_s
        tls_files = None
        if tls:
            if not (cert_chain and api_cert and api_private_key):
                raise ValueError("Federation(tls=True) needs cert_chain, api_cert and api_private_key "
                                 "(made by `fedjax pki`), or tls=False for a director started with --disable-tls")
            tls_files = TLSFiles(Path(cert_chain), Path(api_cert), Path(api_private_key))
        self.channel = open_channel(director_node_fqdn, self.director_port, tls_files)
        self.stub = fed_grpc.FederationServiceStub(self.channel)
        self.sample_shape, self.target_shape = self._dataset_info()

    def call(self, method: str, request, timeout: float | None = None):
        """One unary call; connection problems become a ConnectionError saying what to check."""
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout_s)
        except grpc.RpcError as exc:
            raise_domain_error(exc)
            raise self.connection_error(exc) from None

    def connection_error(self, exc: grpc.RpcError) -> ConnectionError:
        return ConnectionError(
            f"cannot reach the director at {self.director_node_fqdn}:{self.director_port} "
            f"({exc.code().name}: {exc.details()}). Is it running? Check director_node_fqdn, director_port and "
            "that tls= matches how the director was started.")

    def _dataset_info(self) -> tuple[list[str], list[str]]:
        info = self.call("GetDatasetInfo", fed_pb.GetDatasetInfoRequest())
        return list(info.sample_shape), list(info.target_shape)

    def get_shard_registry(self) -> dict[str, dict]:
        """Per envoy: shard info, whether it is online, when it was last seen, its current experiment."""
        reply = self.call("GetShardRegistry", fed_pb.GetShardRegistryRequest())
        out = {}
        for entry in (serde.envoy_entry_from_proto(e) for e in reply.envoys):
            info = entry.shard_info
            out[entry.name] = {
                "shard_info": {"description": info.description, "n_samples": {"train": info.train_size,
                                                                              "valid": info.valid_size},
                               "sample_shape": list(info.sample_shape), "target_shape": list(info.target_shape),
                               "hostname": info.hostname, "devices": list(info.devices)},
                "is_online": entry.is_online,
                "last_updated": entry.last_seen,
                "current_experiment": entry.current_experiment or None,
            }
        return out

    def get_dummy_shard_descriptor(self, size: int) -> DummyShardDescriptor:
        """A data-free stand-in with the federation's sample and target shapes, to build models against."""
        return DummyShardDescriptor(self.sample_shape, self.target_shape, size)

    def list_experiments(self) -> list[r.ExperimentStatus]:
        reply = self.call("ListExperiments", fed_pb.ListExperimentsRequest())
        return [serde.status_from_proto(s) for s in reply.experiments]

    def close(self) -> None:
        self.channel.close()
