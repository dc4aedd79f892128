"""The batching scheduler of one base model: one thread that owns the model, its LoRA tables and the KV batch.

Policies (how waiting requests enter the batch):
- "continuous" (default): between any two decode steps, waiting requests fill free rows of the batch; a finished
  or cancelled row frees its place at once. Requests of any adapter mix in one batch. A newcomer that cannot fill
  the free rows waits at most `join_wait_steps` decode steps for company, so joins share one prefill forward.
- "static": a batch is admitted only when the previous one has fully finished (batching per `generate` call).
- "per_adapter": static batches of one adapter at a time (the classic PEFT server that switches adapters between
  batches); kept to measure the others against.

Fairness: waiting requests are admitted round-robin across their owners (projects), first come first served
within an owner, so another project's request waits for one free row rather than behind a whole burst. How many
sequences one owner may have waiting is capped when the engine takes a request (app/inference/allowance.py).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import TYPE_CHECKING

import torch

from app.errors import ServiceUnavailable
from app.inference.adapter_cache import AdapterCache
from app.inference.grammar import mask_disallowed
from app.inference.kv_batch import KVBatch
from app.inference.logprobs import token_logprobs
from app.inference.metrics import EngineMetrics
from app.inference.runtime import BaseModelRuntime
from app.inference.sampling import sample_token
from app.inference.sequence import PendingRequest, Sequence
from app.inference.types import TokenLogprob

if TYPE_CHECKING:
    from transformers import DynamicCache

log = logging.getLogger(__name__)
POLICIES = ("continuous", "static", "per_adapter")


class BatchScheduler:
    def __init__(
        self,
        runtime: BaseModelRuntime,
        cache: AdapterCache,
        metrics: EngineMetrics,
        *,
        max_batch_size: int,
        policy: str = "continuous",
        max_prefill_tokens: int = 16384,
        join_wait_steps: int = 2,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}; one of {POLICIES}")
        self._runtime = runtime
        self._cache = cache
        self._metrics = metrics
        self._max_batch_size = max_batch_size
        self._policy = policy
        self._max_prefill_tokens = max_prefill_tokens
        self._join_wait_steps = join_wait_steps
        self._steps = 0  # decode steps so far: the clock of join_wait_steps
        self._cond = threading.Condition()
        self._waiting: deque[PendingRequest] = deque()
        self._rows: list[Sequence] = []
        self._kv = KVBatch()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"inference-{runtime.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        error = ServiceUnavailable("The inference engine is shutting down", code="engine_stopped")
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for pending in waiting:
            self._fail(pending, error)
        for row in self._rows:
            self._fail(row.pending, error)
        self._metrics.add("running_requests", -len(self._rows))
        self._rows = []

    def enqueue(self, pending: PendingRequest) -> None:
        """Thread-safe: hand a ready request to the scheduler thread."""
        with self._cond:
            if self._stopping:
                self._fail(pending, ServiceUnavailable("The inference engine is shutting down", code="engine_stopped"))
                return
            pending.enqueued_at_step = self._steps
            self._waiting.append(pending)
            self._metrics.add("queue_depth", 1)
            self._cond.notify()

    # scheduler thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._rows:
                    self._cond.wait()
                if self._stopping:
                    return
                admitted = self._admissions()
                self._metrics.add("queue_depth", -len(admitted))
            with torch.inference_mode():
                try:
                    if admitted:
                        self._prefill(admitted)
                    self._drop_cancelled()
                    if self._rows:
                        self._decode_step()
                except Exception:  # a failed step must not kill the thread that serves every later request
                    log.exception("generation step failed; failing the running batch")
                    error = ServiceUnavailable("Generation failed on the server", code="generation_failed")
                    for row in self._rows:
                        self._fail(row.pending, error)
                    self._metrics.add("running_requests", -len(self._rows))
                    self._rows, self._kv = [], KVBatch()

    def _admissions(self) -> list[PendingRequest]:
        """Waiting requests to prefill now, by policy, within the batch size and the prefill token budget."""
        if not self._waiting or (self._policy != "continuous" and self._rows):
            return []
        free = self._max_batch_size - len(self._rows)
        if (
            self._rows
            and len(self._waiting) < free
            and self._steps - self._waiting[0].enqueued_at_step < self._join_wait_steps
        ):
            # Joining costs a prefill forward; requests that arrive a few at a time (clients answering each other's
            # completions) join together a step or two later instead of one prefill each.
            return []
        candidates = _round_robin(list(self._waiting))
        if self._policy == "per_adapter" and candidates:
            candidates = [p for p in candidates if p.slot == candidates[0].slot]
        chosen: list[PendingRequest] = []
        width = 0
        for pending in candidates[:free]:
            width = max(width, len(pending.request.prompt_ids))
            # The padded prefill holds rows x longest prompt tokens; one request always fits.
            if chosen and (len(chosen) + 1) * width > self._max_prefill_tokens:
                break
            chosen.append(pending)
        for pending in chosen:
            self._waiting.remove(pending)
            self._metrics.observe_admission_wait(self._steps - pending.enqueued_at_step)
        return chosen

    def _prefill(self, group: list[PendingRequest]) -> None:
        """Prefill newly admitted requests in one left-padded forward and add them to the running batch."""
        runtime = self._runtime
        live = []
        for pending in group:
            if pending.handle.cancelled:
                self._done(Sequence(pending, runtime.decode_tokenizer, [], runtime.device), cancelled=True)
            else:
                live.append(pending)
        if not live:
            return
        try:
            rows, cache, mask, logits = self._prefill_forward(live)
        except Exception:  # these requests fail; the running batch is untouched and goes on
            log.exception("prefill failed")
            for pending in live:
                self._fail(pending, ServiceUnavailable("Generation failed on the server", code="generation_failed"))
            return
        prompts = [pending.request.prompt_ids for pending in live]
        self._metrics.add("prefills_total", len(rows))
        self._metrics.add("prompt_tokens_total", sum(len(p) for p in prompts))
        self._kv.add(cache, mask)
        self._rows += rows
        self._metrics.add("running_requests", len(rows))
        self._accept(rows, logits)
        self._retire_finished()

    def _prefill_forward(
        self, live: list[PendingRequest]
    ) -> tuple[list[Sequence], DynamicCache, torch.Tensor, torch.Tensor]:
        runtime = self._runtime
        for pending in live:
            entry = pending.entry
            if entry is not None and not entry.installed:
                if entry.slot is None or entry.weights is None:  # both set by the load this request waited for
                    raise RuntimeError(f"the adapter {entry.ref.name} reached the scheduler unloaded")
                table_bytes = runtime.lora.table_bytes()
                runtime.lora.install(entry.slot, entry.rank, entry.weights.modules)
                entry.installed, entry.weights = True, None
                self._metrics.add("lora_table_bytes", runtime.lora.table_bytes() - table_bytes)
        rows = [Sequence(pending, runtime.decode_tokenizer, runtime.stop_ids, runtime.device) for pending in live]
        prompts = [pending.request.prompt_ids for pending in live]
        width = max(len(p) for p in prompts)
        pad = runtime.pad_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=runtime.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=runtime.device)
        # Each row counts positions from its first real token, exactly as it would alone.
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        runtime.lora.use([row.slot for row in rows])
        cache = runtime.new_cache()
        scoring = [i for i, row in enumerate(rows) if row.request.prompt_logprobs]
        # Scoring a prompt needs the logits at every position (0 keeps all); otherwise only the last one's.
        logits = runtime.logits(
            cache, input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=0 if scoring else 1
        )
        for i in scoring:
            # Row i's prompt fills the last len(prompt) columns; the logits at a column score the next column's token.
            prompt = prompts[i]
            rows[i].prompt_logprobs = token_logprobs(
                logits[i, width - len(prompt) : width - 1], prompt[1:], rows[i].request.logprobs or 0
            )
        return rows, cache, mask, logits[:, -1, :].float()

    def _decode_step(self) -> None:
        runtime = self._runtime
        rows = self._rows
        runtime.lora.use([row.slot for row in rows])
        tokens = torch.tensor([[row.last_token] for row in rows], dtype=torch.long, device=runtime.device)
        positions = torch.tensor([[row.position] for row in rows], dtype=torch.long, device=runtime.device)
        logits = self._kv.decode(runtime, tokens, positions)
        with self._cond:
            self._steps += 1
        self._metrics.observe_batch(len(rows))
        for row in rows:
            row.position += 1
        self._accept(rows, logits)
        self._retire_finished()

    def _retire_finished(self) -> None:
        rows = self._rows
        keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
        for row in rows:
            if row.finish_reason is not None:
                self._done(row, was_running=True)
        self._rows = [rows[i] for i in keep]
        self._kv.keep(keep)

    def _accept(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row from logits [rows, vocab] and hand it to the row (with its logprob when the
        request asked for them); a row that only scores its prompt ends instead."""
        # Constrained rows may only take what their grammar allows next; free rows share the batch untouched.
        mask_disallowed(logits, [(i, row.matcher) for i, row in enumerate(rows) if row.matcher and not row.scores_only])
        reporting = [i for i, row in enumerate(rows) if row.request.logprobs is not None and not row.scores_only]
        # The model's own distribution (within the grammar): taken before stop ids are suppressed and before
        # temperature or top_p.
        raw = logits[reporting] if reporting else None  # a copy
        suppress = [i for i, row in enumerate(rows) if row.suppress_stop_ids]
        if suppress:
            index = torch.tensor(suppress, device=logits.device)
            logits[index.unsqueeze(1), self._runtime.stop_ids_tensor.unsqueeze(0)] = float("-inf")
        greedy = torch.argmax(logits, dim=-1).tolist()
        # A row whose logits are not numbers (NaN, +inf) or whose sampling raises fails alone; the rest of the
        # batch goes on. (-inf is fine: suppressed stop ids.)
        broken = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1).tolist()
        failed: list[Sequence] = []
        sampled: dict[int, int] = {}
        for i, row in enumerate(rows):
            request = row.request
            if row.scores_only:
                row.end_scored()
                continue
            try:
                if broken[i]:
                    raise FloatingPointError("the model produced non-finite logits for this sequence")
                if request.temperature <= 0:
                    token = greedy[i]
                else:
                    token = sample_token(logits[i], request.temperature, request.top_p, row.generator)
                if row.matcher is not None and not row.matcher.consume_token(token):
                    raise RuntimeError(f"the grammar refused the sampled token: {row.matcher.get_error()}")
            except Exception:
                log.exception("sampling failed for one sequence; failing it alone")
                failed.append(row)
                continue
            sampled[i] = token
        scored = self._score_sampled(rows, reporting, raw, sampled) if raw is not None else {}
        for i, token in sampled.items():
            rows[i].accept(token, scored.get(i))
        self._metrics.add("generated_tokens_total", len(sampled))
        if failed:
            self._fail_running(failed)

    @staticmethod
    def _score_sampled(
        rows: list[Sequence], reporting: list[int], raw: torch.Tensor, sampled: dict[int, int]
    ) -> dict[int, TokenLogprob]:
        """The logprob of each sampled token of the rows that report them; `raw` holds those rows' logits."""
        scored: dict[int, TokenLogprob] = {}
        by_top: dict[int, list[int]] = {}  # one top-k per distinct k in the batch (usually one)
        for j, i in enumerate(reporting):
            if i in sampled:
                by_top.setdefault(rows[i].request.logprobs or 0, []).append(j)
        for top, picked in by_top.items():
            scores = token_logprobs(raw[picked], [sampled[reporting[j]] for j in picked], top)
            scored.update({reporting[j]: score for j, score in zip(picked, scores, strict=True)})
        return scored

    def _fail_running(self, failed: list[Sequence]) -> None:
        """Take `failed` rows out of the running batch and fail their requests; the other rows continue."""
        gone = {id(row) for row in failed}
        keep = [i for i, row in enumerate(self._rows) if id(row) not in gone]
        self._rows = [self._rows[i] for i in keep]
        self._kv.keep(keep)
        self._metrics.add("running_requests", -len(failed))
        for row in failed:
            self._fail(row.pending, ServiceUnavailable("Generation failed on the server", code="generation_failed"))

    def _drop_cancelled(self) -> None:
        cancelled = [i for i, row in enumerate(self._rows) if row.handle.cancelled]
        if not cancelled:
            return
        for i in cancelled:
            self._done(self._rows[i], cancelled=True, was_running=True)
        keep = [i for i in range(len(self._rows)) if i not in set(cancelled)]
        self._rows = [self._rows[i] for i in keep]
        self._kv.keep(keep)

    def _done(self, row: Sequence, cancelled: bool = False, was_running: bool = False) -> None:
        # Bookkeeping first, Finished last: whoever sees Finished also sees the metrics and the unpinned adapter.
        if cancelled:
            row.cancel()
            self._metrics.add("requests_cancelled_total")
        else:
            self._metrics.add(f"requests_finished_{row.finish_reason}_total")
        if was_running:
            self._metrics.add("running_requests", -1)
        if row.pending.entry is not None:
            self._cache.release(row.pending.entry)
        row.handle.push(row.finished_event())

    def _fail(self, pending: PendingRequest, error: Exception) -> None:
        self._metrics.add("requests_failed_total")
        if pending.entry is not None:
            self._cache.release(pending.entry)
        pending.handle.push(error)


def _round_robin(waiting: list[PendingRequest]) -> list[PendingRequest]:
    """Waiting requests in admission order: each owner's first, in the order the owners' oldest requests arrived,
    then each owner's second, and so on. A newcomer's request is in the first round however many another owner
    has queued, so it waits for one free row, not for that owner's whole burst; within an owner, first come first
    served."""
    by_owner: dict[str, list[PendingRequest]] = {}
    for pending in waiting:
        by_owner.setdefault(pending.request.owner, []).append(pending)
    queues = list(by_owner.values())
    order: list[PendingRequest] = []
    for depth in range(max(len(q) for q in queues)):
        order += [queue[depth] for queue in queues if depth < len(queue)]
    return order
