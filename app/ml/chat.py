"""Rendering of chat and prompt/completion examples into token ids: one code path for training and inference.

Why one path: a model trained on ids that differ from what inference feeds (double BOS, a different
tokenization at a turn boundary, EOS vs end-of-turn) silently underperforms. A conversation is rendered once,
whole, with the model's own chat template and tokenized whole (as `apply_chat_template` and every serving engine
do); supervised spans are character spans of that text, mapped to tokens through the tokenizer's offsets:
- where the template marks assistant spans with `{% generation %}`, those spans;
- otherwise each assistant turn starts where the template's rendering of the conversation before it, with the
  generation prompt, ends (the template's own prefix), or, where the template rewrites earlier turns so that
  prefix does not match, where the message's content appears after the previous turn.
Each span runs through the first end-of-turn token after it, so the model learns to stop. No family is special-
cased: what differs between families lives in their templates.

The last assistant turn is always trained after exactly the text inference renders for it: when the template
renders the whole conversation differently (Mistral's places the system prompt in the last user turn only when
that turn is last), the training text is the inference prompt followed by the answer as the template renders it.

Labels follow the Hugging Face convention: same length as `input_ids`, the id where supervised, -100 elsewhere.
Supervised: the content of assistant messages with weight 1 (default) up to and including their end-of-turn
token; for prompt/completion, the completion and the EOS token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# End-of-turn markers of common chat templates; the first one found in an assistant turn ends supervision.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eot|>", "<|endoftext|>")


class ChatTemplateError(ValueError):
    """The model's chat template cannot render this conversation for training: no template, a role it refuses
    or drops, or assistant turns that cannot be located in its rendering."""


class TemplateRefusal(ChatTemplateError):
    """The template itself raised (its `raise_exception`, or a message it cannot read)."""

    def __init__(self, reason: str, what: str = "this conversation") -> None:
        super().__init__(f"the model's chat template refuses {what}: {reason}")
        self.reason = reason


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end an assistant turn (and stop generation): EOS plus known end-of-turn markers."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in _END_OF_TURN_TOKENS:
        if token in vocab:
            ids.add(int(vocab[token]))
    return ids


# Template switches passed to every rendering. Thinking off: a template with a thinking mode (Qwen3) then ends the
# generation prompt with the empty think block it writes before the last assistant answer in training, so both
# see the same prefix. Templates without the switch ignore it.
TEMPLATE_SWITCHES: dict[str, Any] = {"enable_thinking": False}
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = "tuneserveprobe{}x"


def _encode(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: no `weight`, text parts joined into one string, and tool call
    arguments as objects (OpenAI sends a JSON string; published templates serialise an object)."""
    out = []
    for message in messages:
        clean = {k: v for k, v in message.items() if k != "weight"}
        content = clean.get("content")
        if isinstance(content, list):
            clean["content"] = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if clean.get("tool_calls"):
            clean["tool_calls"] = [_parsed_arguments(call) for call in clean["tool_calls"]]
        out.append(clean)
    return out


def _parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def _render(
    messages: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError("the base model's tokenizer has no chat template; use prompt/completion data")
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            list(messages),
            tools=list(tools) if tools else None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **TEMPLATE_SWITCHES,
        )
    except TemplateError as exc:  # the template's raise_exception, e.g. "System role not supported"
        raise TemplateRefusal(str(exc)) from None
    return cast(str, text)  # tokenize=False renders text (the declared return type covers every mode)


def _stop_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    return [str(tokenizer.convert_ids_to_tokens(i)) for i in sorted(end_of_turn_ids(tokenizer))]


def _end_of_turn(text: str, start: int, stops: list[str], index: int) -> int:
    """The end of the first end-of-turn token at or after `start`."""
    found = [(pos, len(stop)) for stop in stops if (pos := text.find(stop, start)) >= 0]
    if not found:
        raise ChatTemplateError(f"no end-of-turn token follows assistant message {index} in the rendered chat")
    pos, length = min(found)
    return pos + length


def _content_position(text: str, message: dict[str, Any], start: int, index: int, *, last: bool) -> int:
    content = message.get("content")
    needle = content.strip() if isinstance(content, str) else ""
    pos = (text.rfind(needle, start) if last else text.find(needle, start)) if needle else -1
    if pos < 0:
        raise ChatTemplateError(
            f"assistant message {index} cannot be located in the chat template's rendering of the conversation"
        )
    return pos


