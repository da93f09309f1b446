"""A simulation's envoys as the director sees them: where their calls arrive and are checked.

:class:`VirtualEnvoys` has a round's tasks run (in this process by
:class:`~fedjax_core.simulation.participants.Participants`, or on Ray actors) and takes what the
participants send as the director would: the round's model each asks for (counted as a download),
metric reports weighed by the round engine, divergence check-ins, and uploads decoded and checked
by the director's own rules before the strategy sees them.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedjax_core import codecs
from fedjax_core import records as r
from fedjax_core.aggregation import ArraySource, TensorSource, Upload
from fedjax_core.director import limits
from fedjax_core.director.round_machine import CheckedIn, Dropped, UpdateStored
from fedjax_core.director.rounds import Run
from fedjax_core.errors import InvalidRequestError
from fedjax_core.personal import check_not_personal
from fedjax_core.privacy.local import check_applied
from fedjax_core.simulation.participants import Participants
from fedjax_core.spec import SyncMode
from fedjax_core.tensors import check_finite, is_float_dtype

if TYPE_CHECKING:
    from fedjax_core.simulation.director import SimulatedDirector


def arrays_of(source: TensorSource) -> dict[str, np.ndarray]:
    """Every tensor of ``source`` as a whole array."""
    out = {}
    for spec in source.specs:
        flat = np.empty(math.prod(spec.shape), np.dtype(spec.dtype))
        out[spec.name] = source.read_into(spec.name, 0, flat).reshape(spec.shape)
    return out


class VirtualEnvoys:
    """The envoys of one simulated experiment, seen from the director: their tasks run in this process
    (:class:`~fedjax_core.simulation.participants.Participants`) or on Ray actors (``ray_backend``), and
    their calls arrive here to be checked and weighed as the director checks and weighs them."""

    def __init__(self, director: SimulatedDirector, experiment: str, objects: dict[str, Any], payload: bytes,
                 vectorize: bool = True, max_cohort: int = 256, ray: Any = None):
        """``objects``: the experiment's interfaces, unpickled from the bundle's ``payload`` (which Ray actors
        unpickle for themselves); ``ray``: a ``ray_backend.RayEnvoyHosts``, or None to run every task here."""
        self.director, self.experiment = director, experiment
        self.run: Run | None = None
        self._model: tuple[int, dict[str, np.ndarray]] | None = None  # (round, the round's model)
        self._download: tuple[int, dict[str, np.ndarray], int] | None = None  # (round, as received, bytes)
        if ray is None:
            self.players = Participants(self, experiment, objects, director.shards, vectorize, max_cohort)
        else:
            self.players = ray.participants(self, experiment, payload, vectorize, max_cohort)

    def play(self, run: Run, asked: list[tuple[str, r.Task]]) -> None:
        """The tasks ``run``'s round asks for; stops when the round closes."""
        self.run = run
        self.players.play(asked, self._keep_local())

    def release(self) -> None:
        """Between rounds: each envoy keeps only what its next round needs, on the host."""
        self.players.release(self._keep_local())
        self._model = self._download = None

    def _keep_local(self) -> bool:
        """Whether an envoy's own model outlives its round: CONTINUE_LOCAL, or averaging less than every round."""
        return self.run is not None and (self.run.spec.opt_treatment == r.OptTreatment.CONTINUE_LOCAL
                                         or self.run.spec.communication.sync != SyncMode.EVERY_ROUND)

    def close(self) -> None:
        """The experiment ended: what its participants hold elsewhere (Ray actors) is let go."""
        close = getattr(self.players, "close", None)
        if close is not None:
            close()

    # ------------------------------------------------------------------ what the director takes
    def open(self) -> bool:
        return self.run is not None and self.director.is_current(self.run)

    def dropped(self, envoy: str, error: str) -> None:
        """A task that raised drops its envoy out of the round, as a worker's failure does."""
        run = self.run
        if self.director.is_current(run) and run.state.owes(envoy):
            self.director.act(run, Dropped(envoy, "failed", error))

    def round_model(self, envoy: str, round_: int) -> dict[str, np.ndarray]:
        """What ``envoy`` receives of the round's model (counted as its download)."""
        tensors, nbytes = self.download(round_)
        self.run.traffic.count(envoy, nbytes, upload=False)
        return tensors

    def download(self, round_: int) -> tuple[dict[str, np.ndarray], int]:
        """The round's model as the participants receive it, and the bytes that would travel: the tensors the
        opt treatment sends, exact, or under compress_downloads in a training round, encoded by the experiment's
        codec and decoded (as a worker decodes them; the final validation gets the model exact)."""
        if self._download is None or self._download[0] != round_:
            model = self.model(round_)
            communication = self.run.spec.communication
            if communication.compress_downloads and self.run.state.kind == r.TaskKind.TRAIN:
                encoded = {name: codecs.encode(name, a, communication.compression) for name, a in model.items()}
                tensors = {name: codecs.decode(wire, encoding) for name, (wire, encoding) in encoded.items()}
                nbytes = sum(wire.nbytes for wire, _ in encoded.values())
            else:
                tensors, nbytes = model, sum(a.nbytes for a in model.values())
            self._download = (round_, tensors, nbytes)
        return self._download[1], self._download[2]

    def model(self, round_: int) -> dict[str, np.ndarray]:
        """The round's model, exact: the tensors that travel (the director sends only those, as the opt treatment
        says), and what uploaded deltas apply to."""
        if self._model is None or self._model[0] != round_:
            model = arrays_of(self.director.models.model(self.experiment, round_))
            self._model = (round_, {name: a for name, a in model.items() if name in self.run.upload})
        return self._model[1]

    def report(self, envoy: str, round_: int, stage: str, metrics: dict[str, dict[str, float]],
               sample_count: int) -> None:
        run = self.run
        reported = tuple(r.Metric(task, name, value) for task, values in metrics.items()
                         for name, value in values.items())
        limits.check_metrics(envoy, reported)
        weight = self.director.engine.report_weight(run, envoy, stage, sample_count)
        event = r.MetricEvent(round=round_, envoy=envoy, stage=r.Stage(stage), metrics=reported,
                              timestamp=time.time())
        self.director.record(self.experiment, event, weight=weight)
        if stage == r.Stage.AGGREGATED:
            self.director.validated(run, envoy)

    def check_in(self, envoy: str, round_: int, divergence: float) -> bool:
        run = self.run
        if not (math.isfinite(divergence) and divergence >= 0):
            raise InvalidRequestError(f"envoy {envoy!r} reported divergence {divergence}: a squared distance is a "
                                      "finite number >= 0 (NaN or infinity: training diverged)")
        self.director.act(run, CheckedIn(envoy, divergence))
        self.director.record(self.experiment, r.MetricEvent(
            round=round_, envoy=envoy, stage=r.Stage.SYNC_CHECK, timestamp=time.time(),
            metrics=(r.Metric("sync", "divergence", divergence),)))
        return run.state.must_upload(envoy)

    def upload(self, envoy: str, round_: int, sample_count: int, tensors: Mapping[str, np.ndarray],
               encodings: Mapping[str, r.Encoding], applied: tuple[float, float] = (0.0, 0.0)) -> None:
        """Decode, check and keep ``envoy``'s update, as the director's transfers and round engine do."""
        run = self.run
        check_applied(run.spec.privacy, envoy, *applied)
        weight = self.director.engine.weight(run, envoy, sample_count)
        specs = [r.TensorSpec(name, np.asarray(a).dtype.name, tuple(np.shape(a)), encodings.get(name))
                 for name, a in tensors.items()]
        codecs.check_update_encodings(specs, run.spec.communication.compression,
                                      run.spec.communication.send_deltas)
        model = self.model(round_)
        decoded = {}
        for name in tensors:
            check_not_personal(run.personal, envoy, name)
        for name, wire in tensors.items():
            encoding = encodings.get(name)
            delta = encoding is not None and encoding.delta
            decoded[name] = codecs.decode(np.asarray(wire), encoding, model[name] if delta else None)
            if is_float_dtype(decoded[name].dtype):
                check_finite(name, decoded[name])
        run.updates.add(Upload(envoy, weight, ArraySource(decoded)))
        run.traffic.count(envoy, sum(np.asarray(a).nbytes for a in tensors.values()), upload=True)
        self.director.act(run, UpdateStored(envoy))

