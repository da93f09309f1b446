"""The envoy registry and liveness: who registered, which daemon holds each name, who is online.

Registration and shard info are durable (the store); when each envoy was last heard from lives
in memory and reaches the database at most every LAST_SEEN_PERSIST_S, so heartbeats stay cheap.
Two clocks: wall time for what the registry shows, a monotonic timer for dropping silent
participants (immune to wall-clock steps).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from fedjax_core import records as r
from fedjax_core.director import limits
from fedjax_core.director.store_api import Store
from fedjax_core.spec import check_name
from fedjax_core.errors import AlreadyExistsError, InvalidRequestError
from fedjax_core.sinks import AGGREGATED_RUN

RESERVED_ENVOY_NAMES = (AGGREGATED_RUN,)  # names that stand for something else in metrics and logs
LAST_SEEN_PERSIST_S = 30.0  # heartbeats update the database's last_seen at most this often (memory always)


class EnvoyRegistry:
    def __init__(self, store: Store, sample_shape: tuple[str, ...], target_shape: tuple[str, ...],
                 health_check_period: float, clock: Callable[[], float], timer: Callable[[], float]):
        self.store = store
        self.sample_shape, self.target_shape = sample_shape, target_shape
        self.health_check_period = health_check_period
        self._clock, self._timer = clock, timer
        self._lock = threading.Lock()
        self._instances: dict[str, str] = {}  # envoy -> the daemon instance that holds the name
        self._born = timer()
        self._heard: dict[str, float] = {}  # envoy -> when its daemon last registered or beat (timer)
        self._seen: dict[str, float] = {}  # envoy -> the same in wall time, for the registry
        self._persisted_seen: dict[str, float] = {}  # envoy -> when its last_seen was last written

    def register(self, name: str, info: r.ShardInfo, instance_id: str = "") -> None:
        """Register (or re-register) envoy ``name``; refused while another daemon holds the name online."""
        check_name("envoy", name)
        if name.lower() in RESERVED_ENVOY_NAMES:
            raise InvalidRequestError(
                f"envoy name {name!r} is reserved: the aggregated metrics go under it (TensorBoard run "
                f"{AGGREGATED_RUN!r}); start the envoy under another name")
        if tuple(info.sample_shape) != self.sample_shape or tuple(info.target_shape) != self.target_shape:
            raise InvalidRequestError(
                f"envoy {name!r} shard has sample shape {list(info.sample_shape)} and target shape "
                f"{list(info.target_shape)}, but this federation expects {list(self.sample_shape)} and "
                f"{list(self.target_shape)} (director settings sample_shape/target_shape)")
        limits.check_shard_info(name, info)
        with self._lock:
            holder = self._instances.get(name)  # a daemon without an instance id ("") is one more claimant
            silent_for = self._online_since(name) if holder is not None and holder != instance_id else None
            if silent_for is not None:
                raise AlreadyExistsError(
                    f"an envoy named {name!r} is already online (last heard {silent_for:.0f}s ago): "
                    "stop that daemon or start this one under another name; a restarted daemon is accepted once "
                    f"the old one has been silent for {2.5 * self.health_check_period:g}s")
            self._instances[name] = instance_id
        self.store.upsert_envoy(name, info)
        self._heard[name] = self._timer()
        self._seen[name] = self._persisted_seen[name] = self._clock()

    def heartbeat_in_memory(self, name: str, instance_id: str = "") -> bool:
        """The common heartbeat, from memory alone (no database, no lock): True when ``name``, held by this
        ``instance_id``, was online and its last-seen time is persisted recently enough; False (nothing done)
        when ``heartbeat`` must run instead (a refusal, a database write due, an envoy coming back online)."""
        if self._instances.get(name, instance_id) != instance_id:
            return False
        now, persisted = self._clock(), self._persisted_seen.get(name)
        seen = self._seen.get(name)
        if persisted is None or now - persisted >= LAST_SEEN_PERSIST_S or seen is None or not self._online(seen):
            return False
        self._heard[name] = self._timer()
        self._seen[name] = now
        return True

    def heartbeat(self, name: str, instance_id: str = "") -> tuple[bool, bool]:
        """Keep ``name`` online: ``(known, came_online)``; known False means register again (unknown, or the
        name is held by another daemon); came_online True when it had been offline."""
        holder = self._instances.get(name)
        if holder is not None and holder != instance_id:
            return False, False
        now = self._clock()
        if name in self._persisted_seen and now - self._persisted_seen[name] < LAST_SEEN_PERSIST_S:
            known = True  # registered through this director: the database learns of it every LAST_SEEN_PERSIST_S
        else:
            known = self.store.touch_envoy(name)
            if known:
                self._persisted_seen[name] = now
        came_online = known and not (name in self._seen and self._online(self._seen[name]))
        if known:
            self._heard[name] = self._timer()
            self._seen[name] = now
        return known, came_online

    def _online(self, last_seen: float) -> bool:
        return self._clock() - last_seen <= 2.5 * self.health_check_period

    def _last_seen(self, name: str, stored: float) -> float:
        """When ``name`` was last heard from: this director's memory, else what the database kept."""
        return max(self._seen.get(name, stored), stored)

    def _online_since(self, name: str) -> float | None:
        """Seconds since ``name`` was last heard from, if it still counts as online."""
        found = self.store.envoy(name)
        if found is None:
            return None
        seen = self._last_seen(name, found[1])
        return self._clock() - seen if self._online(seen) else None

    def entries(self, after: str, limit: int, running: Callable[[str], Iterable[str]]) -> list[r.EnvoyEntry]:
        """Registered envoys by name: ``limit`` of them (-1: all) whose names sort after ``after``; ``running``
        gives the experiments an envoy works for now."""
        entries = []
        for name, info, stored in self.store.envoys(after, limit):
            seen = self._last_seen(name, stored)
            entries.append(r.EnvoyEntry(name=name, shard_info=info, is_online=self._online(seen), last_seen=seen,
                                        current_experiment=", ".join(sorted(running(name)))))
        return entries

    def online(self) -> dict[str, int]:
        """Online envoys -> how many experiments each runs at once (its params.max_experiments)."""
        return {name: max(info.max_experiments, 1) for name, info, seen in self.store.envoys()
                if self._online(self._last_seen(name, seen))}

    def silent_until(self, envoy: str, timeout_s: float) -> float:
        """When ``envoy`` counts as lost (on the timer): ``timeout_s`` after it was last heard from."""
        return self._heard.get(envoy, self._born) + timeout_s

    def sizes(self, envoys: Iterable[str]) -> dict[str, tuple[int, int]]:
        """Each envoy's registered (train, valid) size now: an experiment keeps these for its whole run, so an
        envoy that registers again with another shard cannot change its weight in it."""
        sizes = {}
        for envoy in envoys:
            found = self.store.envoy(envoy)
            sizes[envoy] = (found[0].train_size, found[0].valid_size) if found is not None else (0, 0)
        return sizes
