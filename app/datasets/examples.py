"""Checks for one training example. Each returns (format, problem kinds, statistics).

Kind names follow the OpenAI cookbook's format counters where one applies (data_type, missing_messages_list,
message_missing_key, message_unrecognized_key, unrecognized_role, missing_content,
example_missing_assistant_message); the rest name what is wrong in the same style.
"""

from __future__ import annotations

ROLES = frozenset({"system", "user", "assistant", "tool"})
MESSAGE_KEYS = {
    "system": frozenset({"role", "content", "name"}),
    "user": frozenset({"role", "content", "name"}),
    "assistant": frozenset({"role", "content", "name", "weight", "tool_calls"}),
    "tool": frozenset({"role", "content", "tool_call_id"}),
}
CHAT_KEYS = frozenset({"messages", "tools", "parallel_tool_calls"})
PROMPT_COMPLETION_KEYS = frozenset({"prompt", "completion"})
PREFERENCE_KEYS = frozenset({"input", "preferred_output", "non_preferred_output"})


def detect_format(example: dict) -> str | None:
    if "messages" in example:
        return "chat"
    if "prompt" in example or "completion" in example:
        return "prompt_completion"
    if "input" in example or "preferred_output" in example or "non_preferred_output" in example:
        return "preference"
    return None


def check_messages(messages: object, problems: list[str], *, need_assistant: bool) -> int:
    """Check a messages list; returns the number of characters of content."""
    if not isinstance(messages, list) or not messages:
        problems.append("missing_messages_list")
        return 0
    chars = 0
    assistants = trained = 0
    for message in messages:
        if not isinstance(message, dict):
            problems.append("message_data_type")
            continue
        role = message.get("role")
        if "role" not in message or ("content" not in message and "tool_calls" not in message):
            problems.append("message_missing_key")
        if role not in ROLES:
            if "role" in message:
                problems.append("unrecognized_role")
            continue
        if not message.keys() <= MESSAGE_KEYS[role]:
            problems.append("weight_not_on_assistant" if "weight" in message else "message_unrecognized_key")
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif not (content is None and role == "assistant" and message.get("tool_calls")) and (
            "content" in message or role != "assistant"
        ):
            # Only an assistant turn that makes tool calls may go without text content.
            problems.append("missing_content")
        if role == "assistant":
            assistants += 1
            weight = message.get("weight", 1)
            if weight not in (0, 1) or isinstance(weight, bool):
                problems.append("invalid_weight")
            elif weight == 1:
                trained += 1
    if need_assistant:
        if not assistants:
            problems.append("example_missing_assistant_message")
        elif not trained and "invalid_weight" not in problems:
            problems.append("example_missing_trained_assistant_message")
    return chars


def check_chat(example: dict, problems: list[str]) -> int:
    if not example.keys() <= CHAT_KEYS:
        problems.append("example_unrecognized_key")
    if "tools" in example and not isinstance(example["tools"], list):
        problems.append("invalid_tools")
    return check_messages(example["messages"], problems, need_assistant=True)


def check_prompt_completion(example: dict, problems: list[str]) -> int:
    if not example.keys() <= PROMPT_COMPLETION_KEYS:
        problems.append("example_unrecognized_key")
    if not example.keys() >= PROMPT_COMPLETION_KEYS:
        problems.append("example_missing_key")
        return 0
    prompt, completion = example["prompt"], example["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        problems.append("invalid_prompt_completion")
        return 0
    if not completion:
        problems.append("empty_completion")
    return len(prompt) + len(completion)


def check_preference(example: dict, problems: list[str]) -> int:
    if not example.keys() <= PREFERENCE_KEYS:
        problems.append("example_unrecognized_key")
    if not example.keys() >= PREFERENCE_KEYS:
        problems.append("example_missing_key")
        return 0
    source = example["input"]
    chars = 0
    if not isinstance(source, dict) or "messages" not in source:
        problems.append("missing_messages_list")
    else:
        if not source.keys() <= CHAT_KEYS:
            problems.append("example_unrecognized_key")
        chars += check_messages(source["messages"], problems, need_assistant=False)
    for key in ("preferred_output", "non_preferred_output"):
        output = example[key]
        if (
            not isinstance(output, list)
            or len(output) != 1
            or not isinstance(output[0], dict)
            or output[0].get("role") != "assistant"
            or not isinstance(output[0].get("content"), str)
        ):
            problems.append("invalid_preference_output")
        else:
            chars += len(output[0]["content"])
    return chars


def preference_conversations(example: dict) -> tuple[dict, dict]:
    """A validated preference example as two chat examples, the preferred and the non-preferred answer each after
    the shared conversation, with only that last answer supervised: what DPO compares is the answers alone."""
    source = example["input"]
    history = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in source["messages"]]
    extra = {"tools": source["tools"]} if source.get("tools") else {}
    preferred, non_preferred = (
        {"messages": [*history, {**example[key][0], "weight": 1}], **extra}
        for key in ("preferred_output", "non_preferred_output")
    )
    return preferred, non_preferred


CHECKS = {"chat": check_chat, "prompt_completion": check_prompt_completion, "preference": check_preference}


def check_example(example: object) -> tuple[str | None, list[str], int]:
    """Returns (format or None, problem kinds found, characters of content)."""
    if not isinstance(example, dict):
        return None, ["data_type"], 0
    fmt = detect_format(example)
    if fmt is None:
        return None, ["missing_messages_list"], 0
    problems: list[str] = []
    chars = CHECKS[fmt](example, problems)
    return fmt, problems, chars
