"""The per-experiment worker: the only envoy process that imports JAX.

Started by the envoy daemon with the device and memory environment of the envoy config,
it loads the experiment bundle once, keeps its jit cache for every round, and exits when
the experiment ends, which hands accelerator memory back.

Started through start_worker.py, which enters the worker's sandbox first.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import traceback
from concurrent import futures
from pathlib import Path
from typing import Any

from fedjax_core import bundle as bundle_io
from fedjax_core import records as r
from fedjax_core.envoy.client import EnvoyClient
from fedjax_core.envoy.sandbox import ModulesBeside, Policy, explain
from fedjax_core.errors import PreconditionError
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


class OptimizerInit:
    """``state.tx.init(state.params)`` for RESET rounds, compiled once: run op by op, it compiles every
    zeros_like on its own (0.3 s of the seed CNN's first round). An init that cannot be traced (it branches
    on values, or leaves JAX) runs op by op from then on, as does one on a mesh (``eager``)."""

    def __init__(self, eager: bool = False):
        self._compiled = False if eager else None

    def __call__(self, state):
        import jax

        if self._compiled is False:
            return state.tx.init(state.params)
        if self._compiled is None:
            self._compiled = jax.jit(state.tx.init)
        try:
            return self._compiled(state.params)
        except jax.errors.JAXTypeError:
            self._compiled = False
            return state.tx.init(state.params)


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

        self.client, self.experiment, self.ti, self.device = client, experiment, ti, device
        self.sandbox = sandbox
        self.optimizer = model_interface.optimizer
        self.mesh = _mesh_if_asked(ti, device)
        template = model_interface.model
        if self.mesh is not None:  # replicated once: every model restored from the wire keeps that placement
            from fedjax_core.parallel import replicate

            template = replicate(template, self.mesh)
        self.template = canonicalize(template)
        self.local_state = self.template  # kept between rounds for CONTINUE_LOCAL and between averagings
        self.global_tensors = None  # the last global model received: what deltas and divergences measure from
        self.global_state = None  # the same as a state, for tasks that take global_model= (FedProx)
        self.fresh_opt_state = OptimizerInit(eager=self.mesh is not None)
        self.reports = MetricReports(client)
        self.train_loader, self.valid_loader = data.get_train_loader(), data.get_valid_loader()
        self.n_train, self.n_valid = int(data.get_train_data_size()), int(data.get_valid_data_size())

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
                    self._round(task)
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
                try:
                    self.client.report_failure(self.experiment, f"{type(exc).__name__}: {exc}\n{text[-3000:]}",
                                               round_=task.round)
                except PreconditionError:  # the round went on (or closed) meanwhile: nothing to drop out of
                    pass

    def _run_tasks(self, names: list[str], state, loader, task: r.Task, train: bool, global_state):
        """Run ``names`` in order; training tasks hand their state on, validation tasks only measure."""
        from fedjax_core.runtime.tasks import run_task

        round_kwargs = json.loads(task.task_kwargs) if task.task_kwargs else {}
        metrics = {}
        for name in names:
            after, metrics[name] = run_task(self.ti, name, state, loader, self.device, self.optimizer, task.round,
                                            round_kwargs.get(name), global_state, self.mesh)
            if train:
                state = after
        return state, metrics

    def _starting_state(self, task: r.Task):
        """The round's global model as a state (kept as the reference for deltas and divergences)."""
        from fedjax_core.runtime.model_tensors import canonicalize, tensors_to_state

        received = self.client.round_model(self.experiment, task.round)
        self.global_tensors = received
        if task.opt_treatment == "CONTINUE_LOCAL":
            return tensors_to_state(self.local_state, received)
        state = tensors_to_state(self.template, received)
        if task.opt_treatment == "RESET" and hasattr(state, "tx"):
            state = state.replace(opt_state=canonicalize(self.fresh_opt_state(state)), step=self.template.step)
        return state

    def _round(self, task: r.Task) -> None:
        exp, rnd = self.experiment, task.round
        if task.kind == r.TaskKind.SYNC:  # dynamic averaging was triggered after this envoy checked in
            self._upload(task, self.local_state)
            return
        if task.from_global or self.global_tensors is None:  # a new worker has no model of its own yet
            state = self._starting_state(task)
            global_state = copy.copy(state)  # its own object: the seed's update_state() mutates `state` in place
            _, validation = self._run_tasks(self.ti.validation_tasks, state, self.valid_loader, task, False,
                                            global_state)
            self.reports.send(exp, rnd, r.Stage.AGGREGATED, validation, self.n_valid)
            self.global_state = global_state
        else:  # periodic or dynamic averaging: keep training this envoy's own model
            state = self.local_state
        if task.kind == r.TaskKind.VALIDATE:
            return
        state, train_metrics = self._run_tasks(self.ti.train_tasks, state, self.train_loader, task, True,
                                               self.global_state)
        self.reports.send(exp, rnd, r.Stage.TRAIN, train_metrics, self.n_train)
        _, validation = self._run_tasks(self.ti.validation_tasks, state, self.valid_loader, task, False,
                                        self.global_state)
        self.reports.send(exp, rnd, r.Stage.LOCAL, validation, self.n_valid)
        self.local_state = state
        self.reports.wait()  # before the check-in or upload that may close the round
        if task.check_in and not self.client.check_in(exp, rnd, self._divergence(task, state)):
            print(f"[worker {self.client.envoy_name}] round {rnd} done, model kept (no averaging)", flush=True)
            return
        self._upload(task, state)
        print(f"[worker {self.client.envoy_name}] round {rnd} done: "
              + ", ".join(f"{k}={v:.4f}" for m in train_metrics.values() for k, v in m.items()), flush=True)

    def _upload(self, task: r.Task, state) -> None:
        """Send the tensors the round averages: as weights or deltas, compressed as the experiment says."""
        from fedjax_core import codecs
        from fedjax_core.runtime.model_tensors import state_to_tensors

        tensors = state_to_tensors(state)
        missing = [n for n in task.upload_tensors if n not in tensors]
        if missing:
            raise RuntimeError(f"the trained state lacks tensors {missing[:3]}: did a task change the model's structure?")
        wire, encodings = codecs.encode_update(tensors, task.upload_tensors, task.compression or None,
                                               self.global_tensors if task.send_deltas else None)
        self.client.upload(self.experiment, task.round, self.n_train, wire, encodings)

    def _divergence(self, task: r.Task, state) -> float:
        """Squared L2 distance of the trained model's float tensors from the round's global model."""
        from fedjax_core import codecs
        from fedjax_core.runtime.model_tensors import state_to_tensors

        return codecs.divergence(state_to_tensors(state), self.global_tensors, task.upload_tensors)


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

