"""The engine must actually teach: all-"auto" hyperparameters on the tiny model learn a JSON-by-intent task."""

from __future__ import annotations

import pytest
import torch

from app.jobs.spec import resolve_spec
from app.ml.chat import render_chat_prompt
from app.ml.synthetic import intent_json_task
from tests.training.conftest import write_jsonl
from worker.training.loop import train


def greedy_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 48) -> list[str]:
    """Batched greedy decoding from the same prompt rendering inference uses (left-padded)."""
    prompts = [render_chat_prompt([{"role": "user", "content": q}], tokenizer) for q in questions]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def exact_match(model, tokenizer, held_out) -> float:
    answers = greedy_answers(model, tokenizer, [q for q, _ in held_out])
    return sum(a == expected for a, (_, expected) in zip(answers, held_out, strict=True)) / len(held_out)


@pytest.mark.slow
def test_all_auto_training_reaches_90_percent_exact_match_on_held_out_phrasings(tiny, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train_examples, held_out = intent_json_task(160, 60, seed=1)
    train_file = write_jsonl(tmp_path / "train.jsonl", train_examples)
    spec = resolve_spec(
        {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
        len(train_examples),
        tiny.defaults,
        seed=0,
    )
    base = AutoModelForCausalLM.from_pretrained(tiny.name_or_path).eval()
    assert exact_match(base, tokenizer, held_out) == 0.0

    result = train(spec, train_file, None, tiny, tmp_path / "out")
    tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    assert exact_match(tuned, tokenizer, held_out) >= 0.9
