"""/tokenize, /detokenize and /tokenizer_info: a model's tokenizer over HTTP, at the server's root as vLLM serves
them (evaluation harnesses find them there from the completions URL)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from app.api.deps import TokenizationDep
from app.schemas.errors import ERROR_RESPONSES
from app.schemas.tokenization import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)

router = APIRouter(tags=["tokenization"], responses=ERROR_RESPONSES)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, tokenization: TokenizationDep) -> TokenizeResponse:
    return await run_in_threadpool(tokenization.tokenize, body)  # the first use of a tokenizer loads it


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, tokenization: TokenizationDep) -> DetokenizeResponse:
    return await run_in_threadpool(tokenization.detokenize, body)


@router.get("/tokenizer_info", response_model=TokenizerInfo)
async def tokenizer_info(
    tokenization: TokenizationDep, model: Annotated[str | None, Query(min_length=1, max_length=255)] = None
) -> TokenizerInfo:
    return await run_in_threadpool(tokenization.info, model)
