"""The objects the API layer exchanges with the inference engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# "stop": an end-of-turn token or a stop string; "length": max_tokens reached; "cancelled": the handle was cancelled.
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class AdapterRef:
    """A fine-tuned model the API has resolved from the database and authorised for the caller's project.

    `name` is the model id (the cache key); `path` the local directory holding `adapter_config.json` and
    `adapter_model.safetensors`.
    """

    name: str
    path: Path


@dataclass(frozen=True)
class Constraint:
    """What a completion's text must match: a grammar in llguidance's format, built by `app.inference.grammar`
    from a JSON schema or a Lark grammar. `param` names the request field it came from, for its errors."""

    grammar: str
    param: str


@dataclass
class GenerationRequest:
    """One completion to generate: already rendered prompt ids plus sampling parameters.

    `temperature` 0 means greedy. `seed` makes sampling reproducible (a per-request generator). `stop` strings
    end the text before the first occurrence. `min_tokens` refuses end-of-turn before that many tokens; the
    benchmark uses it to force fixed-length outputs.

    `continues_prompt`: the completion's text is what it appends to the prompt's text (a plain completion: " Paris"
    after "The capital of France is"). False: its text as decoded on its own, as a chat answer reads after the
    template's turn opening: SentencePiece-style decoders (Mistral) then drop the one space that templates such as
    Mistral's write between the opening and the answer (`" " + content|trim`).

    `owner`: who asked (the API passes the project); see the scheduler's fair admission.

    `logprobs`: None, or report each generated token's log-probability with the `logprobs` likeliest alternatives
    (0: the chosen token only). `prompt_logprobs`: also score the prompt's tokens (each given the ones before it),
    with the same number of alternatives; with `max_tokens` 0 the request only scores its prompt. Log-probabilities
    are the model's own distribution, before temperature, top_p and min_tokens change what is sampled; under a
    `constraint` they are of that distribution restricted to the tokens the grammar allows (as vLLM reports them).

    `constraint`: the text must match this grammar (structured outputs, forced tool calls); the end of turn is
    allowed only where the grammar is complete, so the text always matches unless max_tokens or a stop string cuts
    it short.
    """

    base_model: str
    adapter: AdapterRef | None
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    min_tokens: int = 0
    continues_prompt: bool = True
    # Who asked (the project): admission shares the engine between owners round-robin, and caps what one owner
    # may have waiting, so one owner's burst cannot starve the others.
    owner: str = ""
    logprobs: int | None = None
    prompt_logprobs: bool = False
    constraint: Constraint | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability, and the `top` likeliest tokens at its position as (token id, logprob), likeliest
    first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class TextDelta:
    """New text of a completion; always whole characters (never a split UTF-8 sequence).

    `logprobs`: when the request asked, the generated tokens accepted since the previous delta, in order. A token
    whose text is still held back (an unfinished UTF-8 sequence, a possible stop string) travels with the delta
    that carries its text; the tokens after the last text travel with a closing delta of empty text.
    """

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Finished:
    """The last event of a completion.

    `finish_reason`: "stop" (end-of-turn token or a stop string), "length" (max_tokens reached) or "cancelled"
    (the handle was cancelled). `completion_tokens` counts every generated token, end-of-turn included.
    `prompt_logprobs`: when asked, the prompt's tokens from the second on (the first has nothing to be scored on).
    """

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[TokenLogprob] | None = None
