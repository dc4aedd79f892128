"""The one check that a request fits its model's context window, worded as OpenAI words it. The API checks
before it submits (naming the request field at fault); the engine checks again for callers other than the API."""

from __future__ import annotations

from app.errors import InvalidRequest


def check_fits_context(prompt_tokens: int, max_tokens: int, context_length: int, *, param: str) -> None:
    """Raise `context_length_exceeded` unless the prompt plus `max_tokens` new tokens fit in `context_length`."""
    requested = prompt_tokens + max_tokens
    if requested > context_length:
        raise InvalidRequest(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{requested} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
            "Please reduce the prompt or the completion length.",
            param=param,
            code="context_length_exceeded",
        )
