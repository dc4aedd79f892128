"""The wire answers of one completion request, whole or streamed: `Completion` / `ChatCompletion`, or the chunks
of a server-sent event stream in the shapes the openai SDK parses. Routes stay thin: they hand one of these to
`app.api.generation.respond`, which runs the engine handles and asks it for each object to send."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from app import ids
from app.inference import Finished, TextDelta
from app.schemas.completions import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    FinishReason,
    SamplingParams,
    Usage,
)
from app.services.completions import Prepared

Chunk = TypeVar("Chunk", CompletionChunk, ChatCompletionChunk)


@dataclass
class Answer:
    """One choice, generated to its end."""

    text: str
    finished: Finished


def finish_reason(finished: Finished) -> FinishReason:
    """What the API reports. A generation is cancelled only when nobody reads it any more, so it is never answered."""
    reason = finished.finish_reason
    if reason == "cancelled":
        raise ValueError("a cancelled generation has no answer to report")
    return reason


def usage(prompt_tokens: int, finished: list[Finished]) -> Usage:
    completion_tokens = sum(f.completion_tokens for f in finished)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


class _Responses(Generic[Chunk]):
    """What both endpoints share: one id and timestamp for every object of the answer, and the usage chunk."""

    chunk_type: type[Chunk]

    def __init__(self, request: SamplingParams, prepared: Prepared, response_id: str) -> None:
        self.id, self.created, self.model = response_id, int(time.time()), request.model
        self.stream = request.stream
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)
        self.prepared = prepared

    def _chunk(self, choices: list[Any]) -> Chunk:
        chunk = self.chunk_type(id=self.id, created=self.created, model=self.model, choices=choices)
        if self.include_usage:
            chunk.usage = None  # present, and null until the usage chunk
        return chunk

    def usage_chunk(self, finished: list[Finished]) -> Chunk | None:
        """The closing chunk with no choices and the request's usage; None when the client did not ask."""
        if not self.include_usage:
            return None
        return self.chunk_type(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[],
            usage=usage(self.prepared.prompt_tokens, finished),
        )

    def _usage(self, answers: list[Answer]) -> Usage:
        return usage(self.prepared.prompt_tokens, [a.finished for a in answers])


class CompletionResponses(_Responses[CompletionChunk]):
    """/v1/completions: choice `index` answers prompt `index // n`."""

    chunk_type = CompletionChunk

    def __init__(self, request: CompletionRequest, prepared: Prepared) -> None:
        super().__init__(request, prepared, ids.completion_id())
        self._n, self._echo_prompt = request.n, request.echo

    def _echo(self, index: int) -> str:
        return self.prepared.prompt_texts[index // self._n] if self._echo_prompt else ""

    def _text_chunk(self, index: int, text: str, reason: FinishReason | None = None) -> CompletionChunk:
        return self._chunk([CompletionChunkChoice(index=index, text=text, finish_reason=reason)])

    def opening_chunk(self, index: int) -> CompletionChunk | None:
        """The echoed prompt, when asked for; otherwise a completion stream has no opening chunk."""
        echo = self._echo(index)
        return self._text_chunk(index, echo) if echo else None

    def event_chunk(self, index: int, event: TextDelta | Finished) -> CompletionChunk:
        if isinstance(event, TextDelta):
            return self._text_chunk(index, event.text)
        return self._text_chunk(index, "", finish_reason(event))

    def whole(self, answers: list[Answer]) -> Completion:
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(index=i, text=self._echo(i) + a.text, finish_reason=finish_reason(a.finished))
                for i, a in enumerate(answers)
            ],
            usage=self._usage(answers),
        )


class ChatCompletionResponses(_Responses[ChatCompletionChunk]):
    """/v1/chat/completions: `n` choices answering one conversation."""

    chunk_type = ChatCompletionChunk

    def __init__(self, request: ChatCompletionRequest, prepared: Prepared) -> None:
        super().__init__(request, prepared, ids.chat_completion_id())

    def _delta_chunk(self, index: int, delta: ChatDelta, reason: FinishReason | None = None) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(index=index, delta=delta, finish_reason=reason)])

    def opening_chunk(self, index: int) -> ChatCompletionChunk:
        """Every choice opens with the assistant's role and empty content, as OpenAI streams it."""
        return self._delta_chunk(index, ChatDelta(role="assistant", content=""))

    def event_chunk(self, index: int, event: TextDelta | Finished) -> ChatCompletionChunk:
        if isinstance(event, TextDelta):
            return self._delta_chunk(index, ChatDelta(content=event.text))
        return self._delta_chunk(index, ChatDelta(), finish_reason(event))

    def whole(self, answers: list[Answer]) -> ChatCompletion:
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                ChatChoice(index=i, message=AssistantMessage(content=a.text), finish_reason=finish_reason(a.finished))
                for i, a in enumerate(answers)
            ],
            usage=self._usage(answers),
        )
