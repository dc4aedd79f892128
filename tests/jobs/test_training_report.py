"""What a finished job tells its owner in its events: how fast it trained (and, on a GPU, its peak memory), and
which step early stopping published."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from app.tables import FineTunedModel
from tests.datasets.samples import valid_chat_file
from worker.runner import run_job

pytestmark = pytest.mark.slow


def test_a_finished_job_reports_its_training_speed(client, ctx, create_job):
    job_id = create_job()
    assert run_job(ctx, job_id) == "succeeded"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    [report] = [e for e in events if e["message"].startswith("Trained ")]
    assert report["type"] == "message" and report["level"] == "info"
    data = report["data"]
    assert data["trained_tokens"] == job["trained_tokens"] > 0
    assert data["train_seconds"] > 0 and data["tokens_per_second"] > 0
    assert f"Trained {job['trained_tokens']:,} tokens in " in report["message"]
    # Published after it: the newest two events are still the success and the model.
    assert [e["message"] for e in events[:2]] == [
        "The job has successfully completed",
        f"New fine-tuned model created: {job['fine_tuned_model']}",
    ]


def test_early_stopping_says_which_step_it_published_and_publishes_it(client, ctx, create_job):
    from safetensors.torch import load_file

    r = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("v.jsonl", valid_chat_file(10))})
    job_id = create_job(
        validation_file=r.json()["id"], n_epochs=6, eval_every=1, early_stopping={"patience": 1}, n_checkpoints=1
    )
    assert run_job(ctx, job_id) == "succeeded"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 200}).json()["data"]
    [decision] = [e for e in events if "The published model is the checkpoint at step" in e["message"]]
    best = decision["data"]["best_step"]
    losses = {e["data"]["step"]: e["data"]["full_valid_loss"] for e in events if e["type"] == "metrics"}
    assert best == min(losses, key=losses.get) and decision["data"]["full_valid_loss"] == losses[best]
    # The best step is a checkpoint model, and the job's model has its weights.
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100}).json()["data"]
    [at_best] = [c for c in checkpoints if c["step_number"] == best]
    assert at_best["metrics"]["full_valid_loss"] == losses[best]
    with ctx.sessionmaker() as session:
        keys = dict(session.execute(select(FineTunedModel.id, FineTunedModel.storage_key)).all())
    weights = [
        load_file(ctx.storage.local_dir(keys[name]) / "adapter_model.safetensors")
        for name in (job["fine_tuned_model"], at_best["fine_tuned_model_checkpoint"])
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
