"""/v1/completions and /v1/chat/completions: OpenAI's inference endpoints over base and fine-tuned models."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.api.deps import ServingDep
from app.api.generation import respond
from app.schemas.completions import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest
from app.schemas.errors import ERROR_RESPONSES
from app.services.completion_responses import ChatCompletionResponses, CompletionResponses

router = APIRouter(prefix="/v1", tags=["inference"], responses=ERROR_RESPONSES)


@router.post("/completions", response_model=Completion)
async def create_completion(
    body: CompletionRequest, request: Request, response: Response, serving: ServingDep
) -> BaseModel | Response:
    prepared = await run_in_threadpool(serving.prepare_completion, body)  # tokenizing can load the base model
    response.headers.update(prepared.rate_headers)
    return await respond(request, serving.submit(prepared), CompletionResponses(body, prepared), prepared.rate_headers)


@router.post("/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, response: Response, serving: ServingDep
) -> BaseModel | Response:
    prepared = await run_in_threadpool(serving.prepare_chat, body)
    response.headers.update(prepared.rate_headers)
    return await respond(
        request, serving.submit(prepared), ChatCompletionResponses(body, prepared), prepared.rate_headers
    )
