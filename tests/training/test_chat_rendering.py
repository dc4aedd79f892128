"""Label invariants of the one rendering function, and the train/inference prefix property."""

from __future__ import annotations

from app.ml.chat import (
    IGNORE_INDEX,
    render_chat_prompt,
    render_completion_prompt,
    render_training_example,
)

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello.", "weight": 0},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def supervised_spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def check_basic_invariants(input_ids, labels):
    assert len(input_ids) == len(labels)
    assert all(label in (IGNORE_INDEX, tok) for tok, label in zip(input_ids, labels, strict=True))
    assert any(label != IGNORE_INDEX for label in labels)
    assert any(label == IGNORE_INDEX for label in labels)


def test_multi_turn_chat_supervises_exactly_weighted_assistant_turns_with_end_of_turn(tokenizer):
    input_ids, labels = render_training_example({"messages": MULTI_TURN}, tokenizer)
    check_basic_invariants(input_ids, labels)
    eos = tokenizer.eos_token_id
    spans = supervised_spans(labels)
    texts = [tokenizer.decode(input_ids[a:b]) for a, b in spans]
    # The weight-0 turn and the system/user turns are not trained on; each trained turn ends with its EOS.
    assert texts == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    assert all(input_ids[b - 1] == eos for _, b in spans)
    assert input_ids.count(tokenizer.bos_token_id) == 1 and input_ids[0] == tokenizer.bos_token_id


def test_training_ids_before_each_assistant_turn_equal_the_inference_prompt(tokenizer):
    input_ids, labels = render_training_example({"messages": MULTI_TURN}, tokenizer)
    assistant_at = [i for i, m in enumerate(MULTI_TURN) if m["role"] == "assistant"]
    # Find where each assistant turn's content starts: the weight-0 turn by rendering, the others by labels.
    for k in assistant_at:
        prompt = render_chat_prompt(MULTI_TURN[:k], tokenizer)
        assert input_ids[: len(prompt)] == prompt
        content = tokenizer(MULTI_TURN[k]["content"], add_special_tokens=False)["input_ids"]
        assert input_ids[len(prompt) : len(prompt) + len(content)] == content
    starts = [a for a, _ in supervised_spans(labels)]
    assert starts == [len(render_chat_prompt(MULTI_TURN[:k], tokenizer)) for k in assistant_at[1:]]


def test_system_prompt_and_all_prompt_tokens_are_masked(tokenizer):
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "answer"},
    ]
    input_ids, labels = render_training_example({"messages": messages}, tokenizer)
    prompt = render_chat_prompt(messages[:2], tokenizer)
    assert all(label == IGNORE_INDEX for label in labels[: len(prompt)])
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "answer<|im_end|>"


def test_all_weight_zero_gives_no_supervised_token(tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]
    _, labels = render_training_example({"messages": messages}, tokenizer)
    assert all(label == IGNORE_INDEX for label in labels)


def test_tools_are_rendered_into_the_prompt_and_masked(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "sunny"}]
    input_ids, labels = render_training_example({"messages": messages, "tools": tools}, tokenizer)
    check_basic_invariants(input_ids, labels)
    prompt = render_chat_prompt(messages[:1], tokenizer, tools=tools)
    assert "get_weather" in tokenizer.decode(prompt)
    assert input_ids[: len(prompt)] == prompt
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "sunny<|im_end|>"


def test_prompt_completion_supervises_completion_and_eos(tokenizer):
    example = {"prompt": "Translate: chat ->", "completion": " cat"}
    input_ids, labels = render_training_example(example, tokenizer)
    check_basic_invariants(input_ids, labels)
    prompt = render_completion_prompt(example["prompt"], tokenizer)
    assert input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in labels[: len(prompt)])
    assert labels[len(prompt) :] == input_ids[len(prompt) :]
    assert input_ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(input_ids[len(prompt) : -1]) == " cat"


def test_rendering_round_trips_unicode_bytes(tokenizer):
    messages = [{"role": "user", "content": "héllo 🌍"}, {"role": "assistant", "content": "ça va ✓"}]
    input_ids, labels = render_training_example({"messages": messages}, tokenizer)
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "ça va ✓<|im_end|>"
    assert "héllo 🌍" in tokenizer.decode(input_ids)


def test_conversation_opening_with_the_assistant_supervises_only_its_content(tokenizer):
    messages = [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "thanks"}]
    input_ids, labels = render_training_example({"messages": messages}, tokenizer)
    check_basic_invariants(input_ids, labels)
    ((start, _),) = supervised_spans(labels)
    assert tokenizer.decode(input_ids[:start]) == "<|bos|><|im_start|>assistant\n"
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "Welcome!<|im_end|>"


def test_assistant_tool_calls_and_tool_results_render_with_calls_supervised(tokenizer):
    call = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]
    messages = [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": call},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        {"role": "assistant", "content": "Rain."},
    ]
    input_ids, labels = render_training_example({"messages": messages}, tokenizer)
    check_basic_invariants(input_ids, labels)
    texts = [tokenizer.decode(input_ids[a:b]) for a, b in supervised_spans(labels)]
    assert len(texts) == 2 and "get_weather" in texts[0] and texts[1] == "Rain.<|im_end|>"
    assert all(t.endswith("<|im_end|>") for t in texts)
    prompt = render_chat_prompt(messages[:3], tokenizer)
    assert input_ids[: len(prompt)] == prompt and "rain" in tokenizer.decode(prompt)


def test_the_inference_prompt_is_rendered_once_however_long_the_conversation(tokenizer):
    """Rendering used to go message by message (a prefix render per turn: quadratic; 2,000 one-letter messages
    took half a minute). The prompt is one template rendering and one tokenization, whatever the length."""
    from app.ml.chat import render_chat_prompt

    calls = []
    original = tokenizer.apply_chat_template

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    tokenizer.apply_chat_template = counting
    try:
        for n in (2, 200):
            calls.clear()
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "a"} for i in range(n)]
            render_chat_prompt(messages, tokenizer)
            assert len(calls) == 1
    finally:
        del tokenizer.apply_chat_template
