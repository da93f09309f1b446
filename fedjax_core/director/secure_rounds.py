"""A training round's secure aggregation on the director: which step of SecAgg+ the round is at, what each
participant is told next, and the unmasked sum (``fedjax_core/secagg/protocol.py`` does the cryptography).

The round machine (``round_machine.py``) still decides who is in the round: a participant is done when
it revealed its shares, and one that fails or goes silent is dropped as in any round. This object moves
the protocol on when every participant still in the round has taken the current step, and, when the
round can no longer be unmasked (too few of someone's neighbours left), says so and lets the round
close without averaging. It keeps the running sum of masked vectors, the public keys and the encrypted
shares in memory only: never one participant's update in the clear, and nothing on disk.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedjax_core import records as r
from fedjax_core.aggregation import ArraySource, Upload
from fedjax_core.errors import InvalidRequestError, PreconditionError
from fedjax_core.records import TensorSpec
from fedjax_core.secagg import protocol
from fedjax_core.spec import SecureAggregation

PHASES = ("keys", "shares", "masked", "reveal")


def secure_leaves(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The tensors a secure round sums: the uploaded ``params/`` float leaves, in name order (envoys use the same)."""
    from fedjax_core.aggregation import is_param

    return sorted((s for s in specs if is_param(s)), key=lambda s: s.name)


