"""The wire answers of one completion request, whole or streamed: `Completion` / `ChatCompletion`, or the chunks
of a server-sent event stream in the shapes the openai SDK parses. Routes stay thin: they hand one of these to
`app.api.generation.respond`, which runs the engine handles and asks it for each object to send."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from app import ids
from app.inference import Finished, TextDelta, TokenLogprob
from app.schemas.completions import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatTokenLogprob,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    FinishReason,
    FunctionCallDelta,
    SamplingParams,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from app.services.completions import Prepared, anchor_token, token_text

Chunk = TypeVar("Chunk", CompletionChunk, ChatCompletionChunk)


@dataclass
class Answer:
    """One choice, generated to its end."""

    text: str
    finished: Finished
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the generated tokens, when asked


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
        self._token_texts: dict[int, str] = {}
        self._anchor: int | None = None

    def _token_text(self, token: int) -> str:
        """A token as it reads in the text, special tokens included; a token holding part of a UTF-8 character
        reads U+FFFD."""
        text = self._token_texts.get(token)
        if text is None:
            tokenizer = self.prepared.tokenizer
            if self._anchor is None:
                self._anchor = anchor_token(tokenizer)
            text = self._token_texts[token] = token_text(tokenizer, token, self._anchor)
        return text

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
        self._logprobs = request.logprobs is not None
        self._offsets: dict[int, int] = {}  # where each streamed choice's next token starts in its text

    def _echo(self, index: int) -> str:
        return self.prepared.prompt_texts[index // self._n] if self._echo_prompt else ""

    def _scores(self, scores: list[TokenLogprob], offset: int, prompt: list[int] | None = None) -> CompletionLogprobs:
        """The wire logprobs of `scores`, after the prompt's tokens when echoing it (`prompt`: its ids; the first
        has no logprob). Offsets count from `offset`."""
        entries: list[tuple[str, float | None, dict[str, float] | None]] = []
        if prompt is not None:
            entries.append((self._token_text(prompt[0]), None, None))
        for score in scores:
            top: dict[str, float] = {}
            for token, logprob in score.top:  # likeliest first: of two tokens with one text, the likelier stays
                top.setdefault(self._token_text(token), logprob)
            own = self._token_text(score.token)
            top.setdefault(own, score.logprob)  # as OpenAI's, the chosen token is always among them
            entries.append((own, score.logprob, top))
        offsets = []
        for text, _, _ in entries:
            offsets.append(offset)
            offset += len(text)
        return CompletionLogprobs(
            tokens=[text for text, _, _ in entries],
            token_logprobs=[logprob for _, logprob, _ in entries],
            top_logprobs=[top for _, _, top in entries],
            text_offset=offsets,
        )

    def _text_chunk(
        self, index: int, text: str, reason: FinishReason | None = None, logprobs: CompletionLogprobs | None = None
    ) -> CompletionChunk:
        return self._chunk([CompletionChunkChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)])

    def opening_chunk(self, index: int) -> CompletionChunk | None:
        """The echoed prompt, when asked for; otherwise a completion stream has no opening chunk."""
        echo = self._echo(index)
        self._offsets[index] = len(echo)
        return self._text_chunk(index, echo) if echo else None

    def event_chunks(self, index: int, event: TextDelta | Finished) -> list[CompletionChunk]:
        if isinstance(event, Finished):
            return [self._text_chunk(index, "", finish_reason(event))]
        logprobs = None
        if self._logprobs:
            logprobs = self._scores(event.logprobs, self._offsets.get(index, 0))
            self._offsets[index] = self._offsets.get(index, 0) + sum(len(token) for token in logprobs.tokens)
        return [self._text_chunk(index, event.text, logprobs=logprobs)]

    def _choice(self, index: int, answer: Answer) -> CompletionChoice:
        echo = self._echo(index)
        logprobs = None
        if self._logprobs:
            prompt_scores = answer.finished.prompt_logprobs
            if self._echo_prompt and prompt_scores is not None:
                prompt = self.prepared.requests[index].prompt_ids
                logprobs = self._scores(prompt_scores + answer.logprobs, 0, prompt)
            else:
                logprobs = self._scores(answer.logprobs, 0)
        return CompletionChoice(
            index=index, text=echo + answer.text, logprobs=logprobs, finish_reason=finish_reason(answer.finished)
        )

    def whole(self, answers: list[Answer]) -> Completion:
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[self._choice(i, a) for i, a in enumerate(answers)],
            usage=self._usage(answers),
        )


class ChatCompletionResponses(_Responses[ChatCompletionChunk]):
    """/v1/chat/completions: `n` choices answering one conversation."""

    chunk_type = ChatCompletionChunk

    def __init__(self, request: ChatCompletionRequest, prepared: Prepared) -> None:
        super().__init__(request, prepared, ids.chat_completion_id())
        self._logprobs = bool(request.logprobs)
        self._tools = prepared.tool_use
        # A streamed choice that may be a tool-call turn holds its text back until it is known to be one (it then
        # streams as calls at its end) or not (the held text goes out as content): choice -> held deltas.
        self._held: dict[int, list[TextDelta]] = {}

    def _top_logprob(self, token: int, logprob: float) -> TopLogprob:
        text = self._token_text(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    def _scores(self, scores: list[TokenLogprob]) -> ChoiceLogprobs | None:
        if not self._logprobs:
            return None
        content = []
        for score in scores:
            own = self._top_logprob(score.token, score.logprob)
            top = [self._top_logprob(token, logprob) for token, logprob in score.top]
            content.append(ChatTokenLogprob(**own.model_dump(), top_logprobs=top))
        return ChoiceLogprobs(content=content)

    def _delta_chunk(
        self, index: int, delta: ChatDelta, reason: FinishReason | None = None, logprobs: ChoiceLogprobs | None = None
    ) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason)])

    def opening_chunk(self, index: int) -> ChatCompletionChunk:
        """Every choice opens with the assistant's role and empty content, as OpenAI streams it."""
        if self._tools is not None:
            self._held[index] = []
        return self._delta_chunk(index, ChatDelta(role="assistant", content=""))

    def event_chunks(self, index: int, event: TextDelta | Finished) -> list[ChatCompletionChunk]:
        if isinstance(event, TextDelta):
            if self._tools is None:
                return [self._content_chunk(index, [event])]
            return self._hold_or_send(index, event)
        chunks = []
        held = self._held.pop(index, None)
        calls = self._calls("".join(delta.text for delta in held), event) if held is not None else None
        if calls is not None:
            for position, call in enumerate(calls):
                # As OpenAI streams a call: its id, type and name with empty arguments, then the arguments.
                opening = ToolCallDelta(
                    index=position,
                    id=call.id,
                    type="function",
                    function=FunctionCallDelta(name=call.function.name, arguments=""),
                )
                arguments = ToolCallDelta(index=position, function=FunctionCallDelta(arguments=call.function.arguments))
                chunks += [
                    self._delta_chunk(index, ChatDelta(tool_calls=[opening])),
                    self._delta_chunk(index, ChatDelta(tool_calls=[arguments])),
                ]
            return [*chunks, self._delta_chunk(index, ChatDelta(), "tool_calls")]
        if held:
            chunks.append(self._content_chunk(index, held))
        return [*chunks, self._delta_chunk(index, ChatDelta(), finish_reason(event))]

    def _content_chunk(self, index: int, deltas: list[TextDelta]) -> ChatCompletionChunk:
        text = "".join(delta.text for delta in deltas)
        scores = [score for delta in deltas for score in delta.logprobs]
        return self._delta_chunk(index, ChatDelta(content=text), logprobs=self._scores(scores))

    def _hold_or_send(self, index: int, delta: TextDelta) -> list[ChatCompletionChunk]:
        """Hold the choice's text while it may still open a tool-call turn; send it as content once it cannot."""
        held = self._held.get(index)
        if held is None:  # already known to be content
            return [self._content_chunk(index, [delta])]
        held.append(delta)
        if self._tools is None or self._tools.forced:
            return []
        text = "".join("".join(d.text for d in held).split())
        opening = self._tools.form.opening()
        if opening.startswith(text) or text.startswith(opening):
            return []
        del self._held[index]
        return [self._content_chunk(index, held)]

    def _calls(self, text: str, finished: Finished) -> list[ToolCall] | None:
        """The calls of a whole answer, when it is a finished tool-call turn."""
        if self._tools is None or finish_reason(finished) != "stop":
            return None
        return self._tools.read_calls(text)

    def whole(self, answers: list[Answer]) -> ChatCompletion:
        choices = []
        for i, answer in enumerate(answers):
            calls = self._calls(answer.text, answer.finished)
            if calls is not None:
                message = AssistantMessage(content=None, tool_calls=calls)
                choices.append(ChatChoice(index=i, message=message, finish_reason="tool_calls"))
            else:
                choices.append(
                    ChatChoice(
                        index=i,
                        message=AssistantMessage(content=answer.text),
                        logprobs=self._scores(answer.logprobs),
                        finish_reason=finish_reason(answer.finished),
                    )
                )
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self._usage(answers)
        )
