"""Turning a completions or chat request into generation requests for the engine: resolve the model for the
caller's project, render the prompt exactly as training did, and check the limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import InvalidRequest
from app.inference import AdapterRef, GenerationHandle, GenerationRequest, InferenceEngine
from app.inference.context_length import check_fits_context
from app.ml.chat import render_chat_prompt, render_completion_prompt
from app.ml.registry import BaseModelRegistry
from app.schemas.completions import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingParams
from app.services import models
from app.services.keys import CurrentProject
from app.services.rate_limits import RateLimiter
from app.storage import Storage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_STOP_SEQUENCES = 4


@dataclass
class Prepared:
    """Generation requests in choice order (prompt by prompt, n per prompt) and what the response reports."""

    requests: list[GenerationRequest]
    prompt_tokens: int
    prompt_texts: list[str]  # for `echo`
    rate_headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the response


def _refuse_unsupported(params: SamplingParams, **unsupported: object) -> None:
    if params.presence_penalty or params.frequency_penalty:
        name = "presence_penalty" if params.presence_penalty else "frequency_penalty"
        raise InvalidRequest(f"{name} is not supported; leave it at 0.", param=name, code="unsupported_parameter")
    if params.logit_bias:
        raise InvalidRequest("logit_bias is not supported.", param="logit_bias", code="unsupported_parameter")
    for name, value in unsupported.items():
        if value:
            raise InvalidRequest(f"{name} is not supported.", param=name, code="unsupported_parameter")


def _stop(params: SamplingParams) -> list[str]:
    stop = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise InvalidRequest(f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings.", param="stop")
    return stop


def _check_sequences(n_prompts: int, n: int, settings: Settings) -> None:
    """Checked before any tokenizing: one request must not become thousands of sequences in the engine."""
    if n_prompts * n > settings.max_sequences_per_request:
        param = "n" if n > 1 else "prompt"
        raise InvalidRequest(
            f"This request asks for {n_prompts * n} sequences ({n_prompts} prompt(s) x n={n}); at most "
            f"{settings.max_sequences_per_request} per request on this server.",
            param=param,
            code="too_many_sequences",
        )


def _max_tokens(requested: int | None, param: str, prompt_len: int, context: int, settings: Settings) -> int:
    if requested is not None and requested > settings.max_tokens_limit:
        raise InvalidRequest(
            f"{param} is at most {settings.max_tokens_limit} on this server.", param=param, code="invalid_value"
        )
    max_tokens = requested if requested is not None else min(settings.max_tokens_limit, context - prompt_len)
    # At least one new token: a prompt that fills the context leaves no room even for the default.
    at_fault = "messages" if param == "max_completion_tokens" else "prompt"
    check_fits_context(prompt_len, max(max_tokens, 1), context, param=at_fault)
    return max_tokens


def _expand(
    params: SamplingParams,
    base: str,
    adapter: AdapterRef | None,
    prompts: list[list[int]],
    max_tokens: int,
    stop: list[str],
    *,
    chat: bool,
    owner: str,
) -> list[GenerationRequest]:
    # With n > 1 and a seed, each choice gets its own seed so the n answers differ but stay reproducible.
    return [
        GenerationRequest(
            base_model=base,
            adapter=adapter,
            prompt_ids=ids,
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=stop,
            seed=None if params.seed is None else params.seed + j,
            # A completion's text continues the prompt's (" Paris" after "The capital is"); a chat answer is a
            # message of its own, whatever space the template wrote before it.
            continues_prompt=not chat,
            owner=owner,
        )
        for ids in prompts
        for j in range(params.n)
    ]


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest("Only text content parts are supported.", param="messages")
            parts.append(part["text"])
        content = "".join(parts)
    role = "system" if message.role == "developer" else message.role
    return {**(message.model_extra or {}), "role": role, "content": content}


@dataclass
class Serving:
    """What answering one request needs: the caller, the database, storage and the engine."""

    session: Session
    project: CurrentProject
    registry: BaseModelRegistry
    storage: Storage
    engine: InferenceEngine
    settings: Settings
    limiter: RateLimiter

    def _model(self, params: SamplingParams) -> tuple[str, AdapterRef | None, PreTrainedTokenizerBase, int]:
        """(base model, adapter, tokenizer, context length) for the requested model, if this project may use it."""
        info = models.get_model(self.session, self.project, self.registry, params.model)
        # Generation and streaming take seconds to minutes and need nothing more from the database: give the
        # connection back now rather than when the response ends.
        self.session.close()
        adapter = None
        if info.adapter_key is not None:
            adapter = AdapterRef(name=info.id, path=models.adapter_dir(self.storage, info))
        base = info.base_model
        return base, adapter, self.engine.tokenizer(base), self.engine.context_length(base)

    def prepare_completion(self, request: CompletionRequest) -> Prepared:
        best_of = (request.best_of or 1) > 1
        _refuse_unsupported(request, logprobs=request.logprobs, suffix=request.suffix, best_of=best_of)
        stop = _stop(request)
        texts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
        if not texts:
            raise InvalidRequest("prompt must not be empty.", param="prompt")
        _check_sequences(len(texts), request.n, self.settings)
        base, adapter, tokenizer, context = self._model(request)
        prompts = [render_completion_prompt(text, tokenizer) for text in texts]
        max_tokens = _max_tokens(request.max_tokens, "max_tokens", max(map(len, prompts)), context, self.settings)
        return self._admitted(
            Prepared(
                _expand(request, base, adapter, prompts, max_tokens, stop, chat=False, owner=self.project.id),
                sum(map(len, prompts)),
                texts,
            )
        )

    def prepare_chat(self, request: ChatCompletionRequest) -> Prepared:
        response_format = (request.response_format or {}).get("type", "text")
        _refuse_unsupported(
            request,
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
            response_format=response_format != "text",
        )
        stop = _stop(request)
        if len(request.messages) > self.settings.max_messages_per_request:
            raise InvalidRequest(
                f"This conversation has {len(request.messages)} messages; at most "
                f"{self.settings.max_messages_per_request} per request on this server.",
                param="messages",
                code="too_many_messages",
            )
        base, adapter, tokenizer, context = self._model(request)
        # The one rendering function training used, so the model sees exactly the prefix it learned from.
        ids = render_chat_prompt([_message_dict(m) for m in request.messages], tokenizer, tools=request.tools)
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        max_tokens = _max_tokens(requested, param, len(ids), context, self.settings)
        return self._admitted(
            Prepared(
                _expand(request, base, adapter, [ids], max_tokens, stop, chat=True, owner=self.project.id), len(ids), []
            )
        )

    def _admitted(self, prepared: Prepared) -> Prepared:
        """Charge the project's rate limits for the request (prompt tokens and every sequence's max_tokens)."""
        budget = prepared.prompt_tokens + sum(r.max_tokens for r in prepared.requests)
        prepared.rate_headers = self.limiter.admit(self.project.id, budget)
        return prepared

    def submit(self, prepared: Prepared) -> list[GenerationHandle]:
        return self.engine.submit_all(prepared.requests)