def _training_text(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None
) -> tuple[str, list[tuple[int, int, int]]]:
    """The text to train on and (start, end, message index) of each assistant span in it."""
    text = _render(messages, tokenizer, tools, add_generation_prompt=False)
    assistants = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not assistants:
        return text, []
    stops = _stop_strings(tokenizer)
    if _GENERATION_BLOCK.search(str(tokenizer.chat_template)):
        return text, _generation_spans(messages, tokenizer, tools, text, assistants, stops)
    last = assistants[-1]
    if last > 0:
        prompt = _render(messages[:last], tokenizer, tools, add_generation_prompt=True)
        if not text.startswith(prompt):
            # The template renders the conversation before the last answer differently when the answer
            # follows: train the answer, as the template writes it, after the prompt inference will render.
            start = _turn_start(messages[:last], tokenizer, tools, _Tokens(text, tokenizer), 0, from_end=True)
            if start < 0:
                start = _content_position(text, messages[last], 0, last, last=True)
            text = prompt + text[start:]
    spans = []
    cursor = 0
    tokens = _Tokens(text, tokenizer)
    for i in assistants:
        start = _turn_start(messages[:i], tokenizer, tools, tokens, cursor) if i > 0 else -1
        if start < 0:
            start = _content_position(text, messages[i], cursor, i, last=False)
        end = _end_of_turn(text, start, stops, i)
        spans.append((start, end, i))
        cursor = end
    return text, spans


class _Tokens:
    """A text and, on first use, its tokens with their offsets: tokenized once however many turns ask."""

    def __init__(self, text: str, tokenizer: PreTrainedTokenizerBase) -> None:
        self.text = text
        self._tokenizer = tokenizer
        self._tokens: list[tuple[int, int, int]] | None = None  # (id, begin, end)

    def starting_at(self, position: int) -> list[tuple[int, int]]:
        """(id, end offset) of each token that begins at or after `position`."""
        if self._tokens is None:
            encoding = self._tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True)
            pairs = zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
            self._tokens = [(token, begin, end) for token, (begin, end) in pairs]
        return [(token, end) for token, begin, end in self._tokens if begin >= position]


def _turn_start(
    before: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    tools: list[dict[str, Any]] | None,
    tokens: _Tokens,
    cursor: int,
    *,
    from_end: bool = False,
) -> int:
    """Where, at or after `cursor`, the assistant turn that follows `before` starts in `text`, or -1: judged by
    the template's own rendering of `before`, with and without its generation prompt. `from_end`: the last such
    place (the last turn of a conversation whose earlier turns may repeat the same question).

    When `text` continues with the rendered prompt, the turn starts where the prompt ends. Otherwise the
    conversation before the turn ends where its rendering does (found by its last message's content and the
    markup after it, when earlier turns were rendered differently), and the turn starts after as much of the
    generation prompt as `text` repeats there, counted in whole tokens (a template may open turns in history
    differently than in its generation prompt, as Qwen3's think block; "<think>" and "<tool_call>" share a
    first character, so characters would over-count).
    """
    text = tokens.text
    prompt = _render(before, tokenizer, tools, add_generation_prompt=True)
    if text.startswith(prompt) and len(prompt) >= cursor:
        return len(prompt)
    history = _render(before, tokenizer, tools, add_generation_prompt=False)
    end = _history_end(history, before[-1], text, cursor, from_end=from_end)
    if end < 0:
        return -1
    opening = prompt[len(history) :] if prompt.startswith(history) else ""
    agreed = end
    for ours, (theirs, stop) in zip(_encode(opening, tokenizer), tokens.starting_at(end), strict=False):
        if ours != theirs:
            break
        agreed = stop
    return agreed


def _history_end(history: str, previous: dict[str, Any], text: str, cursor: int, *, from_end: bool) -> int:
    """The end of `history`'s rendering inside `text` (at or after `cursor`; the last one `from_end`), or -1."""
    if text.startswith(history) and len(history) >= cursor:
        return len(history)
    content = previous.get("content")
    anchor_at = history.rfind(content.strip()) if isinstance(content, str) and content.strip() else -1
    if anchor_at < 0:
        return -1
    anchor = history[anchor_at:]
    found = text.rfind(anchor, cursor) if from_end else text.find(anchor, cursor)
    return found + len(anchor) if found >= 0 else -1


