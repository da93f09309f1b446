"""``FLExperiment``: submit an experiment, follow its metrics, and pull its models back."""
from __future__ import annotations

import importlib.metadata
import dataclasses
import inspect
import json
import math
import random
import site
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle

from fedjax_core import bundle as bundle_io
from fedjax_core import code_sources
from fedjax_core import records as r
from fedjax_core.api.client import followed_events
from fedjax_core.api.federation import Federation
from fedjax_core.records import default_higher_is_better
from fedjax_core.runtime.interfaces import DataInterface, ModelInterface, TaskError, TaskInterface
from fedjax_core.runtime.model_tensors import state_to_tensors, static_structure, tensors_to_state
from fedjax_core.sinks import MetricSink
from fedjax_core.privacy.settings import CentralDP, LocalDP, SecureAggregation, privacy_to_spec, secure_to_spec
from fedjax_core.spec import (BestModel, Communication, Deadline, ExperimentSpec, Sampling, StrategySpec, enum_of,
                              parse_round_config, validate)
from fedjax_core.strategies import Strategy, as_strategy
from fedjax_core.sync import Sync
from fedjax_core.sync import to_spec as sync_to_spec
from fedjax_core.tensors import spec_of

DEVICE_POLICIES = ("CPU_ONLY", "CUDA_PREFERRED")


class ExperimentFailed(RuntimeError):
    """The experiment failed: the message carries the director's reason (which envoy, which round, why)."""


class ExperimentCancelled(RuntimeError):
    """The experiment was cancelled on purpose (``exp.cancel()``, ``fedjax experiments cancel``): not a failure;
    the events so far are in ``exp.history`` and its last model can still be downloaded."""


def pickle_user_objects(objects: Any, extra_modules: Iterable[ModuleType] = ()) -> bytes:
    """``objects`` cloudpickled with the user's own modules (``user_modules``) and ``extra_modules`` by value,
    so that a process without them (an envoy's worker, a Ray actor) can load them."""
    return pickle_with_sources(objects, extra_modules)[0]


def pickle_with_sources(objects: Any, extra_modules: Iterable[ModuleType] = ()) -> tuple[bytes, dict[str, str]]:
    """:func:`pickle_user_objects`, keeping the code's file names, and the source text of those files for the
    tracebacks of the process that runs it (``fedjax_core.code_sources``)."""
    modules = list({id(m): m for m in [*user_modules(), *extra_modules]}.values())
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    try:
        return code_sources.dumps(objects)
    finally:
        for module in modules:
            cloudpickle.unregister_pickle_by_value(module)


def user_modules() -> list[ModuleType]:
    """Imported modules that belong to no installed distribution, wherever their files live.

    These are the user's own code (beside the notebook, in ``../lib`` on ``sys.path``...):
    cloudpickle pickles them by value, so they reach envoys that do not have them.
    Installed packages (site-packages, the standard library, editable installs) travel by
    reference and must be installed on the envoys. A user's module that shadows an installed
    package's name (a ``utils.py`` beside the notebook) is the user's, and travels by value.
    """
    site_dirs = [Path(d) for d in {*site.getsitepackages(), site.getusersitepackages(),
                                   sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}]
    installed_dirs = {p.resolve() for p in (Path(sys.prefix), Path(sys.base_prefix), *site_dirs,
                                            *map(Path, sysconfig.get_paths().values()))}
    distributed = set(importlib.metadata.packages_distributions())

    def editable(top: str) -> bool:  # a distribution provides it, but not from site-packages
        return top in distributed and not any((d / top).exists() or (d / f"{top}.py").exists()
                                              or any(d.glob(f"{top}.*.so")) for d in site_dirs)

    out = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        top = name.split(".")[0]
        if not file or name == "__main__" or top == "fedjax_core":
            continue
        path = Path(file).resolve()
        if not any(path.is_relative_to(d) for d in installed_dirs) and not editable(top):
            out.append(module)
    return out


def _sampling(envoys_per_round: int | float | None) -> tuple[int, float]:
    """``(count, fraction)`` for the header: an int >= 1 is a count, a float in (0, 1] a fraction."""
    if envoys_per_round is None:
        return 0, 0.0
    if isinstance(envoys_per_round, int) and not isinstance(envoys_per_round, bool) and envoys_per_round >= 1:
        return envoys_per_round, 0.0
    if isinstance(envoys_per_round, float) and 0 < envoys_per_round <= 1:
        return 0, envoys_per_round
    raise ValueError(f"envoys_per_round must be a count (an int >= 1) or a fraction of the envoys (a float in "
                     f"(0, 1]), got {envoys_per_round!r}")


