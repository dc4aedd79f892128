"""The per-request state a running row carries between decode steps, and how a sampled token is accepted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from app.inference.adapter_cache import AdapterEntry
from app.inference.handle import GenerationHandle
from app.inference.sampling import make_generator
from app.inference.text_stream import IncrementalDetokenizer, StopStringFilter
from app.inference.types import Finished, FinishReason, GenerationRequest, TextDelta, TokenLogprob

if TYPE_CHECKING:
    from llguidance import LLMatcher
    from transformers import PreTrainedTokenizerBase


@dataclass
class PendingRequest:
    """A request whose base model and adapter are ready, waiting for a batch slot."""

    request: GenerationRequest
    handle: GenerationHandle
    entry: AdapterEntry | None  # pinned cache entry, None for the base model
    matcher: LLMatcher | None = None  # the request's grammar, where it has a constraint
    enqueued_at_step: int = 0  # the scheduler's decode-step count when it arrived

    @property
    def slot(self) -> int:
        if self.entry is None:
            return 0
        if self.entry.slot is None:  # a pinned entry keeps the slot its load gave it
            raise RuntimeError(f"the adapter {self.entry.ref.name} has no slot")
        return self.entry.slot


class Sequence:
    """A request in the running batch."""

    def __init__(
        self, pending: PendingRequest, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int], device: torch.device
    ) -> None:
        request = pending.request
        self.pending = pending
        self.request = request
        self.handle = pending.handle
        self.slot = pending.slot
        self.matcher = pending.matcher
        self.position = len(request.prompt_ids)  # tokens in the KV cache = position of the next input token
        self.completion_tokens = 0
        self.last_token: int | None = None
        self.finish_reason: FinishReason | None = None
        self.generator = make_generator(request.seed, device)
        self._stop_ids = set(stop_ids)
        context = request.prompt_ids if request.continues_prompt else None
        self._detokenizer = IncrementalDetokenizer(tokenizer, context=context)
        self._stop_filter = StopStringFilter(request.stop)
        self._logprobs: list[TokenLogprob] = []  # accepted tokens whose logprobs have not been sent yet
        self.prompt_logprobs: list[TokenLogprob] | None = None  # set by the prefill when the request asks

    @property
    def scores_only(self) -> bool:
        """A request that scores its prompt and generates nothing (max_tokens 0)."""
        return self.request.max_tokens == 0

    @property
    def suppress_stop_ids(self) -> bool:
        return self.completion_tokens < self.request.min_tokens

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """Record a sampled token (with its logprob when the request asked): emit text, or finish on end-of-turn,
        a stop string or max_tokens."""
        self.completion_tokens += 1
        if logprob is not None:
            self._logprobs.append(logprob)
        if token in self._stop_ids:
            self._finish("stop")
            return
        text = self._stop_filter.feed(self._detokenizer.add(token))
        if text:
            self._push(text)
        if self._stop_filter.stopped:
            self._finish("stop")
        elif self.completion_tokens >= self.request.max_tokens:
            self._finish("length")
        else:
            self.last_token = token

    def end_scored(self) -> None:
        """A prompt-scoring request is done once its prompt is scored."""
        self._finish("length")

    def cancel(self) -> None:
        self.finish_reason = "cancelled"

    def finished_event(self) -> Finished:
        if self.finish_reason is None:
            raise RuntimeError("a sequence is finished only once it has a finish reason")
        return Finished(self.finish_reason, len(self.request.prompt_ids), self.completion_tokens, self.prompt_logprobs)

    def _finish(self, reason: FinishReason) -> None:
        if not self._stop_filter.stopped:
            tail = self._stop_filter.feed(self._detokenizer.flush())
            if self._stop_filter.stopped:
                reason = "stop"
            else:
                tail += self._stop_filter.finish()
            if tail:
                self._push(tail)
        if self._logprobs:  # tokens that added no text (end of turn, a stop string) still report theirs
            self._push("")
        # The scheduler sends Finished once its bookkeeping is done (see BatchScheduler._done).
        self.finish_reason = reason

    def _push(self, text: str) -> None:
        self.handle.push(TextDelta(text, self._logprobs))
        self._logprobs = []
