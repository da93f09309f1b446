"""One envoy's part of an experiment's rounds, whoever carries its calls to the director.

An envoy's worker process drives a :class:`RoundRunner` over gRPC (``envoy/worker.py``); the
simulation drives one per participant in its own process (``fedjax_core/simulation/``). Both run
the same code for a round, so the same experiment trains to the same model either way: the
starting state (global model, kept optimizer state, or a fresh one), the validation of the
round's model, training, the local validation, and the upload (weights or deltas, under the
experiment's codec) or the divergence check-in of periodic and dynamic averaging. With personal layers
(``task.personal``) the runner also keeps this envoy's own personal tensors between rounds and lays them
over every model it receives; they are never uploaded (``fedjax_core/personal.py``).
"""
from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from fedjax_core import records as r


class DirectorLink(Protocol):
    """What a round asks of the director: its model, and where metrics, check-ins and uploads go."""

    envoy_name: str

    def round_model(self, experiment: str, round_: int) -> dict[str, np.ndarray]: ...

    def check_in(self, experiment: str, round_: int, divergence: float) -> bool: ...

    def upload(self, experiment: str, round_: int, sample_count: int, tensors: Mapping[str, np.ndarray],
               encodings: Mapping[str, r.Encoding], applied: tuple[float, float] = (0.0, 0.0)) -> None:
        """``applied``: the (clip_norm, noise_std) the update was privatised with, as the task said."""


class Reports(Protocol):
    """Where metric reports go: ``send`` each, ``wait`` until all are taken (raising the first failure)."""

    def send(self, experiment: str, round_: int, stage: str, metrics: dict[str, dict[str, float]],
             sample_count: int) -> None: ...

    def wait(self, raise_first: bool = True) -> None: ...


def check_finite_update(tensors: Mapping[str, Any], names) -> None:
    """Refuse to privatise an update with a NaN or infinity: clipping would hide it in the noise."""
    for name in names:
        array = np.asarray(tensors[name])
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise RuntimeError(f"the trained model's {name!r} holds NaN or infinite values: this envoy does not "
                               "upload it (lower the learning rate, or check the data)")


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


