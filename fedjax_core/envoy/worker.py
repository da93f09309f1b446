"""The per-experiment worker: the only envoy process that imports JAX.

Started by the envoy daemon with the device and memory environment of the envoy config,
it loads the experiment bundle once, keeps its jit cache for every round, and exits when
the experiment ends, which hands accelerator memory back.

Started through start_worker.py, which enters the worker's sandbox first.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from concurrent import futures
from pathlib import Path
from typing import Any

from fedjax_core import bundle as bundle_io
from fedjax_core import code_sources
from fedjax_core import records as r
from fedjax_core.envoy.client import EnvoyClient
from fedjax_core.envoy.sandbox import ModulesBeside, Policy, explain
from fedjax_core.errors import FedError, PreconditionError
from fedjax_core.runtime.round_runner import RoundRunner
from fedjax_core.shard_descriptor import load_shard_descriptor


def _device_for(policy: str) -> str:
    import jax

    if policy == "CUDA_PREFERRED" and jax.default_backend() == "gpu":
        return f"cuda:{jax.devices()[0].id}"
    return "cpu"


def run_experiment(client: EnvoyClient, experiment: str, objects: dict[str, Any], policy: str,
                   sandbox: Policy | None = None) -> None:
    import jax

    model_interface, ti, data = objects["model_interface"], objects["task_interface"], objects["data_interface"]
    device = _device_for(policy)
    with jax.default_device(jax.devices("cpu")[0]) if policy == "CPU_ONLY" else contextlib.nullcontext():
        _Rounds(client, experiment, model_interface, ti, data, device, sandbox).run()


def _mesh_if_asked(ti, device: str):
    """The envoy's device mesh when a task was registered with ``mesh=``; devices of the policy's platform."""
    if not any(contract.get("mesh") for contract in ti.task_contract.values()):
        return None
    import jax

    from fedjax_core.parallel import envoy_mesh

    return envoy_mesh(jax.devices("cpu") if device == "cpu" else jax.devices())


class MetricReports:
    """A worker's metric reports, sent in order on a thread of their own, so the next task starts without
    waiting for the director's answer. ``wait()`` returns once all are sent and raises the first failure; the
    round's upload waits for them, since the director closes the round on its last upload."""

    def __init__(self, client: EnvoyClient):
        self._client = client
        self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix="metric-reports")
        self._sent: list[futures.Future] = []

    def send(self, experiment: str, round_: int, stage: str, metrics: dict[str, dict[str, float]],
             sample_count: int) -> None:
        self._sent.append(self._pool.submit(self._client.report_metrics, experiment, round_, stage, metrics,
                                            sample_count))

    def wait(self, raise_first: bool = True) -> None:
        sent, self._sent = self._sent, []
        errors = [e for e in (f.exception() for f in sent) if e is not None]
        if errors and raise_first:
            raise errors[0]
        for error in errors:  # a task failed already: that is what gets reported; these are only logged
            print(f"[worker {self._client.envoy_name}] a metric report was not taken: {error}", file=sys.stderr,
                  flush=True)


class _Rounds:
    """Runs the rounds of one experiment in this process, keeping state (and jit caches) between them."""

    def __init__(self, client: EnvoyClient, experiment: str, model_interface, ti, data, device: str,
                 sandbox: Policy | None = None):
        from fedjax_core.runtime.model_tensors import canonicalize

        self.client, self.experiment, self.sandbox = client, experiment, sandbox
        mesh = _mesh_if_asked(ti, device)
        template = model_interface.model
        if mesh is not None:  # replicated once: every model restored from the wire keeps that placement
            from fedjax_core.parallel import replicate

            template = replicate(template, mesh)
        self.reports = MetricReports(client)
        self.runner = RoundRunner(client, self.reports, experiment, canonicalize(template), model_interface.optimizer,
                                  ti, data, device, mesh, log=lambda text: print(text, flush=True))

    def run(self) -> None:
        while True:
            task = self.client.wait_task(self.experiment)
            if task.kind == r.TaskKind.FINISHED:
                print(f"[worker {self.client.envoy_name}] experiment {self.experiment!r} finished", flush=True)
                return
            if task.kind == r.TaskKind.NONE:
                continue
            try:
                try:
                    self.runner.run_round(task)
                except BaseException:  # its reports are sent (or fail) before anything else is said
                    self.reports.wait(raise_first=False)
                    raise
                self.reports.wait()
            except PreconditionError as exc:  # the round closed at its deadline without us, or moved on
                print(f"[worker {self.client.envoy_name}] round {task.round} went on without this envoy: {exc}",
                      flush=True)
            except Exception as exc:  # a task failed: this envoy drops out of the round, and may rejoin the next
                text = traceback.format_exc() + explain(exc, self.sandbox)
                print(f"[worker {self.client.envoy_name}] round {task.round} failed:\n{text}", file=sys.stderr,
                      flush=True)
                try:  # the reports held for the upload that did not happen go first, as they would have
                    self.client.send_held_reports(self.experiment, task.round)
                except (FedError, ConnectionError) as error:
                    print(f"[worker {self.client.envoy_name}] the round's metric reports were not taken: {error}",
                          file=sys.stderr, flush=True)
                try:
                    self.client.report_failure(self.experiment, f"{type(exc).__name__}: {exc}\n{text[-3000:]}",
                                               round_=task.round)
                except PreconditionError:  # the round went on (or closed) meanwhile: nothing to drop out of
                    pass


