"""Synthetic, seeded datasets for demos, tests and benchmarks (no download needed).

`intent_json_task`: user messages in many phrasings, each answered with the fixed JSON of its intent; the
held-out split uses phrasings (greeting x request x ending combinations) never seen in training.
`intent_preference_task`: the same phrasings as preference pairs: the JSON answer in capitals preferred, the plain
one not.
`varied_length_chat`: chat examples whose lengths vary widely, for throughput measurements.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

SYSTEM_PROMPT = "Map the request to JSON."

INTENTS = {
    "check_balance": ["what is my balance", "how much money do i have", "show my account balance"],
    "transfer_money": ["send money to my friend", "move cash to savings", "make a transfer"],
    "card_lost": ["i lost my card", "my card was stolen", "block my card"],
    "open_account": ["open a new account", "i want a new account", "start an account"],
    "talk_to_human": ["let me talk to a person", "get me an agent", "i need a human"],
    "opening_hours": ["when are you open", "what are your hours", "are you open today"],
}
_PRIORITY = {"card_lost": "high", "talk_to_human": "high", "transfer_money": "medium"}
GREETINGS = ["", "hi, ", "hello! ", "hey there, ", "good morning, ", "excuse me, "]
ENDINGS = ["", "?", " please", " thanks", " right now", "!"]


def intent_answer(intent: str) -> str:
    return json.dumps({"intent": intent, "priority": _PRIORITY.get(intent, "low")}, separators=(",", ":"))


def intent_json_task(
    n_train: int, n_test: int, seed: int = 0, system_share: float = 0.5
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(train chat examples, held-out [(user message, expected answer)]) with disjoint phrasings."""
    rng = random.Random(seed)
    combos = [
        (intent, f"{g}{core}{e}")
        for intent, cores in INTENTS.items()
        for core in cores
        for g in GREETINGS
        for e in ENDINGS
    ]
    rng.shuffle(combos)
    if n_train + n_test > len(combos):
        raise ValueError(f"at most {len(combos)} distinct phrasings")
    test = [(text, intent_answer(intent)) for intent, text in combos[:n_test]]
    train = []
    for intent, text in combos[n_test : n_test + n_train]:
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": intent_answer(intent)}]
        if rng.random() < system_share:
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        train.append({"messages": messages})
    return train, test


def intent_preference_task(
    n_train: int, n_test: int, seed: int = 0
) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """(train preference examples, held-out [(user message, preferred answer, non-preferred answer)]), the
    phrasings split as in `intent_json_task`. A house style: the intent's JSON in capitals is preferred to the plain
    one (as many tokens, so only the format differs)."""
    train, test = intent_json_task(n_train, n_test, seed, system_share=0.0)
    pairs = []
    for example in train:
        user, answer = example["messages"]
        preferred = {"role": "assistant", "content": answer["content"].upper()}
        pairs.append({"input": {"messages": [user]}, "preferred_output": [preferred], "non_preferred_output": [answer]})
    return pairs, [(text, answer.upper(), answer) for text, answer in test]


_WORDS = [
    "the",
    "a",
    "model",
    "data",
    "token",
    "train",
    "serve",
    "adapter",
    "query",
    "answer",
    "value",
    "table",
    "index",
    "batch",
    "cache",
    "queue",
    "worker",
    "time",
    "space",
    "vector",
    "matrix",
    "layer",
    "weight",
    "loss",
    "step",
    "epoch",
    "sample",
    "review",
    "check",
    "result",
    "report",
]


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


def varied_length_chat(
    n: int, seed: int = 0, max_words: int = 120, multi_turn_share: float = 0.3, drop_system: bool = False
) -> list[dict]:
    """Chat examples with long-tailed lengths (a few words to `max_words`), some multi-turn, some with a
    system prompt: the shape of real fine-tuning data, where padding to the longest wastes most compute.
    `drop_system` (for templates that refuse a system role): the same examples without their system messages."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            system = {"role": "system", "content": _text(rng, rng.randint(3, 12))}
            if not drop_system:
                messages.append(system)
        for _ in range(2 if rng.random() < multi_turn_share else 1):
            user_words = min(max_words, int(rng.expovariate(1 / 30)) + 3)
            answer_words = min(max_words, int(rng.expovariate(1 / 20)) + 2)
            messages.append({"role": "user", "content": _text(rng, user_words)})
            messages.append({"role": "assistant", "content": _text(rng, answer_words)})
        out.append({"messages": messages})
    return out


def write_jsonl(path: str | os.PathLike[str], examples: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(e) + "\n")