def _generation_spans(
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    tools: list[dict[str, Any]] | None,
    text: str,
    assistants: list[int],
    stops: list[str],
) -> list[tuple[int, int, int]]:
    """Spans the template marks with `{% generation %}`, one per assistant message, each extended through the
    end-of-turn token when the template leaves it outside the block."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template_vars: dict[str, Any] = {**tokenizer.special_tokens_map, **TEMPLATE_SWITCHES}
    # Declared to return text; with return_assistant_tokens_mask it returns (texts, spans per conversation).
    result: Any = render_jinja_template(
        conversations=[messages],
        tools=list(tools) if tools else None,
        chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=True,
        **template_vars,
    )
    rendered, indices = result
    marked = [(int(s), int(e)) for s, e in indices[0]]
    if rendered[0] != text or len(marked) != len(assistants):
        raise ChatTemplateError("the chat template's {% generation %} blocks do not mark one span per assistant turn")
    spans = []
    for (start, end), i in zip(marked, assistants, strict=True):
        if not any(text[start:end].rstrip().endswith(stop) for stop in stops):
            end = _end_of_turn(text, end, stops, i)
        spans.append((start, end, i))
    return spans


def check_chat_support(
    messages: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None = None
) -> None:
    """Raise ChatTemplateError when the model's template refuses or silently drops part of this conversation:
    a role it raises on, a role it leaves out of the rendering (its messages would vanish from training), or
    `tools` or tool calls it ignores. Probes with marker contents and tool names, so what is checked is the
    conversation's shape (values a template checks itself, such as Mistral's 9-character call ids, are kept)."""
    probe = _template_messages(messages)
    expected: list[tuple[str, str]] = []  # (marker, what it stands for)
    for n, message in enumerate(probe):
        calls = message.get("tool_calls") or []
        content = message.get("content")
        # Empty text beside tool calls is no message content to lose.
        if isinstance(content, str) and (content or not calls):
            message["content"] = _PROBE.format(n)
            expected.append((message["content"], f"'{message.get('role')}' messages"))
        for c, call in enumerate(calls):
            if isinstance(call.get("function"), dict) and call["function"].get("name"):
                marker = _PROBE.format(f"{n}call{c}")
                call["function"] = {**call["function"], "name": marker}
                expected.append((marker, "tool calls"))
    try:
        text, _ = _training_text(probe, tokenizer, tools)
    except TemplateRefusal as exc:
        raise TemplateRefusal(exc.reason, _refused_part(probe, tokenizer, tools)) from None
    for marker, what in expected:
        if marker not in text:
            raise ChatTemplateError(f"the model's chat template does not render {what}")
    if tools and text == _training_text(probe, tokenizer, None)[0]:
        raise ChatTemplateError("the model's chat template does not render 'tools'")


def _refused_part(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None
) -> str:
    """Names the first message whose addition the template refuses: "'system' messages (message 0)"."""
    for n in range(1, len(messages) + 1):
        try:
            _render(messages[:n], tokenizer, tools, add_generation_prompt=False)
        except TemplateRefusal:
            message = messages[n - 1]
            kind = " with tool_calls" if message.get("tool_calls") else ""
            return f"'{message.get('role')}' messages{kind} (message {n - 1})"
    return "this conversation"


def render_chat_prompt(
    messages: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Ids inference feeds to generate the next assistant turn after `messages`."""
    return _encode(_render(_template_messages(messages), tokenizer, tools, add_generation_prompt=True), tokenizer)


def render_completion_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids inference feeds for a plain completion: BOS (when the model has one) then the prompt."""
    bos = [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []
    return bos + _encode(prompt, tokenizer)


def render_chat_example(
    messages: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a chat example; see the module docstring for what is supervised."""
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError("the base model needs a fast tokenizer (tokenizer.json) to align labels")
    text, spans = _training_text(_template_messages(messages), tokenizer, tools)
    supervised = [(s, e) for s, e, i in spans if messages[i].get("weight", 1) == 1]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [
        token if any(s <= begin < e for s, e in supervised) else IGNORE_INDEX
        for token, (begin, _) in zip(input_ids, encoding["offset_mapping"], strict=True)
    ]
    return input_ids, labels


def render_prompt_completion_example(
    prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt (masked), then completion and EOS (supervised)."""
    if tokenizer.eos_token_id is None:
        raise ChatTemplateError("the base model's tokenizer has no EOS token")
    prompt_ids = render_completion_prompt(prompt, tokenizer)
    answer = _encode(completion, tokenizer) + [int(tokenizer.eos_token_id)]
    return prompt_ids + answer, [IGNORE_INDEX] * len(prompt_ids) + answer


def render_training_example(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one validated JSONL example, chat or prompt/completion."""
    if "messages" in example:
        return render_chat_example(example["messages"], tokenizer, example.get("tools"))
    if "prompt" in example and "completion" in example:
        return render_prompt_completion_example(example["prompt"], example["completion"], tokenizer)
    raise ValueError("an example must have 'messages' or 'prompt' and 'completion'")
