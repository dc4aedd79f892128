"""The evaluation report at the end of a job with a validation file: for up to MAX_EXAMPLES validation examples,
the base model's and the fine-tuned model's greedy answers side by side with the expected one, each scored by exact
match and token F1.

The answers come from the serving engine (`app.inference`), base and adapter rows mixed in the same batches, with
the prompt rendered as `/v1/chat/completions` and `/v1/completions` render it: they are what the API answers for the
same prompt at temperature 0 and the report's `max_tokens`.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from app.datasets.examples import preference_conversations
from app.inference import AdapterRef, Finished, GenerationHandle, GenerationRequest, InferenceEngine, TextDelta
from app.ml.chat import render_chat_prompt, render_completion_prompt
from app.ml.registry import BaseModelRegistry
from worker.training.data import read_jsonl

MAX_EXAMPLES = 100
# Room for an answer: the longest expected one (in tokens) times this, plus MIN_NEW_TOKENS, within MAX_NEW_TOKENS.
ANSWER_ROOM = 1.5
MIN_NEW_TOKENS = 16
MAX_NEW_TOKENS = 1024
REPORT_FILENAME = "evaluation_report.json"


def token_f1(answer: str, expected: str) -> float:
    """SQuAD's token F1 over lower-cased words and punctuation marks."""
    got, want = _words(answer), _words(expected)
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _case(line: int, example: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
    """What to ask and what is expected, for an example whose answer is text; None for one that is not (a tool
    call, or a conversation that does not end with the assistant). A preference pair expects its preferred answer."""
    if "preferred_output" in example:
        example, _ = preference_conversations(example)
    if "messages" in example:
        *conversation, last = example["messages"]
        if last.get("role") != "assistant" or not isinstance(last.get("content"), str) or last.get("tool_calls"):
            return None
        ids = render_chat_prompt(conversation, tokenizer, example.get("tools"))
        return {"line": line, "messages": conversation, "expected": last["content"], "ids": ids, "chat": True}
    ids = render_completion_prompt(example["prompt"], tokenizer)
    return {"line": line, "prompt": example["prompt"], "expected": example["completion"], "ids": ids, "chat": False}


def _scores(answer: str, expected: str) -> dict[str, Any]:
    return {"answer": answer, "exact_match": answer.strip() == expected.strip(), "token_f1": token_f1(answer, expected)}


async def _answer(handle: GenerationHandle) -> str:
    text = ""
    async for event in handle:
        if isinstance(event, TextDelta):
            text += event.text
        elif not isinstance(event, Finished):
            raise RuntimeError(f"unexpected event {event!r}")
    return text


def evaluation_report(
    registry: BaseModelRegistry,
    base_model: str,
    model_name: str,
    adapter_dir: Path,
    validation_path: Path,
    max_examples: int = MAX_EXAMPLES,
) -> dict[str, Any] | None:
    """The report (`summary` and `examples`), or None when no validation example has a text answer."""
    engine = InferenceEngine(registry)
    engine.start()
    try:
        tokenizer = engine.tokenizer(base_model)
        context = engine.context_length(base_model)
        cases = [
            c
            for line, ex in read_jsonl(validation_path, preference=None)
            if (c := _case(line, ex, tokenizer)) is not None
        ]
        cases = cases[:max_examples]
        if not cases:
            return None
        longest = max(len(tokenizer.encode(c["expected"], add_special_tokens=False)) for c in cases)
        max_tokens = min(MAX_NEW_TOKENS, MIN_NEW_TOKENS + int(ANSWER_ROOM * longest))
        adapter = AdapterRef(model_name, adapter_dir)
        requests = [
            GenerationRequest(
                base_model=base_model,
                adapter=which,
                prompt_ids=case["ids"],
                max_tokens=min(max_tokens, context - len(case["ids"])),
                temperature=0.0,
                continues_prompt=not case["chat"],
            )
            for case in cases
            for which in (None, adapter)
        ]

        async def answer_all() -> list[str]:
            return await asyncio.gather(*(_answer(handle) for handle in engine.submit_all(requests)))

        answers = asyncio.run(answer_all())
    finally:
        engine.stop()

    examples = []
    for i, case in enumerate(cases):
        base, tuned = answers[2 * i], answers[2 * i + 1]
        asked = {"messages": case["messages"]} if case["chat"] else {"prompt": case["prompt"]}
        examples.append(
            {
                "line": case["line"],
                **asked,
                "expected": case["expected"],
                "base": _scores(base, case["expected"]),
                "fine_tuned": _scores(tuned, case["expected"]),
            }
        )
    summary: dict[str, Any] = {"n_examples": len(examples), "max_tokens": max_tokens}
    for side in ("base", "fine_tuned"):
        summary[side] = {
            "exact_match": sum(e[side]["exact_match"] for e in examples) / len(examples),
            "token_f1": sum(e[side]["token_f1"] for e in examples) / len(examples),
        }
    return {"base_model": base_model, "model": model_name, "summary": summary, "examples": examples}
