"""The worker's side, in process with real training on the tiny model: claim, fence, publish, cancel, pause,
duplicates, the reconciler and the attempt limit. (Subprocess workers and broker faults: tests/e2e.)"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from sqlalchemy import func, select, update

from app.db import session_scope
from app.jobs.reconcile import reconcile
from app.storage import StorageUnavailable
from app.tables import File, FineTunedModel, Job, JobCheckpoint, JobEvent
from tests.jobs.conftest import event_messages, job_row, wait_for
from worker.heartbeat import Heartbeat
from worker.leases import LeaseLost, claim_job, fence
from worker.publish import publish
from worker.runner import JobCallbacks, run_job
from worker.training.loop import TrainingResult

pytestmark = pytest.mark.slow


class RecordingDispatcher:
    def __init__(self):
        self.sent: list[str] = []

    def send(self, job_id: str) -> bool:
        self.sent.append(job_id)
        return True


def count(sessionmaker, model, **where) -> int:
    with sessionmaker() as session:
        query = select(func.count()).select_from(model)
        for key, value in where.items():
            query = query.where(getattr(model, key) == value)
        return session.scalar(query)


def test_a_job_runs_to_a_published_model(client, ctx, sessionmaker, create_job, settings):
    job_id = create_job(suffix="demo", n_checkpoints=2)
    assert run_job(ctx, job_id) == "succeeded"

    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["error"] is None and job["finished_at"]
    assert job["fine_tuned_model"] == f"ft:tuneserve-tiny:alpha:demo:{job_id[6:14]}"
    assert job["trained_tokens"] > 0
    hp = job["hyperparameters"]
    assert (hp["n_epochs"], hp["batch_size"], hp["learning_rate_multiplier"]) == (2, 4, 1.0)
    assert hp["n_checkpoints"] == 2 and isinstance(hp["learning_rate"], float)

    metrics_file, examples_file = job["result_files"]
    meta = client.get(f"/v1/files/{metrics_file}").json()
    assert meta["purpose"] == "fine-tune-results" and meta["filename"] == "step_metrics.csv"
    csv = client.get(f"/v1/files/{metrics_file}/content").text.splitlines()
    assert csv[0] == (
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy,"
        "train_mean_token_accuracy,full_valid_loss,full_valid_mean_token_accuracy"
    )
    assert [line.split(",")[0] for line in csv[1:]] == [str(step) for step in range(1, 11)]
    # Every training row's final loss, worst first, by its line in the uploaded file.
    assert client.get(f"/v1/files/{examples_file}").json()["filename"] == "example_losses.jsonl"
    rows = [json.loads(line) for line in client.get(f"/v1/files/{examples_file}/content").text.splitlines()]
    assert sorted(row["line"] for row in rows) == list(range(1, len(rows) + 1)) and len(rows) > 1
    assert [row["loss"] for row in rows] == sorted((row["loss"] for row in rows), reverse=True)
    assert set(rows[0]) == {"line", "loss", "max_token_loss", "mean_token_accuracy", "supervised_tokens", "wrong"}

    metrics = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    steps = [e for e in metrics if e["type"] == "metrics"]
    assert len(steps) == 10
    assert steps[0]["message"].startswith("Step 10/10: training loss=")
    assert set(steps[0]["data"]) >= {"step", "train_loss", "train_mean_token_accuracy"}
    messages = [e["message"] for e in metrics]
    assert messages[0] == "The job has successfully completed"
    assert messages[1] == f"New fine-tuned model created: {job['fine_tuned_model']}"

    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [10, 5]  # newest first
    assert checkpoints[0]["fine_tuned_model_checkpoint"] == f"{job['fine_tuned_model']}:ckpt-step-10"
    assert checkpoints[0]["metrics"]["step"] == 10 and checkpoints[0]["metrics"]["train_loss"] is not None

    # One model row for the job and one per checkpoint; the adapter is in storage, loadable as PEFT's.
    with sessionmaker() as session:
        models = {m.id: m for m in session.scalars(select(FineTunedModel))}
    assert set(models) == {job["fine_tuned_model"], *(c["fine_tuned_model_checkpoint"] for c in checkpoints)}
    adapter_dir = ctx.storage.local_dir(models[job["fine_tuned_model"]].storage_key)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] and (adapter_dir / "adapter_model.safetensors").is_file()
    work = settings.data_dir / "work" / job_id
    assert not work.exists() or not any(work.iterdir())  # the attempt's scratch space is gone


def test_the_same_job_delivered_twice_at_once_trains_once(ctx, sessionmaker, create_job):
    job_id = create_job()
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def deliver():
        barrier.wait()
        outcomes.append(run_job(ctx, job_id))

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["skipped", "succeeded"]
    assert count(sessionmaker, FineTunedModel, job_id=job_id, step_number=None) == 1
    assert job_row(sessionmaker, job_id).attempt == 1
    # A late duplicate changes nothing either.
    assert run_job(ctx, job_id) == "skipped"


def test_a_stale_worker_can_write_nothing(ctx, sessionmaker, create_job, settings):
    job_id = create_job()
    stale = claim_job(sessionmaker, job_id, settings)
    assert stale.attempt == 1
    assert claim_job(sessionmaker, job_id, settings) is None  # its lease is live
    with session_scope(sessionmaker) as session:  # the lease runs out (a frozen or partitioned worker)
        session.execute(update(Job).where(Job.id == job_id).values(lease_until=time.time() - 1))
    dispatcher = RecordingDispatcher()
    assert reconcile(sessionmaker, dispatcher, settings)["requeued"] == 1
    assert dispatcher.sent == [job_id]
    assert run_job(ctx, job_id) == "succeeded"  # attempt 2 trains and publishes

    with session_scope(sessionmaker) as session:
        assert not fence(session, stale, settings)
    assert job_row(sessionmaker, job_id).attempt == 2
    assert "The job's worker stopped responding; re-queued to resume from its last checkpoint" in event_messages(
        sessionmaker, job_id
    )

    # The stale worker now does everything a finishing worker does; none of it may land.
    before = database_snapshot(sessionmaker), storage_snapshot(ctx)
    with sessionmaker() as session:
        published = session.scalar(
            select(FineTunedModel).where(FineTunedModel.job_id == job_id, FineTunedModel.step_number.is_(None))
        )
    adapter_dir = ctx.storage.local_dir(published.storage_key)
    heartbeat = Heartbeat(ctx, stale)  # not started: the callbacks only read and set its fields
    callbacks = JobCallbacks(ctx, stale, heartbeat, published.id)
    callbacks.on_metrics({"step": 10, "train_loss": 1.0, "train_mean_token_accuracy": 0.5})
    callbacks.on_progress(10, 10, 0.0)  # the last step flushes the metrics event
    assert heartbeat.stop_request == "cancel"
    heartbeat.stop_request = None
    callbacks.on_checkpoint(7, adapter_dir, {"step": 7, "train_loss": 1.0})
    assert heartbeat.stop_request == "cancel"
    result = TrainingResult(
        adapter_dir=adapter_dir,
        metrics_rows=[{"step": 1, "train_loss": 1.0}],
        trained_tokens=1,
        supervised_tokens=1,
        n_steps=1,
        total_steps=1,
        stopped=None,
        spec={},
        n_examples=1,
        n_dropped_too_long=0,
        n_truncated=0,
        n_dropped_no_supervised=0,
    )
    with pytest.raises(LeaseLost):
        publish(ctx, stale, result)
    assert (database_snapshot(sessionmaker), storage_snapshot(ctx)) == before


def database_snapshot(sessionmaker) -> dict:
    """Every row a worker may write, as plain values."""
    with sessionmaker() as session:
        return {
            model.__tablename__: sorted(
                tuple(str(getattr(row, column.key)) for column in model.__table__.columns)
                for row in session.scalars(select(model))
            )
            for model in (Job, JobEvent, JobCheckpoint, FineTunedModel, File)
        }


def storage_snapshot(ctx) -> list[str]:
    return sorted(str(p.relative_to(ctx.storage.root)) for p in ctx.storage.root.rglob("*") if p.is_file())


def test_a_blob_store_that_does_not_answer_re_drives_the_job_instead_of_failing_it(
    client, ctx, sessionmaker, create_job, monkeypatch
):
    job_id = create_job()

    def store_down(key, source):
        raise StorageUnavailable(f"object storage failed on {key}: Could not connect to the endpoint URL")

    monkeypatch.setattr(ctx.storage, "put_dir", store_down)  # publishing the adapter, at the end
    assert run_job(ctx, job_id) == "lost"
    job = job_row(sessionmaker, job_id)
    assert job.status == "running" and job.error is None  # its lease runs out and the reconciler re-drives it
    assert count(sessionmaker, FineTunedModel) == 0


def test_gives_up_after_max_attempts(sessionmaker, create_job, settings, client):
    job_id = create_job()
    for _ in range(settings.max_job_attempts):
        assert claim_job(sessionmaker, job_id, settings) is not None
        with session_scope(sessionmaker) as session:
            session.execute(update(Job).where(Job.id == job_id).values(lease_until=time.time() - 1))
        reconcile(sessionmaker, RecordingDispatcher(), settings)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "max_attempts_exceeded"
    assert "giving up" in job["error"]["message"]


def test_running_jobs_per_project_are_limited(sessionmaker, create_job, settings):
    limited = settings.model_copy(update={"max_running_jobs_per_project": 1})
    first, second = create_job(), create_job()
    assert claim_job(sessionmaker, first, limited) is not None
    assert claim_job(sessionmaker, second, limited) is None
    assert job_row(sessionmaker, second).status == "queued"


def run_in_thread(ctx, job_id) -> tuple[threading.Thread, list[str]]:
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_job(ctx, job_id)))
    thread.start()
    return thread, outcome


def test_cancel_mid_training_publishes_nothing(client, ctx, sessionmaker, create_job):
    job_id = create_job(hyperparameters={"n_epochs": 50, "batch_size": 1})  # 1000 steps: long enough
    thread, outcome = run_in_thread(ctx, job_id)
    wait_for(lambda: any(m.startswith("Step ") for m in event_messages(sessionmaker, job_id)))
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    thread.join(timeout=30)
    assert outcome == ["cancelled"]
    job = job_row(sessionmaker, job_id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    assert count(sessionmaker, FineTunedModel) == 0
    assert count(sessionmaker, File, purpose="fine-tune-results") == 0


def test_a_cancelled_jobs_checkpoints_are_models_that_answer(client, ctx, sessionmaker, create_job):
    """Every checkpoint the API lists names a model that is served, whatever became of the job; a cancelled
    job's checkpoint names used to answer 404."""
    job_id = create_job(hyperparameters={"n_epochs": 50, "batch_size": 1}, n_checkpoints=50)  # one per 20 steps
    thread, outcome = run_in_thread(ctx, job_id)
    wait_for(lambda: client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"])
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    thread.join(timeout=30)
    assert outcome == ["cancelled"]
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints
    for checkpoint in checkpoints:
        name = checkpoint["fine_tuned_model_checkpoint"]
        assert client.get(f"/v1/models/{name}").status_code == 200
        r = client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert job_row(sessionmaker, job_id).fine_tuned_model is None  # no final model: the job did not finish


def test_work_directories_killed_attempts_left_are_removed(client, ctx, sessionmaker, create_job):
    """A killed attempt cannot clean up after itself; the next job a worker runs removes what such attempts
    left: finished or unknown jobs' directories and a job's attempts before its current one."""
    finished, killed, elsewhere = create_job(), create_job(), create_job()
    assert run_job(ctx, finished) == "succeeded"
    with sessionmaker() as session:  # as if a worker had claimed each (attempt 1); `killed`'s was killed mid-run
        session.execute(update(Job).where(Job.id.in_([killed, elsewhere])).values(attempt=1))
        session.execute(update(Job).where(Job.id == elsewhere).values(status="running"))
        session.commit()
    work = ctx.settings.data_dir / "work"
    left = [work / finished / "attempt-1", work / "ftjob-gone" / "attempt-3", work / killed / "attempt-1"]
    in_use = work / elsewhere / "attempt-1"  # another worker's current attempt, running now
    for path in [*left, in_use]:
        (path / "checkpoint").mkdir(parents=True)
    assert run_job(ctx, killed) == "succeeded"  # claimed as attempt 2
    assert not any(path.exists() for path in left)
    assert (in_use / "checkpoint").is_dir()


def test_pause_then_resume_continues_from_the_checkpoint(client, ctx, sessionmaker, create_job):
    job_id = create_job(hyperparameters={"n_epochs": 5, "batch_size": 1})  # 100 steps
    thread, outcome = run_in_thread(ctx, job_id)
    wait_for(lambda: any(m.startswith("Step 3/") for m in event_messages(sessionmaker, job_id)))
    # The job reads as running until the worker has checkpointed and let go; then as paused, at once.
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "running"
    thread.join(timeout=30)
    assert outcome == ["paused"]
    job = job_row(sessionmaker, job_id)
    assert job.status == "paused" and job.lease_until is None
    with sessionmaker() as session:
        paused_at = session.scalar(select(func.max(JobCheckpoint.step_number)).where(JobCheckpoint.job_id == job_id))
    assert paused_at >= 3
    messages = event_messages(sessionmaker, job_id)
    acknowledged = messages.index(f"Fine-tuning job paused at step {paused_at}; resume continues from there")
    assert not [m for m in messages[acknowledged:] if m.startswith("Step ")]  # no step after the pause

    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
    assert run_job(ctx, job_id) == "succeeded"
    messages = event_messages(sessionmaker, job_id)
    assert f"Fine-tuning job resumed from step {paused_at} (attempt 2)" in messages
    # The resumed run reported only the steps after the checkpoint.
    resumed_steps = [m for m in messages[messages.index("Fine-tuning job resumed") :] if m.startswith("Step ")]
    assert resumed_steps[0].startswith(f"Step {paused_at + 1}/100")


def test_training_errors_fail_the_job_with_an_actionable_code(client, ctx, create_job):
    job_id = create_job(max_seq_length=16)  # no example fits
    assert run_job(ctx, job_id) == "failed"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "no_trainable_examples"
    assert job["error"]["message"] and job["fine_tuned_model"] is None
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    assert events[0]["level"] == "error"


def test_continuing_from_a_fine_tuned_model_starts_from_its_adapter(client, ctx, sessionmaker, create_job):
    from safetensors.torch import load_file

    parent_job = create_job(lora_r=4)
    assert run_job(ctx, parent_job) == "succeeded"
    parent = client.get(f"/v1/fine_tuning/jobs/{parent_job}").json()["fine_tuned_model"]

    r = client.post("/v1/fine_tuning/jobs", json={"model": parent, "training_file": job_row(sessionmaker, parent_job)
                                                  .training_file, "lora_r": 8})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "hyperparameters.lora_r"

    # A vanishing learning rate: the child ends where it started, which must be the parent's weights.
    child_job = create_job(model=parent, hyperparameters={"n_epochs": 1, "batch_size": 4,
                                                          "learning_rate_multiplier": 1e-9})  # fmt: skip
    assert run_job(ctx, child_job) == "succeeded"
    child = client.get(f"/v1/fine_tuning/jobs/{child_job}").json()
    assert child["model"] == parent and child["hyperparameters"]["lora_r"] == 4
    with sessionmaker() as session:
        keys = dict(session.execute(select(FineTunedModel.id, FineTunedModel.storage_key)
                                    .where(FineTunedModel.step_number.is_(None))).all())  # fmt: skip
    before = load_file(ctx.storage.local_dir(keys[parent]) / "adapter_model.safetensors")
    after = load_file(ctx.storage.local_dir(keys[child["fine_tuned_model"]]) / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    lora_b = [k for k in before if "lora_B" in k]
    assert lora_b and any(before[k].abs().max() > 0 for k in lora_b)  # the parent learned something
    for key in before:
        assert torch.allclose(before[key], after[key], atol=1e-6), key


def test_a_child_job_whose_parent_model_was_deleted_fails_clearly(client, ctx, sessionmaker, create_job):
    parent_job = create_job()
    assert run_job(ctx, parent_job) == "succeeded"
    parent = client.get(f"/v1/fine_tuning/jobs/{parent_job}").json()["fine_tuned_model"]
    child_job = create_job(model=parent)  # accepted while the parent exists ...
    assert client.delete(f"/v1/models/{parent}").json()["deleted"] is True  # ... which is gone before it runs

    assert run_job(ctx, child_job) == "failed"
    child = client.get(f"/v1/fine_tuning/jobs/{child_job}").json()
    assert child["error"] == {
        "code": "model_not_found",
        "message": f"The model {parent} this job continues from was deleted.",
        "param": "model",
    }
    assert child["fine_tuned_model"] is None
    assert count(sessionmaker, FineTunedModel, job_id=child_job) == 0


def test_a_pause_withdrawn_after_the_worker_checkpointed_puts_the_job_back_in_the_queue(
    client, ctx, sessionmaker, create_job, settings
):
    from dataclasses import replace

    from worker.runner import _release_paused

    job_id = create_job()
    claim = claim_job(sessionmaker, job_id, settings)
    base = f"/v1/fine_tuning/jobs/{job_id}"
    assert client.post(f"{base}/pause").json()["status"] == "running"
    # The loop saw the request and checkpointed; before the worker let go, the client resumed.
    assert client.post(f"{base}/resume").json()["status"] == "running"
    dispatcher = RecordingDispatcher()
    assert _release_paused(replace(ctx, dispatcher=dispatcher), claim, 3) == "requeued"
    job = job_row(sessionmaker, job_id)
    assert (job.status, job.lease_until, dispatcher.sent) == ("queued", None, [job_id])
    assert event_messages(sessionmaker, job_id)[-1] == "Pause withdrawn after the checkpoint at step 3; re-queued"
    assert run_job(ctx, job_id) == "succeeded"  # and the next claim runs it


@pytest.mark.parametrize("found_by", ["reconciler", "a new claim"])
def test_a_pause_asked_for_is_kept_when_the_worker_is_lost(client, ctx, sessionmaker, create_job, settings, found_by):
    job_id = create_job()
    assert claim_job(sessionmaker, job_id, settings) is not None
    base = f"/v1/fine_tuning/jobs/{job_id}"
    assert client.post(f"{base}/pause").json()["status"] == "running"
    with session_scope(sessionmaker) as session:  # ... and its worker dies before it lets go
        session.execute(update(Job).where(Job.id == job_id).values(lease_until=time.time() - 1))
    if found_by == "reconciler":
        assert reconcile(sessionmaker, RecordingDispatcher(), settings)["paused"] == 1
    else:
        assert claim_job(sessionmaker, job_id, settings) is None
    job = job_row(sessionmaker, job_id)
    assert (job.status, job.pause_requested, job.lease_until, job.attempt) == ("paused", False, None, 1)
    expected = "Fine-tuning job paused before its first checkpoint (its worker stopped); resume continues there"
    assert event_messages(sessionmaker, job_id)[-1] == expected
    assert client.post(f"{base}/resume").json()["status"] == "queued"
    assert run_job(ctx, job_id) == "succeeded"


def test_pausing_and_resuming_never_uses_up_the_attempt_limit(client, ctx, sessionmaker, create_job, settings):
    from worker.runner import _release_paused

    job_id = create_job()
    base = f"/v1/fine_tuning/jobs/{job_id}"
    for _ in range(settings.max_job_attempts + 1):  # each cycle is a claim that ends in a clean let-go
        claim = claim_job(sessionmaker, job_id, settings)
        assert claim is not None
        assert client.post(f"{base}/pause").json()["status"] == "running"
        assert _release_paused(ctx, claim, 0) == "paused"
        assert client.post(f"{base}/resume").json()["status"] == "queued"
    assert run_job(ctx, job_id) == "succeeded"
    job = job_row(sessionmaker, job_id)
    assert (job.attempt, job.lost_workers) == (settings.max_job_attempts + 2, 0)
