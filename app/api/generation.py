"""Running engine handles for an HTTP request: gather whole answers (stopping if the client leaves) or stream
them as server-sent events, with the wire objects a `CompletionResponses` or `ChatCompletionResponses` builds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from app.api.errors import CLIENT_CLOSED_REQUEST
from app.errors import TuneserveError
from app.inference import Finished, GenerationHandle, TextDelta, TokenLogprob
from app.schemas.errors import ErrorBody, ErrorResponse
from app.services.completion_responses import Answer

DISCONNECT_POLL_SECONDS = 0.1


class Responses(Protocol):
    """Builds the wire objects of one request's answer (see app/services/completion_responses.py)."""

    stream: bool

    def opening_chunk(self, index: int) -> BaseModel | None: ...
    def event_chunks(self, index: int, event: TextDelta | Finished) -> Sequence[BaseModel]: ...
    def usage_chunk(self, finished: list[Finished]) -> BaseModel | None: ...
    def whole(self, answers: list[Answer]) -> BaseModel: ...


async def respond(
    request: Request, handles: list[GenerationHandle], responses: Responses, headers: dict[str, str]
) -> BaseModel | Response:
    """The answer to a submitted request: an SSE stream (carrying `headers`), or the whole response once every
    choice is done (the route sets `headers` on it)."""
    if responses.stream:
        return StreamingResponse(
            stream_chunks(handles, responses),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **headers},
        )
    answers = await gather_answers(request, handles)
    if answers is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # the client left before the answer was ready
    return responses.whole(answers)


async def _read(handle: GenerationHandle) -> Answer:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    async for event in handle:
        if isinstance(event, Finished):  # always the last event
            return Answer("".join(parts), event, logprobs)
        parts.append(event.text)
        logprobs += event.logprobs
    raise RuntimeError("a generation ended without its Finished event")


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


async def gather_answers(request: Request, handles: list[GenerationHandle]) -> list[Answer] | None:
    """All answers in order, or None if the client went away first (its sequences stop costing compute)."""
    answers = asyncio.ensure_future(asyncio.gather(*(_read(h) for h in handles)))
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        racing: set[asyncio.Future[Any]] = {answers, watcher}
        await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        if answers.done():
            return answers.result()
        return None
    finally:
        watcher.cancel()
        if not answers.done():
            answers.cancel()
        for handle in handles:
            handle.cancel()


def sse(payload: BaseModel | str) -> str:
    # Compact separators and ASCII escapes: the bytes OpenAI's own streams have, which clients already parse.
    data = payload if isinstance(payload, str) else json.dumps(payload.model_dump(mode="json"), separators=(",", ":"))
    return f"data: {data}\n\n"


def _stream_error(error: Exception) -> ErrorResponse:
    """A failure after the 200 went out can only be told in the stream, in the error envelope."""
    if isinstance(error, TuneserveError):
        return ErrorResponse.model_validate(error.envelope())
    body = ErrorBody(message="The server had an error while generating.", type="server_error", param=None, code=None)
    return ErrorResponse(error=body)


async def stream_chunks(handles: list[GenerationHandle], responses: Responses) -> AsyncIterator[str]:
    """Interleave the handles' events as they come: each choice's opening chunk, its events, then the usage chunk
    when the client asked for it, and `[DONE]`. Starlette cancels this generator when the client disconnects;
    `finally` then stops the sequences."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: GenerationHandle) -> None:
        try:
            async for event in handle:
                await queue.put((index, event))
        except Exception as exc:
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    finished: list[Finished] = []
    try:
        for index in range(len(handles)):
            opening = responses.opening_chunk(index)
            if opening is not None:
                yield sse(opening)
        while len(finished) < len(handles):
            index, event = await queue.get()
            if isinstance(event, Exception):
                yield sse(_stream_error(event))
                return
            if isinstance(event, Finished):
                finished.append(event)
            for chunk in responses.event_chunks(index, event):
                yield sse(chunk)
        closing = responses.usage_chunk(finished)
        if closing is not None:
            yield sse(closing)
        yield sse("[DONE]")
    finally:
        for handle in handles:
            handle.cancel()
        for task in tasks:
            task.cancel()
