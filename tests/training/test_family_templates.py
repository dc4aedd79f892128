"""Chat rendering and label masks on every built-in family, against renderings written out by hand.

Each expected text below is the family's published format (the turn markers of reference/families.md), typed
here independently of the templates, so a template file or a rendering rule that drifts fails. Expected ids are
the family tokenizer's own encoding of that text, and expected supervised tokens are those whose characters fall
in the hand-marked answer spans: the assistant content through its end-of-turn token, nothing else.
"""

from __future__ import annotations

import pytest

from app.ml.chat import (
    IGNORE_INDEX,
    ChatTemplateError,
    check_chat_support,
    render_chat_example,
    render_chat_prompt,
)
from app.ml.families import FAMILIES, ensure_family_model

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
ANSWER = {"role": "assistant", "content": "4"}

# family -> (messages before the answer, text inference renders for them, what training appends after it).
# The supervised span is the appended text up to and including the end-of-turn token.
EXPECTED: dict[str, tuple[list[dict], str, str, str]] = {
    "llama3": (
        QUESTION,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "4<|eot_id|>",
        "",
    ),
    "qwen2": (
        QUESTION,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "4<|im_end|>",
        "\n",
    ),
    # Thinking off: the generation prompt carries the empty think block training renders before the answer.
    "qwen3": (
        QUESTION,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\n",
        "4<|im_end|>",
        "\n",
    ),
    # The system prompt goes into the last user turn; training keeps it there, as inference renders it.
    "mistral": (QUESTION, "<s>[INST] Be brief.\n\nWhat is 2+2?[/INST]", " 4</s>", ""),
    # No system role in Gemma 2's template; the assistant is called "model".
    "gemma2": (
        QUESTION[1:],
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
        "4<end_of_turn>",
        "\n",
    ),
    "phi3": (
        QUESTION,
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n",
        "4<|end|>",
        "\n<|endoftext|>",
    ),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _tool_conversation() -> list[dict]:
    call = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    return [
        {"role": "system", "content": "You check the weather."},
        {"role": "user", "content": "usermarkera: weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call00001", "content": "toolmarker: rain"},
        {"role": "assistant", "content": "It rains in Oslo."},
        {"role": "user", "content": "usermarkerb: and tomorrow?"},
        {"role": "assistant", "content": "Dry."},
    ]


# Families whose templates render system, tool calls, tool results and tools (Gemma 2 refuses system and tool
# turns; Phi-3's template drops tool turns): for these the whole agent conversation is trained.
TOOL_FAMILIES = ["llama3", "qwen2", "qwen3", "mistral"]
# Templates that never rewrite history, so every assistant turn is trained after exactly its inference prompt.
# (Qwen3 writes the think block only before the last answer; Mistral moves the system prompt to the last turn.)
STABLE_HISTORY = ["llama3", "qwen2", "phi3"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("families")
    return {name: AutoTokenizer.from_pretrained(ensure_family_model(root, name)) for name in FAMILIES}


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _expected_labels(tokenizer, text: str, spans: list[tuple[int, int]]) -> list[int]:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [
        token if any(s <= begin < e for s, e in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    ]


def _supervised_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return runs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_renders_the_published_format_to_the_expected_ids_and_supervises_only_the_answer(tokenizers, family):
    tokenizer = tokenizers[family]
    before, prompt_text, answer_text, tail = EXPECTED[family]
    text = prompt_text + answer_text + tail

    prompt = render_chat_prompt(before, tokenizer)
    assert prompt == _encode(tokenizer, prompt_text)
    ids, labels = render_chat_example([*before, ANSWER], tokenizer)
    assert ids == _encode(tokenizer, text)
    assert labels == _expected_labels(tokenizer, text, [(len(prompt_text), len(prompt_text) + len(answer_text))])
    # The generation prompt at inference is exactly what training put before the answer.
    assert ids[: len(prompt)] == prompt
    # The family's markers are single special tokens, and the answer ends on one of its stop tokens.
    stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in FAMILIES[family].stop_tokens}
    assert [t for t in labels if t != IGNORE_INDEX][-1] in stop_ids


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_an_agent_conversation_trains_every_assistant_turn_and_nothing_else(tokenizers, family):
    tokenizer = tokenizers[family]
    messages = _tool_conversation()
    check_chat_support(messages, tokenizer, [WEATHER_TOOL])
    ids, labels = render_chat_example(messages, tokenizer, [WEATHER_TOOL])
    runs = _supervised_runs(ids, labels)

    assert len(runs) == 3  # the tool call, and the two answers
    stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in FAMILIES[family].stop_tokens}
    texts = [tokenizer.decode(run) for run in runs]
    # Turn markup (a role header, the generation prompt) is not the model's to write; tool-call markers are.
    markup = {tokenizer.convert_tokens_to_ids(t) for t in FAMILIES[family].control_tokens} - {
        tokenizer.convert_tokens_to_ids(t) for t in ("[TOOL_CALLS]", "<|python_tag|>")
    }
    for run in runs:
        assert run[-1] in stop_ids and not (stop_ids | markup) & set(run[:-1])
    assert "get_weather" in texts[0] and "Oslo" in texts[0]
    assert "It rains in Oslo." in texts[1] and "Dry." in texts[2]
    for marker in ("usermarker", "toolmarker", "You check the weather", "Current weather"):
        assert not any(marker in t for t in texts)
        assert marker in tokenizer.decode(ids)  # present in the input, just not supervised

    # The last answer is trained after exactly the prompt inference renders for it.
    prompt = render_chat_prompt(messages[:-1], tokenizer, [WEATHER_TOOL])
    assert ids[: len(prompt)] == prompt


@pytest.mark.parametrize("family", STABLE_HISTORY)
def test_every_turn_of_a_multi_turn_conversation_follows_its_inference_prompt(tokenizers, family):
    tokenizer = tokenizers[family]
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Of grass?"},
        {"role": "assistant", "content": "Green.", "weight": 0},
        {"role": "user", "content": "Of snow?"},
        {"role": "assistant", "content": "White."},
    ]
    ids, labels = render_chat_example(messages, tokenizer)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render_chat_prompt(messages[:i], tokenizer)
            assert ids[: len(prompt)] == prompt
            supervised = labels[len(prompt)] != IGNORE_INDEX
            assert supervised == (message.get("weight", 1) == 1)
    runs = [tokenizer.decode(run) for run in _supervised_runs(ids, labels)]
    assert len(runs) == 2 and "Blue." in runs[0] and "White." in runs[1]  # "Green." has weight 0


