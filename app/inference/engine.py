"""The inference engine: base models loaded lazily, an adapter cache, and one batching scheduler per base model.

`submit` runs on the event loop and never blocks on the model: a request whose base model is loaded and whose
adapter is resident goes straight to its scheduler; anything that must be loaded first (a base model, a cold
adapter) is loaded on a small thread pool and the request follows when it is ready.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from app.errors import InvalidRequest, NotFound, ServiceUnavailable, TuneserveError
from app.inference.adapter_cache import AdapterCache, AdapterEntry
from app.inference.adapter_weights import read_adapter
from app.inference.allowance import WaitingAllowance
from app.inference.context_length import check_fits_context
from app.inference.handle import GenerationHandle
from app.inference.metrics import EngineMetrics
from app.inference.runtime import BaseModelRuntime
from app.inference.scheduler import BatchScheduler
from app.inference.sequence import PendingRequest
from app.inference.types import Constraint, GenerationRequest
from app.ml.registry import BaseModelRegistry

if TYPE_CHECKING:
    import torch
    from llguidance import LLMatcher
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class InferenceEngine:
    """Serves `GenerationRequest`s for every base model of `registry` and any number of LoRA adapters.

    `max_batch_size` bounds the rows decoded together; `max_adapters` and `max_adapter_bytes` bound the resident
    adapters (LRU); `max_lora_rank` refuses larger adapters; `scheduling` is "continuous" (default), "static" or
    "per_adapter" (see `app.inference.scheduler`); `max_prefill_tokens` bounds one padded prefill (rows x longest
    prompt); `join_wait_steps` is how many decode steps a newcomer may wait to join a running batch together with
    others; `loader_threads` read base models and adapters off the event loop; `device`/`dtype` override the
    automatic choice (CUDA bf16 if present, else CPU float32).
    """

    def __init__(
        self,
        registry: BaseModelRegistry,
        *,
        max_batch_size: int = 16,
        max_adapters: int = 64,
        max_adapter_bytes: int = 2 * 1024**3,
        max_lora_rank: int = 64,
        scheduling: str = "continuous",
        max_prefill_tokens: int = 16384,
        join_wait_steps: int = 2,
        max_waiting_per_owner: int = 256,
        loader_threads: int = 2,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if max_batch_size < 1 or max_adapters < 1 or max_adapter_bytes < 1:
            raise ValueError("max_batch_size, max_adapters and max_adapter_bytes must be positive")
        self._registry = registry
        self._max_batch_size = max_batch_size
        self._max_lora_rank = max_lora_rank
        self._scheduling = scheduling
        self._max_prefill_tokens = max_prefill_tokens
        self._join_wait_steps = join_wait_steps
        self._allowance = WaitingAllowance(max_waiting_per_owner)
        self._device, self._dtype = device, dtype
        self._metrics = EngineMetrics()
        self._cache = AdapterCache(self._metrics, max_adapters=max_adapters, max_bytes=max_adapter_bytes)
        self._loader = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="inference-loader")
        self._lock = threading.Lock()
        self._runtimes: dict[str, BaseModelRuntime] = {}
        self._schedulers: dict[str, BatchScheduler] = {}
        self._base_locks: dict[str, threading.Lock] = {}
        self._started = False
        self._stopped = False

    # lifecycle

    def start(self) -> None:
        """Start serving; schedulers of base models loaded later start as they load."""
        with self._lock:
            self._started = True
            for scheduler in self._schedulers.values():
                scheduler.start()

    def stop(self) -> None:
        """Stop the scheduler threads; requests still waiting or running end with a ServiceUnavailable error."""
        with self._lock:
            self._stopped = True
        # Loads in flight finish and hand their requests to a scheduler, which then fails them: no handle is left
        # without a last event.
        self._loader.shutdown(wait=True)
        with self._lock:
            schedulers = list(self._schedulers.values())
        for scheduler in schedulers:
            scheduler.stop()

    # base models

    def _runtime(self, base_model: str) -> BaseModelRuntime:
        """The loaded base model, loading it on first use (blocking; one load per model even under concurrency)."""
        runtime = self._runtimes.get(base_model)
        if runtime is not None:
            return runtime
        info = self._registry.resolve(base_model)  # NotFound (param="model") for an unknown name
        with self._lock:
            base_lock = self._base_locks.setdefault(base_model, threading.Lock())
        with base_lock:
            runtime = self._runtimes.get(base_model)
            if runtime is not None:
                return runtime
            runtime = BaseModelRuntime(info, self._device, self._dtype)
            scheduler = BatchScheduler(
                runtime,
                self._cache,
                self._metrics,
                max_batch_size=self._max_batch_size,
                policy=self._scheduling,
                max_prefill_tokens=self._max_prefill_tokens,
                join_wait_steps=self._join_wait_steps,
            )
            with self._lock:
                self._schedulers[base_model] = scheduler
                self._runtimes[base_model] = runtime
                if self._started and not self._stopped:
                    scheduler.start()
            self._metrics.add("base_models_loaded")
            return runtime

    def tokenizer(self, base_model: str) -> PreTrainedTokenizerBase:
        """The base model's tokenizer; loads the base model if needed (blocking: call it off the event loop)."""
        return self._runtime(base_model).tokenizer

    def context_length(self, base_model: str) -> int:
        """Tokens of prompt plus completion the base model accepts; loads it if needed (blocking)."""
        return self._runtime(base_model).context_length

    def check_constraint(self, base_model: str, constraint: Constraint) -> None:
        """Raise InvalidRequest (naming the request field) when the engine cannot enforce this grammar on the base
        model; loads the base model if needed (blocking: call it off the event loop)."""
        self._runtime(base_model).grammar.matcher(constraint)

    # requests

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Queue a request; thread-safe and non-blocking (callable from the event loop).

        Raises `NotFound`/`InvalidRequest` at once when the request is invalid on its face, and `RateLimited`
        when its owner already has `max_waiting_per_owner` sequences waiting; errors found while loading
        (adapter files, base mismatch) are raised from the handle's iteration instead.
        """
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[GenerationRequest]) -> list[GenerationHandle]:
        """Queue the sequences of one client request together: all are checked and counted against their owner's
        waiting allowance before any is queued, so they are refused or taken as a whole."""
        for request in requests:
            self._check(request)
        reserved: Counter[tuple[str, str]] = Counter()
        handles: list[GenerationHandle] = []
        try:
            for queue, count in Counter(_queue(request) for request in requests).items():
                self._allowance.reserve(queue, count)
                reserved[queue] = count
            for request in requests:
                handles.append(self._submit(request))
                reserved[_queue(request)] -= 1  # from here on its handle's first event releases it
        except BaseException:
            for queue, count in reserved.items():
                if count:
                    self._allowance.release(queue, count)
            for handle in handles:  # a request is taken whole or not at all
                handle.cancel()
            raise
        return handles

    def _submit(self, request: GenerationRequest) -> GenerationHandle:
        handle = GenerationHandle(on_first_event=functools.partial(self._allowance.release, _queue(request)))
        self._metrics.add("requests_total")
        runtime = self._runtimes.get(request.base_model)
        if runtime is None:
            self._loader.submit(self._prepare, request, handle)
        else:
            self._check_context(request, runtime)
            self._route(request, handle, runtime, self._matcher(request, runtime))
        return handle

    def _check(self, request: GenerationRequest) -> None:
        if self._stopped:
            raise ServiceUnavailable("The inference engine is shutting down", code="engine_stopped")
        if request.base_model not in self._registry.names():
            raise NotFound(f"The model '{request.base_model}' does not exist", param="model", code="model_not_found")
        if not request.prompt_ids:
            raise InvalidRequest("The prompt is empty", param="prompt")
        if request.max_tokens < (0 if request.prompt_logprobs else 1):
            # 0 only scores the prompt, which only a request asking for the prompt's logprobs can want.
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if request.logprobs is not None and request.logprobs < 0:
            raise InvalidRequest("logprobs must be at least 0", param="logprobs")
        if request.temperature < 0 or not 0 < request.top_p <= 1:
            raise InvalidRequest("temperature must be >= 0 and top_p in (0, 1]", param="temperature")

    def _check_context(self, request: GenerationRequest, runtime: BaseModelRuntime) -> None:
        check_fits_context(len(request.prompt_ids), request.max_tokens, runtime.context_length, param="max_tokens")
        vocab = runtime.model.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise InvalidRequest("The prompt holds token ids outside the model's vocabulary", param="prompt")

    @staticmethod
    def _matcher(request: GenerationRequest, runtime: BaseModelRuntime) -> LLMatcher | None:
        """The request's own grammar matcher, built here so that a grammar the engine cannot enforce is refused
        when the request is submitted, and the scheduler thread builds nothing."""
        return runtime.grammar.matcher(request.constraint) if request.constraint is not None else None

    def _prepare(self, request: GenerationRequest, handle: GenerationHandle) -> None:
        """Loader thread: load the base model, then route as `submit` would have."""
        try:
            runtime = self._runtime(request.base_model)
            self._check_context(request, runtime)
            self._route(request, handle, runtime, self._matcher(request, runtime))
        except Exception as exc:  # the handle must end, whatever went wrong
            if not isinstance(exc, TuneserveError):
                log.exception("preparing a request for %s failed", request.base_model)
                exc = ServiceUnavailable(f"The model '{request.base_model}' could not be loaded", param="model")
            self._metrics.add("requests_failed_total")
            handle.push(exc)

    def _route(
        self,
        request: GenerationRequest,
        handle: GenerationHandle,
        runtime: BaseModelRuntime,
        matcher: LLMatcher | None,
    ) -> None:
        scheduler = self._schedulers[request.base_model]
        if request.adapter is None:
            scheduler.enqueue(PendingRequest(request, handle, None, matcher))
            return
        entry, must_load = self._cache.claim(request.adapter, request.base_model)
        if must_load:
            self._loader.submit(self._load_adapter, entry, runtime)

        def ready(future: Future) -> None:
            error = future.exception()
            if error is not None:
                self._metrics.add("requests_failed_total")
                handle.push(error)
            else:
                scheduler.enqueue(PendingRequest(request, handle, entry, matcher))

        entry.future.add_done_callback(ready)

    def _load_adapter(self, entry: AdapterEntry, runtime: BaseModelRuntime) -> None:
        self._cache.load(
            entry,
            lambda: read_adapter(
                entry.ref,
                runtime.info,
                runtime.lora.module_shapes(),
                max_rank=self._max_lora_rank,
                dtype=runtime.dtype,
            ),
        )

    def evict(self, adapter_name: str) -> None:
        """Drop a resident adapter (e.g. its model was deleted); running requests of it finish first."""
        self._cache.evict(adapter_name)

    def resident_adapters(self) -> list[str]:
        """Names of the resident adapters, least recently used first."""
        return self._cache.resident()

    def metrics(self) -> dict[str, float | int]:
        """A flat snapshot of counters (`*_total`, `*_sum`, `*_count`, `*_bucket_le_*`) and gauges."""
        return self._metrics.snapshot()


def _queue(request: GenerationRequest) -> tuple[str, str]:
    """Where a request waits, for the allowance: its owner's share of its base model's queue."""
    return request.owner, request.base_model
