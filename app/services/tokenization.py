"""Tokenizing and detokenizing with a served model's tokenizer: a fine-tuned model tokenizes as its base model,
and a text as the inference endpoints feed it. The tokenizer alone is loaded (not the weights), so the API
answers these without an inference engine.

A base model's tokenizer is answered without an API key, as vLLM answers these endpoints (lm-eval's remote
tokenizer sends none); a fine-tuned model's only to its project's key."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import AuthenticationFailed, InvalidRequest
from app.ml.base_model import load_tokenizer
from app.ml.chat import ChatTemplateError, render_chat_prompt, render_completion_prompt
from app.ml.registry import BaseModelInfo, BaseModelRegistry
from app.schemas.tokenization import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from app.services import models
from app.services.completions import decode, message_dict
from app.services.keys import CurrentProject

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@functools.lru_cache(maxsize=16)
def _tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(name_or_path)


@dataclass
class Tokenization:
    session: Session
    project: CurrentProject | None  # None: the caller sent no key
    registry: BaseModelRegistry
    settings: Settings

    def _base(self, model: str | None) -> tuple[BaseModelInfo, PreTrainedTokenizerBase]:
        """The base model under `model` (the default model when None), if the caller may use it."""
        name = model or self.settings.default_model
        if name in self.registry.names():
            base_name = name
        elif self.project is None:
            raise AuthenticationFailed(
                f"The model '{name}' is not a base model; a fine-tuned model's tokenizer needs its project's API key "
                "(send it as 'Authorization: Bearer <key>').",
                code="missing_api_key",
            )
        else:
            base_name = models.get_model(self.session, self.project, self.registry, name).base_model
            self.session.close()
        base = self.registry.resolve(base_name)
        return base, _tokenizer(base.name_or_path)

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        base, tokenizer = self._base(request.model)
        if request.messages is not None:
            try:
                ids = render_chat_prompt([message_dict(m) for m in request.messages], tokenizer, tools=request.tools)
            except ChatTemplateError as exc:
                raise InvalidRequest(f"The conversation cannot be rendered: {exc}", param="messages") from None
        elif request.add_special_tokens:
            ids = render_completion_prompt(request.prompt or "", tokenizer)
        else:
            ids = list(tokenizer.encode(request.prompt or "", add_special_tokens=False))
        return TokenizeResponse(
            count=len(ids),
            max_model_len=_max_model_len(base, tokenizer),
            tokens=ids,
            token_strs=cast("list[str]", tokenizer.convert_ids_to_tokens(ids)) if request.return_token_strs else None,
        )

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        _, tokenizer = self._base(request.model)
        if max(request.tokens) >= len(tokenizer):
            raise InvalidRequest(
                f"tokens holds ids outside the tokenizer's vocabulary of {len(tokenizer)}.", param="tokens"
            )
        return DetokenizeResponse(prompt=decode(tokenizer, request.tokens))

    def info(self, model: str | None) -> TokenizerInfo:
        base, tokenizer = self._base(model)
        template = tokenizer.chat_template
        return TokenizerInfo(
            tokenizer_class=type(tokenizer).__name__,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            pad_token=tokenizer.pad_token,
            chat_template=template if isinstance(template, str) else None,
            model_max_length=_max_model_len(base, tokenizer),
        )


def _max_model_len(base: BaseModelInfo, tokenizer: PreTrainedTokenizerBase) -> int:
    """The context length the engine serves (the registry's, else the tokenizer's own limit)."""
    return int(base.context_length or min(tokenizer.model_max_length, 2**31 - 1))
