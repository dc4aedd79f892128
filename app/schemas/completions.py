"""Wire objects of /v1/completions and /v1/chat/completions, mirroring OpenAI's."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from app.schemas.json_types import INTEGRAL, JsonInt

Stop = str | list[str] | None
# Why a choice ended, as the API reports it: an end of turn or stop string, max_tokens, or the model called tools.
FinishReason = Literal["stop", "length", "tool_calls"]


# Request models validate strictly: a value of another JSON type ("0" for an integer, 0.0 for a boolean) is a
# 400 naming it, as the published schema promises, not silently coerced.
STRICT_REQUEST = ConfigDict(extra="forbid", strict=True)
# Seeds are integers that JSON carries exactly everywhere (a double holds integers up to 2**53): a client in any
# language, and the published schema's bounds, agree on every value.
SEED_LIMIT = 2**53 - 1


class StreamOptions(BaseModel):
    # Strict, but open: OpenAI adds options here (include_obfuscation) that change nothing a client relies on.
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class SamplingParams(BaseModel):
    """What both endpoints take. Unknown keys are refused with a 400 naming them, as OpenAI does."""

    model_config = STRICT_REQUEST

    model: str = Field(min_length=1, max_length=255)
    # Temperatures below 1e-5 decode greedily (app/inference/sampling.py); top_p keeps the likeliest token.
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: JsonInt = Field(default=1, ge=1, le=16)
    stop: Stop = None
    seed: Annotated[int, Field(ge=-SEED_LIMIT, le=SEED_LIMIT), INTEGRAL] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted at their neutral values only (not implemented otherwise); refused with a 400 if set.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


# Bounded so that no id reaches a tokenizer as an integer it cannot hold; ids beyond the model's vocabulary are a
# 400 from the engine.
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1), INTEGRAL]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(SamplingParams):
    # Text, several texts, token ids, or several lists of token ids, as OpenAI accepts them.
    prompt: str | list[str] | TokenIds | list[TokenIds]
    # 0 with `echo` scores the prompt and generates nothing (the loglikelihood requests of evaluation harnesses).
    max_tokens: Annotated[int, Field(ge=0), INTEGRAL] | None = 16
    echo: bool = False
    # The log-probability of each token and of the `logprobs` likeliest alternatives (0: the token's own only).
    logprobs: Annotated[int, Field(ge=0), INTEGRAL] | None = None
    suffix: str | None = None
    best_of: JsonInt | None = None
    # vLLM's extra: the completion is one JSON value valid against this schema.
    guided_json: dict[str, Any] | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_error_for_prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # A prompt that fits none of the four shapes fails once per shape; one message names what is accepted.
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "prompt_shape",
                "expected a string, a list of strings, a non-empty list of token ids (integers >= 0) or a list of "
                "such lists",
            ) from None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, sent back as the answer gave them


class JsonSchemaSpec(BaseModel):
    """OpenAI's `response_format.json_schema`. The schema is enforced whether or not `strict` is set."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = STRICT_REQUEST
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    """Any JSON object."""

    model_config = STRICT_REQUEST
    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    model_config = STRICT_REQUEST
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class NamedFunction(BaseModel):
    model_config = STRICT_REQUEST
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    """`tool_choice` naming the one function the model must call."""

    model_config = STRICT_REQUEST
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    # Kept as sent (checked by app/services/tool_calls.py): the template renders them as training rendered the
    # training file's tools, key order included.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0), INTEGRAL] | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per token of the choice's text (the echoed prompt's first, with `null` for its first token, which nothing
    predicts): the token as text, its logprob, the likeliest alternatives by their text, and where the token starts
    in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes: tokens may hold part of a character


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("tool_calls") is None:  # as OpenAI: the key appears only when the model called tools
            data.pop("tool_calls", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


# Streaming (server-sent events): what the openai SDK parses as Completion and ChatCompletionChunk objects.


class _UsageOnlyWhenAsked(BaseModel):
    """A streamed chunk carries `usage` (null on every chunk but the final usage chunk) only when the client set
    `stream_options.include_usage`; otherwise the key is absent, as OpenAI sends it. Whoever builds a chunk sets
    `usage` (to None or a Usage) exactly when it was asked for."""

    @model_serializer(mode="wrap")
    def _drop_usage_unless_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if "usage" not in self.model_fields_set:
            data.pop("usage", None)
        return data


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionChunk(_UsageOnlyWhenAsked):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if key in self.model_fields_set}


class ToolCallDelta(BaseModel):
    """A streamed tool call, as OpenAI streams one: its first delta has the id, type and name with empty arguments,
    later ones add to the arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if key in self.model_fields_set}


class ChatDelta(BaseModel):
    """What a chunk adds to the assistant's message: the role once at the start (with empty content), then
    content or tool calls; the closing delta is empty. Unset keys are left out, as the SDK reads absent keys as no
    change."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if key in self.model_fields_set}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_UsageOnlyWhenAsked):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