def _round_config(fn: Callable | None, rounds: int, ti: TaskInterface) -> str:
    """``fn`` evaluated for every training round, checked against the tasks, as a JSON list."""
    if fn is None:
        return ""
    if not callable(fn):
        raise TypeError(f"round_config must be a function round -> {{task_name: {{kwarg: value}}}}, "
                        f"got {type(fn).__name__}")
    entries = []
    for round_ in range(rounds):
        config = fn(round_) or {}
        if not isinstance(config, Mapping):
            raise TypeError(f"round_config({round_}) returned {type(config).__name__}; "
                            "return a dict {task_name: {kwarg: value}}")
        for task, kwargs in config.items():
            ti.get_task(task)
            if not isinstance(kwargs, Mapping):
                raise TypeError(f"round_config({round_})[{task!r}] is {type(kwargs).__name__}; "
                                "give each task a dict {kwarg: value}")
            roles = {v for v in ti.task_contract[task].values() if v is not None}
            for kwarg in kwargs:
                if kwarg in roles or not ti.accepts(task, kwarg):
                    raise TaskError(f"round_config({round_}) gives task {task!r} the keyword argument {kwarg!r}, "
                                    "which it does not take (or which the platform fills in); its parameters are "
                                    f"{list(inspect.signature(ti.get_task(task)).parameters)}")
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"round_config({round_}) is not JSON ({exc}): use numbers, strings, bools, lists "
                            "and dicts (convert numpy or JAX scalars with float() or int())") from None
        entries.append({task: dict(kwargs) for task, kwargs in config.items()})
    return json.dumps(entries, allow_nan=False)