class RoundRunner:
    """Runs one envoy's rounds of one experiment, keeping its own model between them (CONTINUE_LOCAL, and
    the rounds between averagings); ``template`` is the model state every received model is restored into."""

    def __init__(self, link: DirectorLink, reports: Reports, experiment: str, template: Any, optimizer: Any, ti: Any,
                 data: Any, device: str, mesh: Any = None, fresh_opt_state: OptimizerInit | None = None,
                 log=print):
        self.link, self.reports, self.experiment = link, reports, experiment
        self.template, self.optimizer, self.ti, self.device, self.mesh = template, optimizer, ti, device, mesh
        self.fresh_opt_state = fresh_opt_state or OptimizerInit(eager=mesh is not None)
        self.log = log
        self.local_state = template  # kept between rounds for CONTINUE_LOCAL and between averagings
        self.global_tensors: dict[str, np.ndarray] | None = None  # what deltas and divergences measure from
        self.global_state = None  # the same as a state, for tasks that take global_model= (FedProx)
        self.secure = None  # this round's secure aggregation, between its steps
        self.personal: dict[str, np.ndarray] | None = None  # this envoy's own personal tensors, on the host
        self.train_loader, self.valid_loader = data.get_train_loader(), data.get_valid_loader()
        self.n_train, self.n_valid = int(data.get_train_data_size()), int(data.get_valid_data_size())

    def run_round(self, task: r.Task, started: tuple[Any, bool] | None = None) -> None:
        """Do ``task`` (TRAIN, VALIDATE or SYNC): report its metrics, then upload or check in as it says.
        ``started``: the state to start from and whether it is the round's model, when already made (``start_like``)."""
        exp, rnd = self.experiment, task.round
        if task.kind == r.TaskKind.SYNC:  # dynamic averaging was triggered after this envoy checked in
            self._upload(task, self.local_state)
            return
        if task.kind == r.TaskKind.SECAGG:  # the next step of this round's secure aggregation
            self._secure_step(task)
            return
        state, fresh = started if started is not None else self.start(task)
        if fresh:  # the round's model: validated before training, as the aggregated model of the last round
            _, validation = self._run_tasks(self.ti.validation_tasks, state, self.valid_loader, task, False,
                                            self.global_state)
            self.reports.send(exp, rnd, r.Stage.AGGREGATED, validation, self.n_valid)
        if task.kind == r.TaskKind.VALIDATE:
            return
        state, train_metrics = self._run_tasks(self.ti.train_tasks, state, self.train_loader, task, True,
                                               self.global_state)
        self.reports.send(exp, rnd, r.Stage.TRAIN, train_metrics, self.n_train)
        _, validation = self._run_tasks(self.ti.validation_tasks, state, self.valid_loader, task, False,
                                        self.global_state)
        self.reports.send(exp, rnd, r.Stage.LOCAL, validation, self.n_valid)
        self.finish(task, state, train_metrics)

    def start(self, task: r.Task) -> tuple[Any, bool]:
        """The state this round trains, and whether it is the round's model (``fresh``) rather than this envoy's
        own (periodic or dynamic averaging between averagings; a new worker has no model of its own yet)."""
        if task.from_global or self.global_tensors is None:
            state = self._starting_state(task)
            self.global_state = copy.copy(state)  # its own object: the seed's update_state() mutates `state`
            return state, True
        return self.local_state, False

    def start_like(self, task: r.Task, global_state: Any) -> None:
        """Start this round from the round's model restored by another envoy's runner (``global_state``: its state,
        shared and read-only, with the optimizer state every participant starts from unless CONTINUE_LOCAL): the
        simulation restores a round's model once."""
        self.global_tensors = self.link.round_model(self.experiment, task.round)
        self.global_state = global_state

    def finish(self, task: r.Task, state: Any, train_metrics: Mapping[str, Mapping[str, float]]) -> None:
        """Keep the trained ``state``, then upload it, or check in its divergence and upload only if asked."""
        exp, rnd = self.experiment, task.round
        self.local_state = state
        self._keep_personal(task, state)
        self.reports.wait()  # before the check-in or upload that may close the round
        if task.check_in and not self.link.check_in(exp, rnd, self._divergence(task, state)):
            self.log(f"[worker {self.link.envoy_name}] round {rnd} done, model kept (no averaging)")
            return
        self._upload(task, state)
        self.log(f"[worker {self.link.envoy_name}] round {rnd} done: "
                 + ", ".join(f"{k}={v:.4f}" for m in train_metrics.values() for k, v in m.items()))

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

        received = self.link.round_model(self.experiment, task.round)
        self.global_tensors = received
        if task.opt_treatment == "CONTINUE_LOCAL":
            return self._with_personal(task, tensors_to_state(self.local_state, received))
        state = self._with_personal(task, tensors_to_state(self.template, received))
        if task.opt_treatment == "RESET" and hasattr(state, "tx"):
            state = state.replace(opt_state=canonicalize(self.fresh_opt_state(state)), step=self.template.step)
        return state

    def _with_personal(self, task: r.Task, state):
        """``state`` with this envoy's own personal tensors laid over it: the template's until it first trained."""
        if not task.personal:
            return state
        from fedjax_core.personal import personal_names
        from fedjax_core.runtime.model_tensors import state_to_tensors, tensors_to_state

        if self.personal is None:
            template = state_to_tensors(self.template)
            self.personal = {name: template[name] for name in personal_names(template, task.personal)}
        return tensors_to_state(state, self.personal)

    def _keep_personal(self, task: r.Task, trained) -> None:
        """Keep the trained state's personal tensors for this envoy's next rounds."""
        if task.personal and self.personal:
            from fedjax_core.runtime.model_tensors import state_to_tensors

            self.personal = state_to_tensors(trained, only=self.personal.keys())

    def _upload(self, task: r.Task, state) -> None:
        """Send the tensors the round averages: as weights or deltas, compressed as the experiment says."""
        from fedjax_core import codecs
        from fedjax_core.personal import personal_names
        from fedjax_core.runtime.model_tensors import state_to_tensors

        leaked = personal_names(task.upload_tensors, task.personal)
        if leaked:
            raise RuntimeError(f"the director asks for personal tensors {list(leaked[:3])}, which never leave this "
                               "envoy: it does not upload")
        tensors = state_to_tensors(state)
        missing = [n for n in task.upload_tensors if n not in tensors]
        if missing:
            raise RuntimeError(f"the trained state lacks tensors {missing[:3]}: did a task change the model's structure?")
        if task.clip_norm:  # differential privacy: clip (and under local DP noise) the change before it leaves
            from fedjax_core.privacy.local import privatize

            check_finite_update(tensors, task.upload_tensors)
            tensors = privatize(tensors, task.upload_tensors, self.global_tensors, task.clip_norm, task.noise_std)
        if task.secagg is not None:  # secure aggregation: the update leaves only masked, step by step
            self._secure_start(task, tensors)
            return
        wire, encodings = codecs.encode_update(tensors, task.upload_tensors, task.compression or None,
                                               self.global_tensors if task.send_deltas else None)
        self.link.upload(self.experiment, task.round, self.n_train, wire, encodings, (task.clip_norm, task.noise_std))

    def _secure_start(self, task: r.Task, tensors: Mapping[str, np.ndarray]) -> None:
        from fedjax_core.runtime.secure_upload import SecureUpload, update_vector

        setup = task.secagg
        weight = 1.0 if setup.weight_scale <= 0 else min(1.0, self.n_train * setup.weight_scale)
        vector = update_vector(tensors, self.global_tensors, task.upload_tensors, weight, setup.clip_range)
        self.secure = SecureUpload(self.link, self.experiment, task.round, setup, vector,
                                   (task.clip_norm, task.noise_std), self.log)
        self.secure.start()

    def _secure_step(self, task: r.Task) -> None:
        secure = getattr(self, "secure", None)
        if secure is None or secure.round != task.round or task.secagg is None:
            raise RuntimeError(f"the director asks for a secure aggregation step of round {task.round}, but this worker "
                               "holds no update of that round (it restarted): it drops out of the round")
        secure.step(task.secagg)
        if secure.done:
            self.secure = None

    def _divergence(self, task: r.Task, state) -> float:
        """Squared L2 distance of the trained model's float tensors from the round's global model."""
        from fedjax_core import codecs
        from fedjax_core.runtime.model_tensors import state_to_tensors

        return codecs.divergence(state_to_tensors(state), self.global_tensors, task.upload_tensors)
