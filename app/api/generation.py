"""Running engine handles for an HTTP request: gather whole answers (stopping if the client leaves) or
stream them as server-sent events in OpenAI's chunk format."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request

from app.errors import TuneserveError
from app.inference import Finished, GenerationHandle, TextDelta

DISCONNECT_POLL_SECONDS = 0.1


@dataclass
class Answer:
    text: str
    finished: Finished


async def _read(handle: GenerationHandle) -> Answer:
    parts: list[str] = []
    finished = None
    async for event in handle:
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            finished = event
    return Answer("".join(parts), finished)


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


async def gather_answers(request: Request, handles: list[GenerationHandle]) -> list[Answer] | None:
    """All answers in order, or None if the client went away first (its sequences stop costing compute)."""
    answers = asyncio.ensure_future(asyncio.gather(*(_read(h) for h in handles)))
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({answers, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if answers.done():
            return answers.result()
        return None
    finally:
        watcher.cancel()
        if not answers.done():
            answers.cancel()
        for handle in handles:
            handle.cancel()


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


async def stream_chunks(
    handles: list[GenerationHandle],
    chunk: Callable[[int, TextDelta | Finished | None], dict | None],
    usage_chunk: Callable[[list[Finished]], dict] | None,
) -> AsyncIterator[str]:
    """Interleave the handles' events as they come. `chunk(index, event)` formats one choice's event (None:
    the opening chunk of a choice); `usage_chunk` the closing usage chunk when the client asked for it.
    Starlette cancels this generator when the client disconnects; `finally` then stops the sequences."""
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
            opening = chunk(index, None)
            if opening is not None:
                yield sse(opening)
        while len(finished) < len(handles):
            index, event = await queue.get()
            if isinstance(event, Exception):
                error = event if isinstance(event, TuneserveError) else None
                body = error.envelope() if error else {
                    "error": {"message": "The server had an error while generating.", "type": "server_error",
                              "param": None, "code": None}
                }  # fmt: skip
                yield sse(body)
                return
            if isinstance(event, Finished):
                finished.append(event)
            formatted = chunk(index, event)
            if formatted is not None:
                yield sse(formatted)
        if usage_chunk is not None:
            yield sse(usage_chunk(finished))
        yield sse("[DONE]")
    finally:
        for handle in handles:
            handle.cancel()
        for task in tasks:
            task.cancel()