class SecureRound:
    """One round's SecAgg+ server and progress."""

    def __init__(self, experiment: str, round_: int, participants: Sequence[str], settings: SecureAggregation,
                 leaves: Sequence[TensorSpec], weight_scale: float, seed: int, others: Sequence[TensorSpec] = ()):
        self.leaves = list(leaves)
        self.others = list(others)  # uploaded tensors that are not summed (integer params): the round's model's
        self.weight_scale = weight_scale  # 0: unweighted (central DP)
        self.size = sum(math.prod(s.shape) for s in self.leaves) + 1  # the last entry carries the weight
        self.settings, self.seed = settings, seed
        seed %= 1 << 63  # it travels as an int64
        self.setup = protocol.setup(f"{experiment}/{round_}", participants, settings.threshold, settings.bits,
                                    settings.clip_range, self.size, seed)
        self.server = protocol.Server(self.setup)
        self.phase = 0
        self.done: dict[str, set[str]] = {p: set() for p in PHASES}
        self.failed = ""  # why the round cannot be unmasked, once known
        self.deadline_rearmed_at: float | None = None  # when the round's deadline last passed (its steps then get another)

    # ------------------------------------------------------------------ what each participant does next
    def setup_step(self) -> r.SecAggStep:
        s = self.setup
        return r.SecAggStep(phase="setup", participants=s.participants, threshold=self.settings.threshold,
                            bits=s.bits, clip_range=s.clip_range, size=s.size, seed=self.seed,
                            weight_scale=self.weight_scale)

    def task_step(self, envoy: str) -> r.SecAggStep | None:
        """The step ``envoy`` takes now: None while it waits for the others (or trains first: not in ``keys``)."""
        phase = PHASES[self.phase]
        if self.failed or envoy in self.done[phase] or phase == "keys":
            return None
        if phase == "shares":
            keys = {n: r.SecAggKeys(*k) for n, k in self.server.keys_for(envoy).items()}
            return r.SecAggStep(phase="share", keys=keys)
        if phase == "masked":
            return r.SecAggStep(phase="mask", ciphertexts=self.server.shares_for(envoy))
        survivors, dropped = self.server.unmask_request(envoy)
        return r.SecAggStep(phase="unmask", survivors=tuple(survivors), dropped=tuple(dropped))

    @property
    def current_step(self) -> str:
        """What the round collects now: keys, shares, masked or reveal."""
        return PHASES[self.phase]

    def trained(self, envoy: str) -> bool:
        """Whether ``envoy`` trained and advertised its keys (else its next task is the round's TRAIN)."""
        return envoy in self.done["keys"]

    # ------------------------------------------------------------------ what participants send
    def _expect(self, envoy: str, phase: str) -> None:
        if self.failed:
            raise PreconditionError(f"the secure aggregation of this round failed: {self.failed}")
        if PHASES[self.phase] != phase or envoy in self.done[phase]:
            raise PreconditionError(f"envoy {envoy!r} sends its secure aggregation {phase} out of turn (the round "
                                    f"collects {PHASES[self.phase]})")

    def add(self, envoy: str, phase: str, keys: r.SecAggKeys | None = None,
            items: dict[str, bytes] | None = None) -> None:
        """``envoy``'s keys, encrypted shares or revealed shares; refused out of turn or malformed."""
        self._expect(envoy, phase)
        try:
            if phase == "keys":
                self.server.add_keys(envoy, keys.cipher_pk, keys.mask_pk)
            elif phase == "shares":
                self.server.add_shares(envoy, items or {})
            elif phase == "reveal":
                self.server.add_reveal(envoy, items or {})
            else:
                raise InvalidRequestError(f"unknown secure aggregation step {phase!r}")
        except protocol.SecAggError as exc:
            raise InvalidRequestError(f"secure aggregation: {exc}") from None
        self.done[phase].add(envoy)

    def add_masked(self, envoy: str, masked: np.ndarray) -> None:
        self._expect(envoy, "masked")
        try:
            self.server.add_masked(envoy, masked)
        except protocol.SecAggError as exc:
            raise InvalidRequestError(f"secure aggregation: {exc}") from None
        self.done["masked"].add(envoy)

    # ------------------------------------------------------------------ progress
    def advance(self, alive: frozenset[str]) -> tuple[bool, list[str]]:
        """Move on while every participant still in the round (``alive``) took the current step. Returns whether
        it moved, and the participants to count as done because the round can no longer be unmasked."""
        moved = False
        while not self.failed and self.phase < len(PHASES) - 1 and alive <= self.done[PHASES[self.phase]]:
            self.phase += 1
            moved = True
            self.failed = self._infeasible(alive)
        if self.failed:
            return moved, sorted(alive - self.done["reveal"])
        return moved, []

    def _infeasible(self, alive: frozenset[str]) -> str:
        """Why the step just entered cannot succeed with the participants left ('' when it can)."""
        s, phase = self.setup, PHASES[self.phase]
        if phase == "shares":
            short = [e for e in sorted(alive) if len(self.server.keys_for(e)) < s.threshold]
        elif phase == "reveal":
            short = [e for e in sorted(alive) if len(self.server.unmask_request(e)[0]) < s.threshold]
        else:
            return ""
        if short:
            return (f"{', '.join(map(repr, short[:5]))} kept fewer than the {s.threshold} neighbours needed to "
                    f"rebuild masks (threshold {self.settings.threshold} of {len(s.neighbours[short[0]])})")
        return ""

    def fail(self, why: str) -> None:
        self.failed = self.failed or why

    # ------------------------------------------------------------------ the sum
    def aggregate(self, global_model) -> tuple[Upload, int]:
        """The survivors' weighted mean change applied to the round's model, as one upload, and how many envoys it
        sums. Raises protocol.SecAggError when the sum cannot be unmasked."""
        total, survivors = self.server.result()
        weight = total[-1] / self.setup.clip_range
        if not weight > 0:
            raise protocol.SecAggError(f"the unmasked weights sum to {weight:g}, not a positive number")
        mean, arrays, at = total[:-1] / weight, {}, 0
        for spec in self.leaves:
            n = math.prod(spec.shape)
            base = np.empty(n, np.dtype(spec.dtype).newbyteorder("<"))
            base = global_model.read_into(spec.name, 0, base).astype(np.float64)
            arrays[spec.name] = (base + mean[at:at + n]).astype(spec.dtype).reshape(spec.shape)
            at += n
        for spec in self.others:
            kept = np.empty(math.prod(spec.shape), np.dtype(spec.dtype).newbyteorder("<"))
            arrays[spec.name] = global_model.read_into(spec.name, 0, kept).reshape(spec.shape)
        label = f"the secure sum of {len(survivors)} envoys"
        return Upload(label, float(weight), ArraySource(arrays)), len(survivors)
