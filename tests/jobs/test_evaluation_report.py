"""The evaluation report of a job with a validation file: base and fine-tuned answers side by side, scored, and
the same answers the API gives for the same prompts."""

from __future__ import annotations

import json

import pytest

from app.ml.synthetic import intent_json_task
from tests.datasets.samples import jsonl
from worker.evaluation_report import token_f1
from worker.runner import run_job

pytestmark = pytest.mark.slow


def upload(client, examples: list[dict]) -> str:
    r = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("d.jsonl", jsonl(examples))})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_token_f1_counts_shared_words():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("a cat", "the cat sat") == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("dog", "cat") == 0.0


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # trains for half a minute: one database is enough
def test_the_report_shows_what_fine_tuning_changed_as_the_api_answers(client, ctx):
    """The intent task with all-"auto" hyperparameters: the base never writes the JSON, the fine-tuned model does."""
    train, held_out = intent_json_task(160, 20, seed=1)
    valid = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in held_out]
    r = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tuneserve-tiny",
            "training_file": upload(client, train),
            "validation_file": upload(client, valid),
        },
    )
    job_id = r.json()["id"]
    assert run_job(ctx, job_id) == "succeeded"

    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    summary = job["evaluation"]
    assert summary["n_examples"] == 20
    assert summary["base"]["exact_match"] == 0.0 and summary["fine_tuned"]["exact_match"] >= 0.9
    assert summary["fine_tuned"]["token_f1"] > summary["base"]["token_f1"]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    assert events[0]["message"] == "The job has successfully completed" and events[0]["data"]["evaluation"] == summary

    [report_file] = [
        f for f in job["result_files"] if client.get(f"/v1/files/{f}").json()["filename"].endswith(".json")
    ]
    report = json.loads(client.get(f"/v1/files/{report_file}/content").content)
    assert report["summary"] == summary and len(report["examples"]) == 20
    for example in report["examples"]:
        assert example["expected"] == dict(held_out)[example["messages"][0]["content"]]
        for side, model in (("base", "tuneserve-tiny"), ("fine_tuned", job["fine_tuned_model"])):
            answer = client.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": example["messages"],
                    "temperature": 0,
                    "max_tokens": summary["max_tokens"],
                },
            ).json()["choices"][0]["message"]["content"]
            assert example[side]["answer"] == answer, (side, example)
            assert example[side]["exact_match"] == (answer == example["expected"])
