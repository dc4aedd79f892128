"""A DPO job through the API and the worker, after a supervised one: it starts from the fine-tuned model (its
reference), reports its rewards in events, and the model it publishes prefers the preferred format on prompts it
never saw, as scored through the serving API's logprobs."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoTokenizer

from app.ml.chat import IGNORE_INDEX, render_chat_example
from app.ml.synthetic import intent_json_task, intent_preference_task
from tests.datasets.samples import jsonl
from worker.runner import run_job

pytestmark = pytest.mark.slow


def upload(client, examples: list[dict]) -> str:
    r = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("d.jsonl", jsonl(examples))})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def run(client, ctx, **body) -> dict:
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tuneserve-tiny", **body})
    assert r.status_code == 200, r.text
    assert run_job(ctx, r.json()["id"]) == "succeeded"
    return client.get(f"/v1/fine_tuning/jobs/{r.json()['id']}").json()


def metric_events(client, job_id: str) -> list[dict]:
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 500}).json()["data"]
    return sorted((e for e in events if e["type"] == "metrics"), key=lambda e: e["data"]["step"])


def answer_logprob(client, tokenizer, model: str, question: str, answer: str) -> float:
    """log p(answer | question) from /v1/completions scoring the rendered conversation (echo, max_tokens 0)."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids, labels = render_chat_example(messages, tokenizer)
    r = client.post(
        "/v1/completions",
        json={"model": model, "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 1, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    return sum(lp for lp, label in zip(logprobs, labels, strict=True) if label != IGNORE_INDEX)


def prefers(client, tokenizer, model: str, held_out: list[tuple[str, str, str]]) -> float:
    wins = [
        answer_logprob(client, tokenizer, model, q, a) > answer_logprob(client, tokenizer, model, q, b)
        for q, a, b in held_out
    ]
    return sum(wins) / len(wins)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # two jobs: one database is enough
def test_dpo_after_supervised_fine_tuning_prefers_the_chosen_format(client, ctx):
    sft_data, _ = intent_json_task(48, 0, seed=3)
    sft = run(client, ctx, training_file=upload(client, sft_data), hyperparameters={"n_epochs": 2, "batch_size": 4})

    pairs, held_out = intent_preference_task(48, 20, seed=3)
    valid = [
        {
            "input": {"messages": [{"role": "user", "content": q}]},
            "preferred_output": [{"role": "assistant", "content": a}],
            "non_preferred_output": [{"role": "assistant", "content": b}],
        }
        for q, a, b in held_out
    ]
    # The supervised model writes the plain format confidently (about 300 nats apart on these answers); DPO's loss
    # saturates once the reward margin is some 10 / beta nats, so a small beta lets it move that far.
    dpo = run(
        client,
        ctx,
        model=sft["fine_tuned_model"],
        training_file=upload(client, pairs),
        validation_file=upload(client, valid),
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "beta": 0.01}}},
    )
    assert dpo["method"]["type"] == "dpo" and dpo["method"]["dpo"]["hyperparameters"]["beta"] == 0.01

    steps = metric_events(client, dpo["id"])
    first, last = steps[0], steps[-1]
    # The reference is the supervised model it starts from: at the first step policy and reference agree.
    assert first["data"]["train_loss"] == pytest.approx(math.log(2), abs=1e-5) and first["data"]["reward_margin"] == 0
    assert last["data"]["train_reward_accuracy"] > 0.9 and last["data"]["full_valid_reward_accuracy"] > 0.9
    assert "reward accuracy=" in last["message"] and "reward margin=" in last["message"]

    tokenizer = AutoTokenizer.from_pretrained(ctx.registry.resolve("tuneserve-tiny").name_or_path)
    assert prefers(client, tokenizer, dpo["fine_tuned_model"], held_out) >= 0.9
    assert prefers(client, tokenizer, sft["fine_tuned_model"], held_out) < 0.5  # it learned the plain format

    files = {client.get(f"/v1/files/{f}").json()["filename"]: f for f in dpo["result_files"]}
    csv = client.get(f"/v1/files/{files['step_metrics.csv']}/content").text.splitlines()
    assert csv[0].endswith("reward_margin,rewards_chosen,rewards_rejected") and len(csv) == 1 + len(steps)
    report = [
        json.loads(line) for line in client.get(f"/v1/files/{files['example_losses.jsonl']}/content").text.splitlines()
    ]
    assert (
        sorted(row["line"] for row in report) == list(range(1, 49)) and {"reward_margin", "wrong"} <= report[0].keys()
    )
    evaluation = json.loads(client.get(f"/v1/files/{files['evaluation_report.json']}/content").content)
    assert evaluation["summary"] == dpo["evaluation"] and evaluation["summary"]["n_examples"] == 20
    assert {e["expected"] for e in evaluation["examples"]} <= {a for _, a, _ in held_out}
