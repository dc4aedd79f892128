"""Turning a completions or chat request into generation requests for the engine: resolve the model for the
caller's project, render the prompt exactly as training did, and check the limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import InvalidRequest
from app.inference import AdapterRef, Constraint, GenerationHandle, GenerationRequest, InferenceEngine
from app.inference.context_length import check_fits_context
from app.inference.grammar import json_schema_constraint
from app.ml.chat import ChatTemplateError, render_chat_prompt, render_completion_prompt
from app.ml.registry import BaseModelRegistry
from app.schemas.completions import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    ResponseFormat,
    SamplingParams,
)
from app.services import models
from app.services.keys import CurrentProject
from app.services.rate_limits import RateLimiter
from app.services.tool_calls import ToolUse, prepare_tools
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
    tokenizer: PreTrainedTokenizerBase  # the served model's: logprobs name their tokens with it
    rate_headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the response
    tool_use: ToolUse | None = None  # how to read tool calls from the answers (chat with tools)


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


def _check_logprobs(requested: int | None, param: str, settings: Settings) -> None:
    if requested is not None and requested > settings.max_logprobs:
        raise InvalidRequest(
            f"{param} is at most {settings.max_logprobs} on this server.", param=param, code="invalid_value"
        )


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The request's prompts, each a text or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return list(cast("list[str] | list[list[int]]", prompt))


def _response_constraint(response_format: ResponseFormat | None) -> Constraint | None:
    if isinstance(response_format, JsonSchemaFormat):
        return json_schema_constraint(response_format.json_schema.schema_, "response_format")
    if isinstance(response_format, JsonObjectFormat):
        return json_schema_constraint({"type": "object"}, "response_format")
    return None


def decode(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    """The text of token ids, special tokens included."""
    text = tokenizer.decode(token_ids)
    if not isinstance(text, str):  # decode answers a list for a batch of sequences, never for one
        raise TypeError("decoding one sequence gave several")
    return text


def token_text(tokenizer: PreTrainedTokenizerBase, token: int, anchor: int) -> str:
    """A token's text as it reads inside a text: decoded after `anchor` (an ordinary token) with the anchor's own
    text cut off, because SentencePiece decoders drop a lone token's leading space ("▁Yes" alone reads "Yes")."""
    before = decode(tokenizer, [anchor])
    after = decode(tokenizer, [anchor, token])
    return after[len(before) :] if after.startswith(before) else decode(tokenizer, [token])


def anchor_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """An ordinary token for `token_text`: the last of "a"."""
    return int(tokenizer.encode("a", add_special_tokens=False)[-1])


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
    logprobs: int | None = None,
    prompt_logprobs: bool = False,
    constraint: Constraint | None = None,
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
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            constraint=constraint,
        )
        for ids in prompts
        for j in range(params.n)
    ]


def message_dict(message: ChatMessage) -> dict[str, Any]:
    """A request's message as chat rendering takes it (text parts joined; developer is the system role)."""
    content = message.content
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest("Only text content parts are supported.", param="messages")
            parts.append(part["text"])
        content = "".join(parts)
    role = "system" if message.role == "developer" else message.role
    calls = {"tool_calls": [call.model_dump() for call in message.tool_calls]} if message.tool_calls else {}
    return {**(message.model_extra or {}), **calls, "role": role, "content": content}


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
        _refuse_unsupported(request, suffix=request.suffix, best_of=best_of)
        stop = _stop(request)
        given = _prompts(request.prompt)
        if not given:
            raise InvalidRequest("prompt must not be empty.", param="prompt")
        _check_sequences(len(given), request.n, self.settings)
        _check_logprobs(request.logprobs, "logprobs", self.settings)
        if request.max_tokens == 0 and not request.echo:
            raise InvalidRequest(
                "max_tokens 0 generates nothing; it is for scoring a prompt with echo and logprobs.",
                param="max_tokens",
            )
        if request.stream and request.echo and request.logprobs is not None:
            raise InvalidRequest(
                "echo with logprobs is not supported when streaming; ask without stream.", param="echo"
            )
        base, adapter, tokenizer, context = self._model(request)
        constraint = None
        if request.guided_json is not None:
            constraint = self._checked(base, json_schema_constraint(request.guided_json, "guided_json"))
        # Token ids are the model's input as they are; text gets BOS as training rendered it.
        prompts = [render_completion_prompt(p, tokenizer) if isinstance(p, str) else p for p in given]
        texts = [p if isinstance(p, str) else decode(tokenizer, p) for p in given]
        max_tokens = _max_tokens(request.max_tokens, "max_tokens", max(map(len, prompts)), context, self.settings)
        requests = _expand(
            request,
            base,
            adapter,
            prompts,
            max_tokens,
            stop,
            chat=False,
            owner=self.project.id,
            logprobs=request.logprobs,
            # The echoed prompt's tokens are scored too; max_tokens 0 asks only for that.
            prompt_logprobs=request.echo and (request.logprobs is not None or max_tokens == 0),
            constraint=constraint,
        )
        return self._admitted(Prepared(requests, sum(map(len, prompts)), texts, tokenizer))

    def prepare_chat(self, request: ChatCompletionRequest) -> Prepared:
        _refuse_unsupported(request)
        stop = _stop(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs set to true.", param="top_logprobs")
        _check_logprobs(request.top_logprobs, "top_logprobs", self.settings)
        if len(request.messages) > self.settings.max_messages_per_request:
            raise InvalidRequest(
                f"This conversation has {len(request.messages)} messages; at most "
                f"{self.settings.max_messages_per_request} per request on this server.",
                param="messages",
                code="too_many_messages",
            )
        base, adapter, tokenizer, context = self._model(request)
        tool_use, forced_call = prepare_tools(request, tokenizer)
        constraint = _response_constraint(request.response_format)
        if constraint is not None and forced_call is not None:
            raise InvalidRequest(
                "response_format cannot be combined with a tool_choice that forces a call.", param="response_format"
            )
        constraint = self._checked(base, constraint or forced_call)
        # The one rendering function training used, so the model sees exactly the prefix it learned from.
        try:
            ids = render_chat_prompt([message_dict(m) for m in request.messages], tokenizer, tools=request.tools)
        except ChatTemplateError as exc:  # e.g. Mistral's template refuses a call id that is not 9 alphanumerics
            raise InvalidRequest(f"The conversation cannot be rendered: {exc}", param="messages") from None
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        max_tokens = _max_tokens(requested, param, len(ids), context, self.settings)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        requests = _expand(
            request,
            base,
            adapter,
            [ids],
            max_tokens,
            stop,
            chat=True,
            owner=self.project.id,
            logprobs=logprobs,
            constraint=constraint,
        )
        return self._admitted(Prepared(requests, len(ids), [], tokenizer, tool_use=tool_use))

    def _checked(self, base: str, constraint: Constraint | None) -> Constraint | None:
        """The constraint, once the engine has checked it can enforce it (a 400 naming what it cannot): here, off
        the event loop, as building the model's grammar tokenizer the first time takes a moment."""
        if constraint is not None:
            self.engine.check_constraint(base, constraint)
        return constraint

    def _admitted(self, prepared: Prepared) -> Prepared:
        """Charge the project's rate limits for the request (prompt tokens and every sequence's max_tokens)."""
        budget = prepared.prompt_tokens + sum(r.max_tokens for r in prepared.requests)
        prepared.rate_headers = self.limiter.admit(self.project.id, budget)
        return prepared

    def submit(self, prepared: Prepared) -> list[GenerationHandle]:
        return self.engine.submit_all(prepared.requests)
