"""An envoy's part of a round's secure aggregation: its update as one vector, masked step by step as the
director's SECAGG tasks say (``fedjax_core/secagg/protocol.py``). The update stays in this worker's memory;
what leaves is public keys, shares encrypted to neighbours, one masked vector, and the shares it reveals."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from fedjax_core import records as r
from fedjax_core.secagg import protocol
from fedjax_core.secagg.protocol import MASKED_TENSOR
from fedjax_core.aggregation import is_param_leaf



class SecureLink(Protocol):
    envoy_name: str

    def secagg(self, experiment: str, round_: int, phase: str, keys: r.SecAggKeys | None = None,
               items: Mapping[str, bytes] | None = None) -> None: ...

    def upload(self, experiment: str, round_: int, sample_count: int, tensors: Mapping[str, np.ndarray],
               encodings: Mapping[str, r.Encoding], applied: tuple[float, float] = (0.0, 0.0)) -> None: ...


def update_vector(tensors: Mapping[str, np.ndarray], global_tensors: Mapping[str, np.ndarray], names: Sequence[str],
                  weight: float, clip_range: float) -> np.ndarray:
    """``weight * (tensors - global)`` over the ``params/`` float leaves of ``names`` in name order, then
    ``weight * clip_range``: the director divides the sum by the last entry's to get the weighted mean."""
    leaves = sorted(n for n in names if is_param_leaf(n, np.asarray(tensors[n]).dtype))
    parts = [(np.asarray(tensors[n], np.float64) - np.asarray(global_tensors[n], np.float64)).ravel() * weight
             for n in leaves]
    if any(not np.isfinite(p).all() for p in parts):
        raise RuntimeError("the trained model holds NaN or infinite values: this envoy does not send it to the "
                           "secure aggregation (lower the learning rate, or check the data)")
    return np.concatenate(parts + [np.array([weight * clip_range])])


class SecureUpload:
    """One round's protocol client, created when training ends and dropped after the reveal."""

    def __init__(self, link: SecureLink, experiment: str, round_: int, setup: r.SecAggStep, vector: np.ndarray,
                 applied: tuple[float, float], log=print):
        s = protocol.setup(f"{experiment}/{round_}", setup.participants, setup.threshold, setup.bits,
                           setup.clip_range, setup.size, setup.seed)
        if vector.shape != (s.size,):
            raise RuntimeError(f"the update has {vector.size} entries; the round's secure aggregation expects {s.size}: "
                               "did a task change the model's structure?")
        self.link, self.experiment, self.round, self.applied = link, experiment, round_, applied
        self.client, self.vector = protocol.Client(link.envoy_name, s), vector
        self.done = False
        self.log = log

    def start(self) -> None:
        cipher_pk, mask_pk = self.client.advertise()
        self.link.secagg(self.experiment, self.round, "keys", keys=r.SecAggKeys(cipher_pk, mask_pk))
        self.log(f"[worker {self.link.envoy_name}] round {self.round}: secure aggregation keys sent")

    def step(self, step: r.SecAggStep) -> None:
        """Take the step the director asks for: share, mask (then upload), or unmask."""
        if step.phase == "share":
            keys = {n: (k.cipher_pk, k.mask_pk) for n, k in step.keys.items()}
            self.link.secagg(self.experiment, self.round, "shares", items=self.client.share(keys))
            self.log(f"[worker {self.link.envoy_name}] round {self.round}: secure aggregation shares sent to "
                     f"{len(keys)} neighbours")
        elif step.phase == "mask":
            masked = self.client.mask(self.vector, step.ciphertexts)
            self.vector = None  # the update in the clear is not needed any more
            self.link.upload(self.experiment, self.round, 1, {MASKED_TENSOR: masked}, {}, self.applied)
        elif step.phase == "unmask":
            self.link.secagg(self.experiment, self.round, "reveal",
                             items=self.client.reveal(step.survivors, step.dropped))
            self.done = True
        else:
            raise RuntimeError(f"unknown secure aggregation step {step.phase!r}: this envoy's fedjax-core is older "
                               "than its director's")
