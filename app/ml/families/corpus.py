"""The fixed text the family tokenizers are trained on: English words, the synthetic tasks' phrasings, JSON and
code punctuation, digits. Deterministic, so a rebuild on another machine learns the same merges."""

from __future__ import annotations

import itertools
import json

from app.ml.synthetic import ENDINGS, GREETINGS, INTENTS, SYSTEM_PROMPT, intent_answer

_PROSE = """
The quick brown fox jumps over the lazy dog. A fine-tuned model answers in the format it was trained on.
You are a helpful assistant. Answer the question briefly and precisely. What is the weather like today?
Please summarize the following text in one sentence. Translate this sentence into French, then into German.
The function returns a list of numbers; call it with the city name and the unit of temperature.
Once upon a time there was a small village by the sea, where the people fished and told stories at night.
Write a Python function that adds two numbers and prints the result. Explain why the sky is blue.
Customers asked about their balance, their cards, transfers, opening hours and how to reach a person.
The tool returned an error, so the assistant asked the user for the missing argument and tried again.
"""

_CODE = [
    "def add(a, b):\n    return a + b\n",
    'print("hello, world")\n',
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    '{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}',
    "for i in range(10):\n    total += i * 2\n",
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name;",
]


def tokenizer_corpus() -> list[str]:
    lines = [line.strip() for line in _PROSE.strip().splitlines()]
    lines += _CODE
    lines.append(SYSTEM_PROMPT)
    for intent, cores in INTENTS.items():
        for core, greeting, ending in itertools.product(cores, GREETINGS, ENDINGS):
            lines.append(f"{greeting}{core}{ending}")
        lines.append(intent_answer(intent))
    lines += [" ".join(str(n) for n in range(start, start + 50)) for start in range(0, 1000, 50)]
    lines.append(json.dumps({"system": "user", "assistant": "tool", "role": "content"}))
    # Several passes so that common pairs clear the trainer's minimum frequency.
    return lines * 3
