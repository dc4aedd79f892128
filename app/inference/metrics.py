"""Counters and gauges of the engine, read as one flat snapshot that the API exports in Prometheus format."""

from __future__ import annotations

import threading

# Upper bounds of the batch-size histogram (cumulative buckets, Prometheus style, plus +Inf).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class EngineMetrics:
    """Thread-safe counters. Names ending in `_total` only grow; the rest are gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {
            "requests_total": 0,
            "requests_finished_stop_total": 0,
            "requests_finished_length_total": 0,
            "requests_cancelled_total": 0,
            "requests_failed_total": 0,
            "prompt_tokens_total": 0,
            "generated_tokens_total": 0,
            "decode_steps_total": 0,
            "prefills_total": 0,
            "batch_size_sum": 0,
            "batch_size_count": 0,
            "adapter_cache_hits_total": 0,
            "adapter_cache_misses_total": 0,
            "adapter_loads_total": 0,
            "adapter_load_failures_total": 0,
            "adapter_evictions_total": 0,
            "adapter_load_seconds_sum": 0.0,
            "adapter_load_seconds_count": 0,
            "base_models_loaded": 0,
            "queue_depth": 0,
            "running_requests": 0,
            "adapters_resident": 0,
            "adapter_bytes_resident": 0,
            # Device memory of the LoRA slot tables: padded to the largest rank seen and to a doubling slot count,
            # and never shrunk, so it can exceed the resident adapters' bytes by far.
            "lora_table_bytes": 0,
            # Decode steps a request waited between arriving and entering the batch: what fair admission bounds.
            "admission_wait_steps_sum": 0,
            "admission_wait_steps_count": 0,
            "admission_wait_steps_max": 0,
        }
        for bound in BATCH_SIZE_BUCKETS:
            self._values[f"batch_size_bucket_le_{bound}"] = 0
        self._values["batch_size_bucket_le_inf"] = 0

    def add(self, name: str, amount: float = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._values[name] = value

    def observe_admission_wait(self, steps: int) -> None:
        with self._lock:
            self._values["admission_wait_steps_sum"] += steps
            self._values["admission_wait_steps_count"] += 1
            self._values["admission_wait_steps_max"] = max(self._values["admission_wait_steps_max"], steps)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self._values["batch_size_sum"] += size
            self._values["batch_size_count"] += 1
            self._values["decode_steps_total"] += 1
            for bound in BATCH_SIZE_BUCKETS:
                if size <= bound:
                    self._values[f"batch_size_bucket_le_{bound}"] += 1
            self._values["batch_size_bucket_le_inf"] += 1

    def snapshot(self) -> dict[str, float | int]:
        with self._lock:
            return dict(self._values)
