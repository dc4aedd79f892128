"""A finished job tells its owner how fast it trained (and, on a GPU, its peak memory) in one event."""

from __future__ import annotations

import pytest

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