class FLExperiment:
    def __init__(self, federation: Federation, experiment_name: str = "experiment", serializer_plugin: Any = None):
        self.federation = federation
        self.experiment_name = experiment_name
        self.serializer_plugin = serializer_plugin
        self.model_interface: ModelInterface | None = None
        self.history: list[r.MetricEvent] = []

    # ---------------------------------------------------------------- start
    def start(self, *, model_provider: ModelInterface, task_keeper: TaskInterface, data_loader: DataInterface,
              rounds_to_train: int, opt_treatment: str = "RESET", device_assignment_policy: str = "CPU_ONLY",
              best_metric: str | None = None, higher_is_better: bool | None = None,
              aggregation: Strategy | str = "fedavg", envoys: Iterable[str] | None = None,
              envoys_per_round: int | float | None = None, sampling_seed: int | None = None,
              round_config: Callable[[int], Mapping[str, Mapping[str, Any]]] | None = None,
              min_envoys: int = 1, round_timeout_s: float = 0.0,
              compression: str | None = None, send_deltas: bool = False, compress_downloads: bool = False,
              sync: Sync | None = None, privacy: CentralDP | LocalDP | None = None,
              secure_aggregation: SecureAggregation | None = None, personal: Iterable[str] = (),
              pickle_by_value: Iterable[ModuleType] = (), pip_install_options: Any = None) -> int:
        """Submit the experiment; returns its place in the director's queue (0: running now).

        ``rounds_to_train=0`` trains nothing: every envoy validates the given model and the director
        aggregates the metrics (evaluation only, docs/operations.md).

        ``aggregation``: a strategy from ``fedjax_core.strategies`` (``FedAdam(eta=0.1)``...) or its
        name (``"fedavg"``). ``envoys_per_round``: a count, or a fraction of the experiment's envoys
        (at least 1), sampled each round with ``sampling_seed`` (random when None; the status
        records who took part). ``round_config(round) -> {task: {kwarg: value}}`` is evaluated
        here for round = 0 .. rounds_to_train - 1 and overrides ``add_kwargs`` in that round.

        ``compression``: ``"fp16"``, ``"bf16"`` or ``"int8"`` compresses the float tensors envoys
        upload (``fedjax_core.codecs`` states each codec's error); ``send_deltas=True`` uploads the
        change from the round's model instead of the weights (alone, or with a codec, which then
        compresses the change); ``compress_downloads=True`` sends the round's model to the envoys
        under the same codec (the final validation and the models you download stay exact).
        ``sync``: ``fedjax_core.Periodic(every=k)`` or ``fedjax_core.Dynamic(delta_threshold=d)``
        averages less often than every round (see ``fedjax_core.sync``).
        ``privacy``: ``fedjax_core.privacy.CentralDP(...)`` or ``LocalDP(...)`` makes the updates
        differentially private; the status then reports ``epsilon`` at ``delta`` (docs/privacy.md).
        ``secure_aggregation``: ``fedjax_core.privacy.SecureAggregation(...)`` masks the updates so that
        the director learns only each round's sum (SecAgg+; docs/privacy.md).
        ``personal``: personal layers (FedPer, FedBN; docs/personal.md), pytree path patterns such as
        ``["params/head/**", "batch_stats/**"]`` (``*`` within one path segment, ``**`` any number of
        segments): the tensors they match never leave the envoys, each envoy keeps and trains its own, the
        aggregated validation uses them, the models you download hold the template's values for them, and
        the status reports each envoy's validation (``personal_validation``).

        A round closes when every participant has reported or dropped out (a task that raises
        drops its envoy out of that round; it rejoins at the next), or, with ``round_timeout_s``
        > 0, at that deadline if at least ``min_envoys`` have reported. A round that can no
        longer reach ``min_envoys`` results (0: every participant) fails the experiment.

        Code reaches the envoys by cloudpickle: modules that belong to no installed distribution
        (beside the notebook or anywhere on ``sys.path``) travel by value; ``pickle_by_value``
        adds installed modules the envoys lack. ``pip_install_options`` is accepted for seed
        compatibility and ignored: envoys never install packages for an experiment.
        """
        if not isinstance(model_provider, ModelInterface):
            raise TypeError(f"model_provider must be a ModelInterface, got {type(model_provider).__name__}")
        if not isinstance(task_keeper, TaskInterface):
            raise TypeError(f"task_keeper must be a TaskInterface, got {type(task_keeper).__name__}")
        if not isinstance(data_loader, DataInterface):
            raise TypeError(f"data_loader must be a DataInterface, got {type(data_loader).__name__}")
        if device_assignment_policy not in DEVICE_POLICIES:
            raise ValueError(f"device_assignment_policy {device_assignment_policy!r} is not one of "
                             f"{', '.join(DEVICE_POLICIES)}")
        if isinstance(envoys, str):
            raise TypeError(f"envoys must be a list of envoy names, e.g. [{envoys!r}], not a string")
        if higher_is_better is not None and not best_metric:
            raise ValueError("higher_is_better needs best_metric: name the validation metric it applies to")
        strategy_name, strategy_params = as_strategy(aggregation).to_wire()
        for flag, value in (("send_deltas", send_deltas), ("compress_downloads", compress_downloads)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        sync_mode, sync_every, sync_threshold = sync_to_spec(sync)
        per_round, fraction = _sampling(envoys_per_round)
        if isinstance(personal, str) or not isinstance(personal, Iterable):
            raise TypeError(f"personal must be a list of pytree path patterns, e.g. [{personal!r}], not "
                            f"{type(personal).__name__}")
        tensors = state_to_tensors(model_provider.model)
        spec = ExperimentSpec(
            name=self.experiment_name, rounds=rounds_to_train,
            opt_treatment=enum_of(r.OptTreatment, opt_treatment, "opt_treatment"),
            model_spec=tuple(spec_of(name, array) for name, array in tensors.items()),
            envoys=tuple(envoys or ()), submitter=self.federation.client_id,
            sampling=Sampling(per_round, fraction, random.randrange(2**62) if sampling_seed is None else sampling_seed),
            deadline=Deadline(round_timeout_s, min_envoys),
            communication=Communication(compression or "", send_deltas, compress_downloads, sync_mode, sync_every,
                                        sync_threshold),
            strategy=StrategySpec(strategy_name, strategy_params),
            best=BestModel(best_metric or "", default_higher_is_better(best_metric or "") if higher_is_better is None
                           else bool(higher_is_better)),
            privacy=privacy_to_spec(privacy), secure=secure_to_spec(secure_aggregation),
            personal=tuple(personal),
        )
        validate(spec)  # the director checks it again, and against the envoys it knows
        task_keeper.check()
        spec = dataclasses.replace(spec, round_config=_round_config(round_config, rounds_to_train, task_keeper))
        payload, sources = pickle_with_sources({"model_interface": model_provider, "task_interface": task_keeper,
                                                "data_interface": data_loader}, pickle_by_value)
        bundle = bundle_io.pack({"experiment": self.experiment_name,
                                 "device_assignment_policy": device_assignment_policy,
                                 "tasks": sorted(task_keeper.task_registry), "sources": sources}, payload)
        spec = dataclasses.replace(spec, bundle_size=len(bundle))
        parse_round_config(spec.round_config, spec.rounds)  # the round_config, as the director will read it
        position = self.federation.client.submit(spec, bundle, tensors)
        self.model_interface = model_provider
        self.history = []
        return position

    # --------------------------------------------------------------- follow
    def get_experiment_status(self) -> r.ExperimentStatus:
        return self.federation.client.status(self.experiment_name)

    def stream_metrics(self, tensorboard_logs: bool = True, log_dir: str | Path = "logs", progress: bool = True,
                       live_table: bool = True, sinks: Sequence[MetricSink] | None = None) -> list[dict]:
        """Follow the experiment to its end: a progress bar per round, a table of aggregated metrics,
        TensorBoard curves under ``log_dir``. Returns the table's rows; raises ExperimentFailed on failure and
        ExperimentCancelled after a cancel.

        ``sinks``: more metric sinks (``fedjax_core.sinks.MLflowSink(...)``, ``WandbSink(...)``, any
        object with ``log(event)`` and ``close()``), fed in addition to TensorBoard; pass
        ``tensorboard_logs=False`` for these alone. They are closed when this returns. A sink that
        fails is reported once and skipped: it never stops the stream."""
        from fedjax_core.api.progress import MetricsView

        if sinks is not None and (isinstance(sinks, (str, bytes)) or not isinstance(sinks, Iterable)):
            raise TypeError(f"sinks must be a list of metric sinks, e.g. sinks=[{type(sinks).__name__}(...)], "
                            f"got {type(sinks).__name__}")
        sinks = list(sinks or ())
        for sink in sinks:
            if not isinstance(sink, MetricSink):
                raise TypeError(f"{type(sink).__name__} is not a metric sink: it needs log(event) and close() "
                                "(see fedjax_core.sinks)")
        view = MetricsView(self, Path(log_dir) / self.experiment_name if tensorboard_logs else None,
                           progress=progress, live_table=live_table, sinks=sinks)
        try:
            for event in self._events():
                if event.experiment_done:
                    if event.state == r.State.CANCELLED:
                        raise ExperimentCancelled(f"experiment {self.experiment_name!r} was cancelled "
                                                  f"({self.get_experiment_status().error}); its events so far are in "
                                                  "exp.history, its last model in exp.get_last_model()")
                    if event.state != "finished":
                        raise ExperimentFailed(f"experiment {self.experiment_name!r} {event.state}: "
                                               f"{self.get_experiment_status().error}")
                    break
                self.history.append(event)
                view.add(event)
        finally:
            view.close()
        return view.rows

    def _events(self, timeout_s: float = math.inf, reconnect_s: float = 120.0) -> Iterator[r.MetricEvent]:
        """The experiment's events in order, riding out a director restart of up to ``reconnect_s``."""
        return followed_events(self.federation.client, self.experiment_name, timeout_s, reconnect_s)

    def cancel(self) -> r.ExperimentStatus:
        """Stop this experiment, queued or running; its envoys' workers end and free their devices."""
        return self.federation.client.cancel(self.experiment_name)

    def wait(self, timeout_s: float = math.inf) -> r.ExperimentStatus:
        """Block until the experiment finishes or fails (no output); returns its status."""
        for event in self._events(timeout_s):
            if event.experiment_done:
                break
        return self.get_experiment_status()

    # --------------------------------------------------------------- models
    def _template(self):
        if self.model_interface is None:
            raise RuntimeError("this FLExperiment has no model template: call start() first, or "
                               "set_model_template(state) to read models of an experiment started elsewhere")
        return self.model_interface.model

    def set_model_template(self, state: Any) -> None:
        self.model_interface = ModelInterface(model=state)

    def _get_model(self, which: str):
        """The model as a state like the template; lists of names in it (the seed's ``opt_vars``) are static,
        so the state goes into jitted functions as the workers' did (model_tensors.static_structure)."""
        return static_structure(tensors_to_state(self._template(),
                                                 self.federation.client.model(self.experiment_name, which)))

    def get_best_model(self):
        """The aggregated model with the best aggregated validation metric, as a state like the template."""
        return self._get_model("best")

    def get_last_model(self):
        """The last aggregated model."""
        return self._get_model("last")
