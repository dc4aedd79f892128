"""Wire objects of /tokenize, /detokenize and /tokenizer_info, in vLLM's shapes: clients (lm-eval among them)
count and align tokens with the served model's tokenizer without its files."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.schemas.completions import STRICT_REQUEST, ChatMessage, TokenIds

ModelName = Field(default=None, min_length=1, max_length=255)


class TokenizeRequest(BaseModel):
    """A text (`prompt`) or a conversation (`messages`, rendered as /v1/chat/completions renders it) of `model`,
    or of the server's default model when none is named."""

    model_config = STRICT_REQUEST

    model: str | None = ModelName
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, validate_default=True)
    tools: list[dict[str, Any]] | None = None
    # With it, a text becomes exactly what /v1/completions feeds the model (BOS first where the model has one).
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @field_validator("messages")
    @classmethod
    def _prompt_or_messages(cls, messages: list[ChatMessage] | None, info: ValidationInfo) -> list[ChatMessage] | None:
        if (info.data.get("prompt") is None) == (messages is None):
            raise ValueError("give either prompt or messages, not both")
        return messages


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = STRICT_REQUEST

    model: str | None = ModelName
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """The tokenizer's configuration: its class, special tokens, chat template and length limit."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int
