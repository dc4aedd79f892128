"""Knowing whether a fine-tune worked: validation metrics that equal an independent computation, early stopping
that publishes the best checkpoint (and decides the same after a resume), and the per-example loss report."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from app.jobs.spec import resolve_spec
from app.ml.chat import IGNORE_INDEX, render_training_example
from app.ml.synthetic import INTENTS, intent_answer, intent_json_task
from tests.training.conftest import write_jsonl
from worker.training.loop import train

pytestmark = pytest.mark.slow


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def independent_metrics(model, tokenizer, examples: list[dict]) -> tuple[float, float]:
    """Mean loss and token accuracy over supervised tokens, one example per plain forward pass of a PEFT model
    (no packing, no segment attention, the full logits)."""
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for example in examples:
            ids, labels = render_training_example(example, tokenizer)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            targets = torch.tensor(labels[1:])
            supervised = targets != IGNORE_INDEX
            loss_sum += F.cross_entropy(logits[supervised], targets[supervised], reduction="sum").item()
            correct += int((logits[supervised].argmax(-1) == targets[supervised]).sum())
            n += int(supervised.sum())
    return loss_sum / n, correct / n


def test_checkpoint_validation_metrics_equal_an_independent_computation(tiny, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    examples, held_out = intent_json_task(24, 10, seed=4)
    # A system prompt on some rows: its tokens are in the input but never supervised, nor counted.
    valid = [chat(q, a) for q, a in held_out]
    valid[0]["messages"].insert(0, {"role": "system", "content": "Map the request to JSON."})
    train_file, valid_file = write_jsonl(tmp_path / "t.jsonl", examples), write_jsonl(tmp_path / "v.jsonl", valid)
    spec = resolve_spec({"n_epochs": 2, "batch_size": 4, "n_checkpoints": 2}, 24, tiny.defaults, seed=1)
    result = train(spec, train_file, valid_file, tiny, tmp_path / "out")

    rows = {row["step"]: row for row in result.metrics_rows}
    assert [step for step, _ in result.checkpoints] == [6, 12]
    for step, path in result.checkpoints:
        base = AutoModelForCausalLM.from_pretrained(tiny.name_or_path, dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(base, path).eval()
        loss, accuracy = independent_metrics(model, tokenizer, valid)
        assert rows[step]["full_valid_loss"] == pytest.approx(loss, abs=1e-4)
        assert rows[step]["full_valid_mean_token_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert result.full_valid_loss == rows[12]["full_valid_loss"]


def memorisation_task(n_train: int, n_valid: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Random codes for random keys: the format generalises, the codes cannot, so a long run overfits."""
    rng = random.Random(seed)

    def example() -> dict:
        key = " ".join(rng.choice("abcdefgh") for _ in range(3))
        return chat(f"give the code for {key}", "code " + " ".join(str(rng.randrange(10)) for _ in range(6)))

    return [example() for _ in range(n_train)], [example() for _ in range(n_valid)]


def test_early_stopping_publishes_the_best_checkpoint_and_a_resume_decides_the_same(tiny, tmp_path):
    examples, valid = memorisation_task(8, 16, seed=0)
    train_file, valid_file = write_jsonl(tmp_path / "t.jsonl", examples), write_jsonl(tmp_path / "v.jsonl", valid)
    hp = {
        "n_epochs": 40, "batch_size": 4, "learning_rate_multiplier": 4, "lora_dropout": 0.0, "eval_every": 2,
        "n_checkpoints": 0, "early_stopping": {"patience": 3, "min_delta": 0.0},
    }  # fmt: skip
    spec = resolve_spec(hp, len(examples), tiny.defaults, seed=1)
    result = train(spec, train_file, valid_file, tiny, tmp_path / "run")

    assert result.n_steps < result.total_steps - 2  # stopped before its last epoch (2 steps an epoch)
    evaluated = {row["step"]: row["full_valid_loss"] for row in result.metrics_rows if row.get("full_valid_loss")}
    assert result.best_step == min(evaluated, key=evaluated.get)
    assert result.full_valid_loss == evaluated[result.best_step]
    assert result.best_step < max(evaluated)  # the loss rose after its best (else nothing stopped it)
    assert f"Early stopping at step {result.n_steps}" in result.early_stopping
    # The published adapter is the checkpoint written at the best step (a model of its own).
    checkpoints = dict(result.checkpoints)
    assert set(checkpoints) <= set(evaluated) and result.best_step in checkpoints
    published = load_file(result.adapter_dir / "adapter_model.safetensors")
    best = load_file(checkpoints[result.best_step] / "adapter_model.safetensors")
    assert published.keys() == best.keys() and all(torch.equal(published[k], best[k]) for k in best)

    # A worker killed after the best checkpoint resumes from it (its latest) and replays to the same decision.
    resume_from = tmp_path / "kept-checkpoint"
    shutil.copytree(checkpoints[result.best_step], resume_from)
    resumed = train(spec, train_file, valid_file, tiny, tmp_path / "resumed", resume_from=resume_from)
    assert (resumed.n_steps, resumed.best_step, resumed.early_stopping) == (
        result.n_steps, result.best_step, result.early_stopping,
    )  # fmt: skip
    again = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(again[k], published[k]) for k in published)


def test_the_example_report_ranks_mislabelled_rows_in_its_top_tenth(tiny, tmp_path):
    """400 rows of the intent task, 20 (5%) with the wrong intent's answer, trained as a user would (auto)."""
    n, seed = 400, 7
    examples, _ = intent_json_task(n, 0, seed=seed)
    rng = random.Random(seed)
    corrupted = sorted(rng.sample(range(n), n // 20))
    for i in corrupted:
        answer = examples[i]["messages"][-1]
        right = json.loads(answer["content"])["intent"]
        answer["content"] = intent_answer(rng.choice([intent for intent in INTENTS if intent != right]))
    train_file = write_jsonl(tmp_path / "t.jsonl", examples)
    spec = resolve_spec({"n_checkpoints": 0}, n, tiny.defaults, seed=1)
    result = train(spec, train_file, None, tiny, tmp_path / "out")

    ranked = [score.line for score in result.example_scores]
    assert sorted(ranked) == list(range(1, n + 1))
    top_tenth = set(ranked[: n // 10])
    assert {i + 1 for i in corrupted} <= top_tenth  # lines are 1-based
    # The flag: rows whose greedy prediction still misses a supervised token; clean rows the model learned are not.
    wrong = {score.line for score in result.example_scores if score.wrong}
    assert wrong & {i + 1 for i in corrupted} and len(wrong) < n // 4
