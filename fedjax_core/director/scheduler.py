"""The experiment queue: which queued experiments can start now, side by side with the running ones.

An experiment runs on the envoys it names, or on every online envoy when it names none. It can
start when each of them is online and runs fewer experiments than its ``params.max_experiments``
(each experiment has a worker of its own there). The queue is read in submission order; one that
must wait (an envoy offline or busy) does not hold up those behind it that can start.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Mapping

log = logging.getLogger("fedjax.director")


@dataclasses.dataclass(frozen=True)
class Decision:
    envoys: tuple[str, ...] = ()  # it starts on these now
    wait: str = ""  # or it waits, for this reason


def decide(named: tuple[str, ...], online: Mapping[str, int], load: Mapping[str, int]) -> Decision:
    """Whether an experiment naming ``named`` envoys (() for every online one) starts now, and on which.
    ``online``: online envoy -> experiments it runs at once; ``load``: envoy -> experiments it runs now."""
    envoys = named or tuple(sorted(online))
    if not envoys:
        return Decision(wait="no envoy is online")
    offline = sorted(set(envoys) - set(online))
    if offline:
        return Decision(wait=f"offline: {', '.join(offline)}")
    busy = sorted(e for e in envoys if load.get(e, 0) >= online[e])
    if busy:
        return Decision(wait=f"busy with as many experiments as they run at once (params.max_experiments): "
                             f"{', '.join(busy)}")
    return Decision(envoys=envoys)


def load_of(running: Iterable[tuple[str, ...]]) -> Counter:
    """Envoy -> how many of the running experiments (each given by its envoys) it works for."""
    return Counter(envoy for envoys in running for envoy in envoys)


class WaitLog:
    """Logs why a queued experiment waits, once per reason."""

    def __init__(self):
        self._why: dict[str, str] = {}

    def waits(self, name: str, reason: str) -> None:
        if self._why.get(name) != reason:
            self._why[name] = reason
            log.info("experiment %r waits for its envoys (%s); later experiments may start first", name, reason)

    def started(self, name: str) -> None:
        self._why.pop(name, None)
