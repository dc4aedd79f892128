"""Jobs end to end: the openai SDK against uvicorn, real Celery worker subprocesses, Postgres or SQLite,
Redis or the embedded broker; and the faults a job service must survive."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.datasets.samples import valid_chat_file
from tests.e2e.conftest import Stack, published_models, start_job, wait_terminal, wait_until
from tests.e2e.server import LiveServer, RedisServer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stack_fixture", ["pg_stack", "sqlite_stack"])
def test_full_path_with_the_sdk(request, stack_fixture):
    """Postgres + Redis, and SQLite + the embedded broker (what `tuneserve up` runs)."""
    stack: Stack = request.getfixturevalue(stack_fixture)
    with LiveServer(stack.env, stack.tmp / "api.log") as server, stack.worker():
        sdk = stack.sdk(server)
        job = start_job(sdk, n_checkpoints=2)
        assert job.status == "queued" and job.fine_tuned_model is None
        done = wait_terminal(sdk, job.id)
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model.startswith("ft:tuneserve-tiny:alpha:e2e:")
        assert done.trained_tokens > 0 and done.result_files and done.hyperparameters.n_epochs == 2

        events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=3))  # auto-paginates with `after`
        assert len(events) == len({e.id for e in events}) >= 10 + 6
        assert events[0].message == "The job has successfully completed"
        assert events[-1].message == f"Created fine-tuning job: {job.id}"
        assert any(e.type == "metrics" and e.message.startswith("Step 10/10") for e in events)

        checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in checkpoints] == [10, 5]
        assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-10"
        assert sdk.files.content(done.result_files[0]).read().startswith(b"step,train_loss,")
        assert [j.id for j in sdk.fine_tuning.jobs.list()] == [job.id]
    assert published_models(stack, job.id) == 1


def test_worker_killed_after_a_checkpoint_resumes_there(pg_stack):
    stack = pg_stack
    with LiveServer(stack.env, stack.tmp / "api.log") as server:
        sdk = stack.sdk(server)
        with stack.worker() as first:
            job = start_job(sdk, n_epochs=10, batch_size=1, n_checkpoints=10)  # 200 steps, a checkpoint every 20
            wait_until(lambda: sdk.fine_tuning.jobs.checkpoints.list(job.id).data, what="a first checkpoint")
            first.kill()
        killed_at = sdk.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number
        assert sdk.fine_tuning.jobs.retrieve(job.id).status == "running"  # nobody knows yet

        with stack.worker():
            done = wait_terminal(sdk, job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100)]
        resumed = [m for m in messages if m.startswith("Fine-tuning job resumed from step")]
        assert len(resumed) == 1 and int(resumed[0].split()[5]) >= killed_at
        assert sum(m.startswith("Step 200/200") for m in messages) == 1
    assert published_models(stack, job.id) == 1
    assert len(list((stack.tmp / "data" / "storage" / "models" / job.id).iterdir())) == 1


def test_broker_losing_every_message_delays_but_loses_nothing(tmp_path, postgres_url, pg_stack):
    with RedisServer(tmp_path / "redis") as redis_server:
        stack = Stack(tmp_path, postgres_url, redis_server.url)
        with LiveServer(stack.env, stack.tmp / "api.log") as server:
            sdk = stack.sdk(server)
            job = start_job(sdk)  # acknowledged: the row is committed and the task sent
            redis_server.flushall()  # ... and the message is gone before any worker saw it
            with stack.worker():
                done = wait_terminal(sdk, job.id)
            assert done.status == "succeeded", done.error
            assert sdk.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == done.fine_tuned_model
    assert published_models(stack, job.id) == 1


def test_cancel_over_http_stops_a_running_worker(pg_stack):
    stack = pg_stack
    with LiveServer(stack.env, stack.tmp / "api.log") as server, stack.worker() as worker:
        sdk = stack.sdk(server)
        job = start_job(sdk, n_epochs=50, batch_size=1)  # 1000 steps
        wait_until(lambda: sdk.fine_tuning.jobs.retrieve(job.id).status == "running", what="running")
        assert sdk.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        wait_until(lambda: f"job {job.id}: cancelled" in worker.log(), 30, "the worker to stop")
        with pytest.raises(openai.BadRequestError):
            sdk.fine_tuning.jobs.cancel(job.id)
    assert published_models(stack, job.id) == 0


def test_twenty_concurrent_creates_with_one_key_make_one_job(pg_stack):
    stack = pg_stack
    with LiveServer(stack.env, stack.tmp / "api.log") as server:
        sdk = stack.sdk(server)
        file_id = sdk.files.create(file=("t.jsonl", valid_chat_file(12)), purpose="fine-tune").id
        headers = {"Authorization": f"Bearer {sdk.api_key}", "Idempotency-Key": "one-job-please"}
        body = {"model": "tuneserve-tiny", "training_file": file_id}

        def post(_):
            return httpx.post(f"{server.url}/v1/fine_tuning/jobs", json=body, headers=headers, timeout=30)

        with ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(post, range(20)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 409}, statuses
        created = {r.json()["id"] for r in responses if r.status_code == 200}
        assert len(created) == 1
        # The SDK retries a 409 by itself and then gets the replay.
        replay = (
            stack.sdk(server)
            .with_options(max_retries=3)
            .fine_tuning.jobs.create(
                model="tuneserve-tiny", training_file=file_id, extra_headers={"Idempotency-Key": "one-job-please"}
            )
        )
        assert replay.id in created
        assert [j.id for j in sdk.fine_tuning.jobs.list()] == [replay.id]
