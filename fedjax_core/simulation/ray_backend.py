"""Simulation beyond one process: a simulation's envoys spread over Ray actors, the round machine staying here.

``SimulatedFederation(shards, backend="ray", address=...)`` starts :class:`RayEnvoyHosts`: a few Ray
actors (each with its own CPU/GPU share and JAX memory settings), each the home of a fixed share of
the envoys, so an envoy's own model (CONTINUE_LOCAL, periodic and dynamic averaging) stays where it
trains. Each round, every actor runs its participants' tasks with the same
:class:`~fedjax_core.simulation.participants.Participants` as a one-process simulation, and sends
back the calls those tasks made (the model asked for, reports, check-ins, uploads, dropouts); the
driver hands them, in order, to the director's side (``envoys.VirtualEnvoys``), which checks and
weighs them exactly as it does in one process. A check-in the director answers with "upload" is
followed by a SYNC task to the envoy's actor, as a real envoy's worker would be sent one.

Ray is an optional extra: ``pip install 'fedjax-core[ray]'``.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import cloudpickle
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedjax_core import records as r
from fedjax_core.shard_descriptor import ShardDescriptor
from fedjax_core.simulation.participants import Participants, error_text

if TYPE_CHECKING:
    from fedjax_core.simulation.envoys import VirtualEnvoys


class RayOptions(BaseModel):
    """How a simulation uses Ray (``SimulatedFederation(..., backend="ray", **these)``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = None  # a running cluster ("127.0.0.1:6379", "auto"); None: start one on this machine
    actors: int | None = Field(None, ge=1)  # None: as many as the cluster's CPUs hold, at most one per envoy
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    jax_memory_fraction: float | None = Field(None, gt=0, le=1)  # of its GPU's memory that an actor's JAX may take
    env: dict[str, str] = Field(default_factory=dict)  # more environment variables for the actors
    max_restarts: int = Field(1, ge=0)  # a dead actor comes back this often; its envoys restart as new workers

    def actor_env(self) -> dict[str, str]:
        """The actors' environment: JAX on the CPU without a GPU share, else at most its memory fraction."""
        env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        if self.gpus_per_actor == 0:
            env["JAX_PLATFORMS"] = "cpu"
        if self.jax_memory_fraction is not None:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(self.jax_memory_fraction)
        return {**env, **self.env}


def import_ray():
    """The ``ray`` module, or an ImportError that says what to install."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError("SimulatedFederation(backend='ray') needs Ray: pip install 'fedjax-core[ray]' "
                          "(or pip install ray), or leave backend='local' to run every envoy in this process") from exc
    return ray


class _Outbox:
    """An actor's :class:`DirectorSide`: it records the calls for the driver to deliver, in order. A check-in is
    answered "keep the model"; the driver sends a SYNC task when the director wants the upload after all."""

    def __init__(self):
        self.model: dict[str, np.ndarray] | None = None
        self.calls: list[tuple] = []

    def round_model(self, envoy: str, round_: int) -> dict[str, np.ndarray]:
        if self.model is None:
            raise RuntimeError(f"envoy {envoy!r} asked for round {round_}'s model, which was not sent with its task")
        self.calls.append(("round_model", envoy, round_))
        return self.model

    def report(self, envoy: str, round_: int, stage: str, metrics: dict[str, dict[str, float]],
               sample_count: int) -> None:
        self.calls.append(("report", envoy, round_, str(stage), metrics, sample_count))

    def check_in(self, envoy: str, round_: int, divergence: float) -> bool:
        self.calls.append(("check_in", envoy, round_, divergence))
        return False

    def upload(self, envoy: str, round_: int, sample_count: int, tensors: Mapping[str, np.ndarray],
               encodings: Mapping[str, r.Encoding], applied: tuple[float, float] = (0.0, 0.0)) -> None:
        self.calls.append(("upload", envoy, round_, sample_count, {k: np.asarray(v) for k, v in tensors.items()},
                           dict(encodings), tuple(applied)))

    def dropped(self, envoy: str, error: str) -> None:
        self.calls.append(("dropped", envoy, error))

    def open(self) -> bool:
        return True

    def take(self) -> list[tuple]:
        calls, self.calls, self.model = self.calls, [], None
        return calls


class EnvoyHost:
    """The class of a Ray actor: the home of some envoys' shards and, per experiment, of their runners."""

    def __init__(self, shards: bytes):
        self.shards: dict[str, ShardDescriptor] = cloudpickle.loads(shards)
        self.experiments: dict[str, tuple[Participants, _Outbox]] = {}

    def where(self) -> str:
        return f"{socket.gethostname()} pid {os.getpid()}"

    def play(self, experiment: str, setup: list, asked: list[tuple[str, r.Task]],
             model: dict[str, np.ndarray] | None, keep_local: bool) -> list[tuple]:
        """Run ``asked`` (this actor's envoys' tasks of one round); the calls they made. ``setup`` wraps
        ``[payload ref, vectorize, max_cohort]`` in a list so that Ray fetches the bundle only when needed."""
        if experiment not in self.experiments:
            import ray

            payload_ref, vectorize, max_cohort = setup
            outbox = _Outbox()
            objects = cloudpickle.loads(ray.get(payload_ref))
            self.experiments[experiment] = (Participants(outbox, experiment, objects, self.shards, vectorize,
                                                         max_cohort), outbox)
        players, outbox = self.experiments[experiment]
        outbox.model = model
        try:
            players.play(asked, keep_local)
        finally:
            calls = outbox.take()
        return calls

    def release(self, experiment: str, keep_local: bool) -> None:
        if experiment in self.experiments:
            self.experiments[experiment][0].release(keep_local)

    def end(self, experiment: str) -> None:
        self.experiments.pop(experiment, None)


class RayEnvoyHosts:
    """A simulation's Ray actors, for all its experiments; ``close`` ends them (and Ray, if this started it)."""

    def __init__(self, options: RayOptions, shards: Mapping[str, ShardDescriptor]):
        from fedjax_core.api.experiment import pickle_user_objects

        ray = self.ray = import_ray()
        self.options = options
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            try:
                ray.init(address=options.address, include_dashboard=False)
            except ConnectionError as exc:
                raise ConnectionError(
                    f"cannot reach the Ray cluster at {options.address!r} ({exc}): check that `ray start --head` "
                    "runs there; a cluster with token authentication needs RAY_AUTH_MODE=token in this process's "
                    "environment (Ray reads the token from ~/.ray/auth_token or RAY_AUTH_TOKEN)") from exc
        try:
            cpus = ray.cluster_resources().get("CPU", 1.0)
            count = options.actors or max(1, int(cpus // options.cpus_per_actor))
            names = list(shards)
            count = min(count, len(names))
            self.home = {name: i % count for i, name in enumerate(names)}  # fixed: an envoy's state stays there
            actor = ray.remote(num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor,
                               max_restarts=options.max_restarts,
                               runtime_env={"env_vars": options.actor_env()})(EnvoyHost)
            self.actors = [actor.remote(pickle_user_objects({n: shards[n] for n in names if self.home[n] == i}))
                           for i in range(count)]
            self.where = ray.get([a.where.remote() for a in self.actors], timeout=300)
        except Exception:
            self.close()
            raise

    def wait_for(self, index: int, timeout_s: float = 300.0) -> None:
        """After a failed call: wait until actor ``index`` answers again (Ray restarts it, up to max_restarts), so the
        next round's call reaches the new process rather than racing its restart; one that stays dead is left to
        fail that call, which drops its envoys again saying why."""
        ray, deadline = self.ray, time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                left = max(1.0, deadline - time.monotonic())
                self.where[index] = ray.get(self.actors[index].where.remote(), timeout=left)
                return
            except ray.exceptions.ActorDiedError:
                return  # no restarts left
            except ray.exceptions.RayError:
                time.sleep(0.2)  # unreachable while it restarts: ask again

    def participants(self, side: VirtualEnvoys, experiment: str, payload: bytes, vectorize: bool,
                     max_cohort: int) -> RayParticipants:
        return RayParticipants(self, side, experiment, payload, vectorize, max_cohort)

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor)
        self.actors = []
        if self._started_ray and self.ray.is_initialized():
            self.ray.shutdown()


class RayParticipants:
    """One experiment's participants on the hosts' actors: ``play`` and ``release`` as ``Participants``'."""

    def __init__(self, hosts: RayEnvoyHosts, side: VirtualEnvoys, experiment: str, payload: bytes, vectorize: bool,
                 max_cohort: int):
        self.hosts, self.side, self.experiment = hosts, side, experiment
        self.setup = [hosts.ray.put(payload), vectorize, max_cohort]

    def play(self, asked: list[tuple[str, r.Task]], keep_local: bool) -> None:
        """Each actor runs its envoys' tasks; their calls reach the director's side as each actor finishes."""
        ray, hosts = self.hosts.ray, self.hosts
        by_actor: dict[int, list[tuple[str, r.Task]]] = {}
        for envoy, task in asked:
            by_actor.setdefault(hosts.home[envoy], []).append((envoy, task))
        needs_model = [t for _, t in asked if t.kind != r.TaskKind.SYNC]
        model = ray.put(self.side.download(needs_model[0].round)[0]) if needs_model else None
        pending = {hosts.actors[i].play.remote(self.experiment, self.setup, tasks, model, keep_local): (i, tasks)
                   for i, tasks in by_actor.items()}
        while pending and self.side.open():
            (done,), _ = ray.wait(list(pending), num_returns=1)
            index, tasks = pending.pop(done)
            try:
                calls = ray.get(done)
            except ray.exceptions.RayError as exc:  # the actor died, or the call could not run there
                text = error_text(exc)
                for envoy, _ in tasks:
                    self.side.dropped(envoy, f"the Ray actor running envoy {envoy!r} ({hosts.where[index]}) "
                                             f"failed; the envoy drops out of this round: {text}")
                hosts.wait_for(index)
                continue
            syncs = self._deliver(calls, dict(tasks))
            if syncs and self.side.open():
                pending[hosts.actors[index].play.remote(self.experiment, self.setup, syncs, None,
                                                        keep_local)] = (index, syncs)

    def _deliver(self, calls: list[tuple], tasks: dict[str, r.Task]) -> list[tuple[str, r.Task]]:
        """Hand ``calls`` to the director's side in order; an envoy whose call is refused drops out and its later
        calls are dropped. The SYNC tasks for envoys whose check-in the director answered with "upload"."""
        failed, syncs = set(), []
        for kind, envoy, *args in calls:
            if envoy in failed or not self.side.open():
                continue
            try:
                if kind == "round_model":
                    self.side.round_model(envoy, *args)
                elif kind == "report":
                    self.side.report(envoy, *args)
                elif kind == "check_in":
                    if self.side.check_in(envoy, *args):
                        syncs.append((envoy, dataclasses.replace(tasks[envoy], kind=r.TaskKind.SYNC)))
                elif kind == "upload":
                    self.side.upload(envoy, *args)
                elif kind == "dropped":
                    failed.add(envoy)
                    self.side.dropped(envoy, *args)
            except Exception as exc:
                failed.add(envoy)
                self.side.dropped(envoy, error_text(exc))
        return syncs

    def release(self, keep_local: bool) -> None:
        ray = self.hosts.ray
        for ref in [a.release.remote(self.experiment, keep_local) for a in self.hosts.actors]:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:  # a dead actor holds nothing to release; its next call says why
                pass

    def close(self) -> None:
        for actor in self.hosts.actors:
            actor.end.remote(self.experiment)
