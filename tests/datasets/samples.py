"""Small training files for tests: valid ones of each format, written as JSONL bytes."""

from __future__ import annotations

import json


def chat_example(i: int = 0) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": json.dumps({"answer": 2 * i})},
        ]
    }


def prompt_completion_example(i: int = 0) -> dict:
    return {"prompt": f"{i} + {i} =", "completion": f" {2 * i}"}


def preference_example(i: int = 0) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": f"Say {i}"}]},
        "preferred_output": [{"role": "assistant", "content": str(i)}],
        "non_preferred_output": [{"role": "assistant", "content": "no"}],
    }


def jsonl(examples) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in examples)


def valid_chat_file(n: int = 12) -> bytes:
    return jsonl(chat_example(i) for i in range(n))
