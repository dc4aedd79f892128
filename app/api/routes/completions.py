"""/v1/completions and /v1/chat/completions: OpenAI's inference endpoints over base and fine-tuned models."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app import ids
from app.api.deps import ProjectDep, RegistryDep, SessionDep, SettingsDep, StorageDep
from app.api.generation import gather_answers, stream_chunks
from app.errors import ServiceUnavailable
from app.inference import Finished, InferenceEngine, TextDelta
from app.schemas.completions import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
)
from app.schemas.errors import ERROR_RESPONSES
from app.services.completions import Serving

router = APIRouter(prefix="/v1", tags=["inference"], responses=ERROR_RESPONSES)

# A client that leaves before the answer is ready gets nothing; 499 is what proxies log for that.
CLIENT_CLOSED = 499


def get_engine(request: Request) -> InferenceEngine:
    engine = request.app.state.inference
    if engine is None:
        raise ServiceUnavailable("Inference is off on this server (TUNESERVE_INFERENCE=off).", code="inference_off")
    return engine


def serving(
    project: ProjectDep,
    session: SessionDep,
    registry: RegistryDep,
    storage: StorageDep,
    settings: SettingsDep,
    engine: Annotated[InferenceEngine, Depends(get_engine)],
) -> Serving:
    return Serving(session, project, registry, storage, engine, settings)


ServingDep = Annotated[Serving, Depends(serving)]


def _usage(prompt_tokens: int, finished: list[Finished]) -> dict:
    completion_tokens = sum(f.completion_tokens for f in finished)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    ).model_dump()


def _sse_response(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/completions", response_model=Completion)
async def create_completion(body: CompletionRequest, request: Request, serving: ServingDep):
    prepared = await run_in_threadpool(serving.prepare_completion, body)
    handles = serving.submit(prepared)
    completion_id, created = ids.completion_id(), int(time.time())

    def echo(index: int) -> str:
        return prepared.prompt_texts[index // body.n] if body.echo else ""

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, event) -> dict | None:
            if event is None and not echo(index):
                return None
            text = echo(index) if event is None else event.text if isinstance(event, TextDelta) else ""
            reason = event.finish_reason if isinstance(event, Finished) else None
            return {
                "id": completion_id, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}],
                **({"usage": None} if include_usage else {}),
            }  # fmt: skip

        def usage_chunk(finished: list[Finished]) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [], "usage": _usage(prepared.prompt_tokens, finished)}  # fmt: skip

        return _sse_response(stream_chunks(handles, chunk, usage_chunk if include_usage else None))

    answers = await gather_answers(request, handles)
    if answers is None:
        return Response(status_code=CLIENT_CLOSED)
    return Completion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[
            CompletionChoice(index=i, text=echo(i) + a.text, finish_reason=a.finished.finish_reason)
            for i, a in enumerate(answers)
        ],
        usage=_usage(prepared.prompt_tokens, [a.finished for a in answers]),
    )


@router.post("/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, serving: ServingDep):
    prepared = await run_in_threadpool(serving.prepare_chat, body)
    handles = serving.submit(prepared)
    completion_id, created = ids.chat_completion_id(), int(time.time())

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, event) -> dict:
            if event is None:
                delta, reason = {"role": "assistant", "content": ""}, None
            elif isinstance(event, TextDelta):
                delta, reason = {"content": event.text}, None
            else:
                delta, reason = {}, event.finish_reason
            return {
                "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "system_fingerprint": None,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}],
                **({"usage": None} if include_usage else {}),
            }  # fmt: skip

        def usage_chunk(finished: list[Finished]) -> dict:
            return {
                "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "system_fingerprint": None, "choices": [], "usage": _usage(prepared.prompt_tokens, finished),
            }  # fmt: skip

        return _sse_response(stream_chunks(handles, chunk, usage_chunk if include_usage else None))

    answers = await gather_answers(request, handles)
    if answers is None:
        return Response(status_code=CLIENT_CLOSED)
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[
            ChatChoice(index=i, message=AssistantMessage(content=a.text), finish_reason=a.finished.finish_reason)
            for i, a in enumerate(answers)
        ],
        usage=_usage(prepared.prompt_tokens, [a.finished for a in answers]),
    )