def unpickle_experiment(payload: bytes) -> dict[str, Any]:
    """The notebook's interfaces; a module this envoy lacks is named, with the two ways to fix it."""
    import cloudpickle

    try:
        return cloudpickle.loads(payload)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"the experiment's code needs module {exc.name!r}, which this envoy cannot import. Install it on the "
            f"envoy, or make its code travel with the experiment: in the notebook, `import {exc.name}` and pass "
            f"FLExperiment.start(..., pickle_by_value=[{exc.name}]) (modules that belong to no installed "
            "distribution travel that way already)", name=exc.name) from None


def cpu_only() -> None:
    """Keep JAX off accelerators: before it starts (the variable), or when a standby imported it already."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # JAX read the variable at import; its backends start at first use
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def use_compilation_cache(path: str) -> None:
    """Keep and reuse compiled programs in ``path`` (params.jax_compilation_cache: this submitter's folder),
    small ones too; set before the first compilation, so also in a standby that imported JAX already."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(spec_path: Path, sandbox: Policy | None) -> int:
    """Run the experiment of the spec at ``spec_path``, inside the ``sandbox`` that start_worker.py
    entered (None when the envoy runs workers unsandboxed)."""
    spec = json.loads(Path(spec_path).read_text())
    # under TLS the daemon's local proxy (a unix: socket) carries every call, so the worker holds no key;
    # in plaintext (loopback only) the target is the director's host:port
    client = EnvoyClient(spec["envoy_name"], spec["director_target"], None, token=spec.get("proxy_token"))
    experiment = spec["experiment"]
    try:
        bundle = bundle_io.read(Path(spec["bundle_path"]))
        for warning in bundle_io.check_versions(bundle.meta):
            print(f"[worker {spec['envoy_name']}] version note: {warning}", flush=True)
        policy = bundle.meta.get("device_assignment_policy", "CUDA_PREFERRED")
        if policy == "CPU_ONLY":
            cpu_only()
        if spec.get("compilation_cache_dir"):
            use_compilation_cache(spec["compilation_cache_dir"])
        sys.path.insert(0, spec["shard_base_dir"])
        if sandbox is not None:
            ModulesBeside(spec["shard_base_dir"]).install()
        sources = bundle.meta.get("sources")
        if isinstance(sources, dict):  # tracebacks name the user's files and lines
            code_sources.install(sources)
        objects = unpickle_experiment(bundle.payload)
        shard = load_shard_descriptor(spec["shard_template"], spec["shard_params"], Path(spec["shard_base_dir"]))
        objects["data_interface"].shard_descriptor = shard
        run_experiment(client, experiment, objects, policy, sandbox)
        return 0
    except Exception as exc:  # report anything to the notebook, then exit non-zero
        text = traceback.format_exc() + explain(exc, sandbox)
        print(f"[worker {spec['envoy_name']}] experiment {experiment!r} failed:\n{text}", file=sys.stderr, flush=True)
        try:
            client.report_failure(experiment, f"{type(exc).__name__}: {exc}\n{text[-3000:]}")
        except Exception as report_exc:  # the director may be gone; the envoy log keeps the traceback
            print(f"[worker] could not report the failure: {report_exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        client.close()

