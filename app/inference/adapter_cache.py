"""Resident LoRA adapters: an LRU bounded by count and by bytes, loaded once per adapter on first use.

An entry is created by the first request for an adapter; that request's loader reads the files while later
requests for the same adapter attach to the entry's future, so concurrent first requests load once. Every
request pins its entry until it finishes: only cold entries (no pins) are evicted, so an adapter never
disappears under a running request. The bounds may be exceeded while every resident adapter is in use; the cache
shrinks back as requests finish.

The cache only does bookkeeping (which adapter owns which slot of the base model's LoRA tables); the scheduler
thread copies weights into the slot before the adapter's first forward.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

from app.errors import InvalidRequest, ServiceUnavailable, TuneserveError
from app.inference.adapter_weights import AdapterWeights
from app.inference.metrics import EngineMetrics
from app.inference.types import AdapterRef

log = logging.getLogger(__name__)


class AdapterEntry:
    """One adapter for one base model. `future` resolves to the entry once its weights are read and validated."""

    def __init__(self, ref: AdapterRef, base_model: str) -> None:
        self.ref = ref
        self.base_model = base_model
        self.future: Future = Future()
        self.weights: AdapterWeights | None = None  # host copy until the scheduler installs it in `slot`
        self.rank = 0
        self.nbytes = 0
        self.slot: int | None = None
        self.installed = False
        self.pins = 0
        self.evicted = False


class SlotAllocator:
    """Slot ids of one base model's LoRA tables; slot 0 is the base model itself."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self._next = 1

    def take(self) -> int:
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def give_back(self, slot: int) -> None:
        self._free.append(slot)


class AdapterCache:
    def __init__(self, metrics: EngineMetrics, *, max_adapters: int, max_bytes: int) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, AdapterEntry] = OrderedDict()  # least recently used first
        self._slots: dict[str, SlotAllocator] = {}
        self._metrics = metrics
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes

    def claim(self, ref: AdapterRef, base_model: str) -> tuple[AdapterEntry, bool]:
        """Pin the entry for `ref` (creating it on a miss). Returns (entry, whether the caller must load it)."""
        with self._lock:
            entry = self._entries.get(ref.name)
            if entry is not None:
                if entry.base_model != base_model:
                    raise InvalidRequest(
                        f"The model '{ref.name}' is an adapter of '{entry.base_model}', not of '{base_model}'",
                        param="model",
                        code="model_not_servable",
                    )
                entry.pins += 1
                self._entries.move_to_end(ref.name)
                ready = entry.future.done()
                self._metrics.add("adapter_cache_hits_total" if ready else "adapter_cache_misses_total")
                return entry, False
            entry = AdapterEntry(ref, base_model)
            entry.pins = 1
            self._entries[ref.name] = entry
            self._metrics.add("adapter_cache_misses_total")
            return entry, True

    def load(self, entry: AdapterEntry, read: Callable[[], AdapterWeights]) -> None:
        """Run `read()` (-> AdapterWeights) for a claimed entry and resolve its future; errors go to every waiter."""
        started = time.perf_counter()
        try:
            weights = read()
            if weights.nbytes > self.max_bytes:
                raise InvalidRequest(
                    f"The model '{entry.ref.name}' needs {weights.nbytes} bytes, more than the adapter cache holds",
                    param="model",
                    code="model_not_servable",
                )
        except Exception as exc:  # every waiter must hear of a failure, or its request would hang
            if not isinstance(exc, TuneserveError):
                log.exception("loading adapter %s failed", entry.ref.name)
                exc = ServiceUnavailable(
                    f"The model '{entry.ref.name}' could not be loaded", param="model", code="model_unavailable"
                )
            with self._lock:
                if self._entries.get(entry.ref.name) is entry:
                    del self._entries[entry.ref.name]
            self._metrics.add("adapter_load_failures_total")
            entry.future.set_exception(exc)
            return
        with self._lock:
            entry.weights, entry.rank, entry.nbytes = weights, weights.rank, weights.nbytes
            entry.slot = self._slots.setdefault(entry.base_model, SlotAllocator()).take()
            self._metrics.add("adapter_loads_total")
            self._metrics.add("adapter_load_seconds_sum", time.perf_counter() - started)
            self._metrics.add("adapter_load_seconds_count")
            self._shrink_locked()
        entry.future.set_result(entry)

    def release(self, entry: AdapterEntry) -> None:
        """A request of `entry` finished: unpin, and evict cold entries beyond the bounds."""
        with self._lock:
            entry.pins -= 1
            if entry.evicted and entry.pins == 0:
                self._free_slot_locked(entry)
            self._shrink_locked()

    def evict(self, name: str) -> None:
        """Drop `name` now (its slot is reused once its running requests finish); the next request reloads it."""
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is not None:
                self._evict_locked(entry)
            self._update_gauges_locked()

    def _evict_locked(self, entry: AdapterEntry) -> None:
        entry.evicted = True
        self._metrics.add("adapter_evictions_total")
        if entry.pins == 0:
            self._free_slot_locked(entry)

    def _free_slot_locked(self, entry: AdapterEntry) -> None:
        if entry.slot is not None:
            self._slots[entry.base_model].give_back(entry.slot)
            entry.slot = None
        entry.weights = None

    def _shrink_locked(self) -> None:
        for name, entry in list(self._entries.items()):  # least recently used first
            count, nbytes = self._resident_locked()
            if count <= self.max_adapters and nbytes <= self.max_bytes:
                break
            if entry.pins == 0 and entry.future.done():
                del self._entries[name]
                self._evict_locked(entry)
        self._update_gauges_locked()

    def _resident_locked(self) -> tuple[int, int]:
        loaded = [e for e in self._entries.values() if e.slot is not None]
        return len(loaded), sum(e.nbytes for e in loaded)

    def _update_gauges_locked(self) -> None:
        count, nbytes = self._resident_locked()
        self._metrics.set("adapters_resident", count)
        self._metrics.set("adapter_bytes_resident", nbytes)

    def resident(self) -> list[str]:
        """Names of resident adapters, least recently used first."""
        with self._lock:
            return [name for name, e in self._entries.items() if e.slot is not None]
