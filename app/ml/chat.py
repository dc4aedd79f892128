"""Rendering of chat and prompt/completion examples into token ids: one code path for training and inference.

Why one path: a model trained on ids that differ from what inference feeds (double BOS, a different
tokenization at a turn boundary, EOS vs end-of-turn) silently underperforms. Here a conversation is cut into
segments at message boundaries by rendering the model's own chat template on successive prefixes; each
segment is tokenized on its own with `add_special_tokens=False` (the template already holds BOS and the turn
markers). Training and inference concatenate the same segments, so the ids training sees before an assistant
turn are exactly `render_chat_prompt(messages_before_it)`.

Labels follow the Hugging Face convention: same length as `input_ids`, the id where supervised, -100 elsewhere.
Supervised: the content of assistant messages with weight 1 (default) up to and including their end-of-turn
token; for prompt/completion, the completion and the EOS token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# End-of-turn markers of common chat templates; the first one found in an assistant turn ends supervision.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eot|>", "<|endoftext|>")


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used for training (missing, or not prefix-stable)."""


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


def _encode(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(
    messages: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
) -> str:
    if not messages and not add_generation_prompt:
        return ""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError("the base model's tokenizer has no chat template; use prompt/completion data")
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    text = tokenizer.apply_chat_template(
        clean, tools=list(tools) if tools else None, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return cast(str, text)  # tokenize=False renders text (the declared return type covers every mode)


def _chat_segments(
    messages: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
) -> Iterator[tuple[str, bool]]:
    """Yield (text, supervised) pieces whose concatenation is the template's rendering of `messages`.

    An assistant message becomes two pieces: the generation prompt (not supervised) and its content up to the
    end of the turn (supervised unless weight is 0).
    """
    rendered = ""
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            if i == 0:
                with_prompt = _opening_assistant_prompt(message, tokenizer, tools)
            else:
                with_prompt = _render(messages[:i], tokenizer, tools, add_generation_prompt=True)
            _check_prefix(rendered, with_prompt)
            yield with_prompt[len(rendered) :], False
            rendered = with_prompt
            full = _render(messages[: i + 1], tokenizer, tools, add_generation_prompt=False)
            _check_prefix(rendered, full)
            yield full[len(rendered) :], message.get("weight", 1) == 1
        else:
            full = _render(messages[: i + 1], tokenizer, tools, add_generation_prompt=False)
            _check_prefix(rendered, full)
            yield full[len(rendered) :], False
        rendered = full
    if add_generation_prompt:
        full = _render(messages, tokenizer, tools, add_generation_prompt=True)
        _check_prefix(rendered, full)
        yield full[len(rendered) :], False


def _opening_assistant_prompt(
    message: dict[str, Any], tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None
) -> str:
    """The text before an assistant message that opens the conversation. transformers refuses to render an
    empty conversation, so render this message with a marker as its content and cut at the marker."""
    marker = "\u2063tuneserve-content-marker\u2063"
    probe = _render([{"role": "assistant", "content": marker}], tokenizer, tools, add_generation_prompt=False)
    if marker not in probe:
        raise ChatTemplateError("the chat template does not render assistant content as given")
    return probe[: probe.index(marker)]


def _check_prefix(prefix: str, text: str) -> None:
    if not text.startswith(prefix):
        raise ChatTemplateError(
            "the chat template is not prefix-stable (rendering more messages changes earlier text), "
            "so training ids could not match inference ids"
        )


def render_chat_prompt(
    messages: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Ids inference feeds to generate the next assistant turn after `messages`."""
    ids: list[int] = []
    for text, _ in _chat_segments(list(messages), tokenizer, tools, add_generation_prompt=True):
        ids += _encode(text, tokenizer)
    return ids


def render_completion_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids inference feeds for a plain completion: BOS (when the model has one) then the prompt."""
    bos = [int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None else []
    return bos + _encode(prompt, tokenizer)


def render_chat_example(
    messages: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for a chat example; see the module docstring for what is supervised."""
    stops = end_of_turn_ids(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, supervised in _chat_segments(list(messages), tokenizer, tools, add_generation_prompt=False):
        ids = _encode(text, tokenizer)
        input_ids += ids
        if not supervised:
            labels += [IGNORE_INDEX] * len(ids)
            continue
        # Supervise through the first end-of-turn token so the model learns to stop; whatever the template
        # puts after it (a newline before the next turn) belongs to the next prompt, not to the answer.
        end = next((j + 1 for j, t in enumerate(ids) if t in stops), len(ids))
        labels += ids[:end] + [IGNORE_INDEX] * (len(ids) - end)
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