@pytest.mark.parametrize(
    ("family", "messages", "tools", "named"),
    [
        ("gemma2", [*QUESTION, ANSWER], None, "'system' messages"),
        ("gemma2", _tool_conversation()[1:], None, "'tool' messages"),
        ("phi3", _tool_conversation()[1:2] + _tool_conversation()[4:5], [WEATHER_TOOL], "'tools'"),
        ("gemma2", [_tool_conversation()[1], {**_tool_conversation()[2], "content": ""}], None, "tool calls"),
        ("phi3", [_tool_conversation()[1], {**_tool_conversation()[2], "content": ""}], None, "tool calls"),
        (
            "phi3",
            [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "c", "content": "y"},
                {"role": "assistant", "content": "z"},
            ],
            None,
            "'tool' messages",
        ),
    ],
)
def test_a_role_the_template_refuses_or_drops_is_named(tokenizers, family, messages, tools, named):
    """The conversation's shape is probed: what the template raises on, and what it leaves out of the text."""
    with pytest.raises(ChatTemplateError, match=named):
        check_chat_support(messages, tokenizers[family], tools)


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_a_tool_call_with_empty_text_is_supported_where_the_template_renders_calls(tokenizers, family):
    messages = [_tool_conversation()[1], {**_tool_conversation()[2], "content": ""}]
    check_chat_support(messages, tokenizers[family], [WEATHER_TOOL])


def test_generation_blocks_mark_the_supervised_spans_when_a_template_has_them(tokenizers):
    """A template with `{% generation %}` blocks is masked by them, not by prefixes: this one opens each answer
    with a fixed "Answer: " outside the block, which the prefix rule would have supervised."""
    tokenizer = tokenizers["qwen2"]
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}Answer: {% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
        "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids, labels = render_chat_example(messages, tokenizer)
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nAnswer: hello<|im_end|>\n"
    start = text.index("hello")
    assert ids == _encode(tokenizer, text)
    assert labels == _expected_labels(tokenizer, text, [(start, start + len("hello<|im_end|>"))])


def test_attention_that_would_drop_soft_capping_or_a_window_is_replaced(tmp_path_factory):
    """SDPA and the per-example training kernel ignore Gemma 2's attention soft-capping (and the per-example
    kernel its sliding window): the model must then run eager attention, in training and serving alike."""
    import torch

    from app.ml.base_model import attention_for, load_causal_lm

    gemma = ensure_family_model(tmp_path_factory.mktemp("gemma"), "gemma2")
    model = load_causal_lm(str(gemma), device=torch.device("cpu"), dtype=torch.float32, attn_implementation="sdpa")
    assert model.config._attn_implementation == "eager"
    config = model.config
    for preferred, expected in [
        ("sdpa", "eager"),
        ("tuneserve_segments", "eager"),
        ("tuneserve_packed_varlen", "tuneserve_packed_varlen"),
        ("flash_attention_2", "flash_attention_2"),
    ]:
        assert attention_for(config, preferred) == expected
    from transformers import LlamaConfig, MistralConfig

    assert attention_for(MistralConfig(sliding_window=4096), "tuneserve_segments") == "sdpa"
    assert attention_for(MistralConfig(sliding_window=None), "tuneserve_segments") == "tuneserve_segments"
    assert attention_for(LlamaConfig(), "sdpa") == "sdpa"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_answer_is_trained_once_when_questions_repeat(tokenizers, family):
    """Repeated questions must not confuse where each answer is: Mistral's template moves the system prompt to
    the last turn, and locating that turn by its question used to find the first asking, training the first
    answer twice and the last never."""
    system = [] if family == "gemma2" else [{"role": "system", "content": "Be brief."}]
    messages = [
        *system,
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Joke one"},
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Joke two"},
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Joke three"},
    ]
    tokenizer = tokenizers[family]
    ids, labels = render_chat_example(messages, tokenizer)
    runs = [tokenizer.decode(run) for run in _supervised_runs(ids, labels)]
    assert [next(a for a in ("one", "two", "three") if a in run) for run in runs] == ["one", "two", "three"], runs
    prompt = render_chat_prompt(messages[:-1], tokenizer)
    assert ids[: len(prompt)] == prompt


def test_a_template_that_rewrites_history_tokenizes_a_long_conversation_a_bounded_number_of_times(
    tokenizers, monkeypatch
):
    # Qwen3 renders earlier turns without the think block its generation prompt opens, so every turn takes the
    # token-wise fallback; the conversation's text must not be tokenized again per turn (quadratic).
    tokenizer = tokenizers["qwen3"]
    messages = [{"role": "system", "content": "Answer in one word."}]
    for i in range(40):
        messages += [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"A{i}."}]
    whole_texts = []
    tokenize = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            whole_texts.append(text)
        return tokenize(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    ids, labels = render_chat_example(messages, tokenizer)
    assert len(_supervised_runs(ids, labels)) == 40
    assert len(whole_texts) <= 3  # the last turn's text, the final text's turns, and the labels
