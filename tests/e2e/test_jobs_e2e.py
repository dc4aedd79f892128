"""Jobs end to end: the openai SDK against uvicorn, real Celery worker subprocesses, Postgres or SQLite,
Redis or the embedded broker; and the faults a job service must survive."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tests.datasets.samples import valid_chat_file
from tests.e2e.conftest import Stack, event_messages, published_models, start_job, wait_terminal, wait_until
from tests.e2e.server import LiveServer, RedisServer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stack_fixture", ["pg_stack", "sqlite_stack"])
def test_full_path_with_the_sdk(request, stack_fixture):
    """Postgres + Redis, and SQLite + the embedded broker (what `tuneserve up` runs)."""
    stack: Stack = request.getfixturevalue(stack_fixture)
    with LiveServer(stack.env, stack.tmp / "api.log") as server, stack.worker():
        sdk = stack.sdk(server)
        job = start_job(sdk, n_checkpoints=2, validation_examples=10)
        assert job.status == "queued" and job.fine_tuned_model is None and job.validation_file
        done = wait_terminal(sdk, job.id)
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model.startswith("ft:tuneserve-tiny:alpha:e2e:")
        assert done.trained_tokens > 0 and done.result_files and done.hyperparameters.n_epochs == 2

        events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=3))  # auto-paginates with `after`
        assert len(events) == len({e.id for e in events}) >= 10 + 6
        assert events[0].message == "The job has successfully completed"
        assert events[-1].message == f"Created fine-tuning job: {job.id}"
        [last_step] = [e for e in events if e.type == "metrics" and e.message.startswith("Step 10/10")]
        assert ", validation loss=" in last_step.message  # the validation file was used ...
        assert last_step.data["full_valid_loss"] > 0 and 0 <= last_step.data["full_valid_mean_token_accuracy"] <= 1

        checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in checkpoints] == [10, 5]
        assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-10"
        assert checkpoints[0].metrics.full_valid_loss == last_step.data["full_valid_loss"]  # ... everywhere
        csv = sdk.files.content(done.result_files[0]).read().decode().splitlines()
        assert csv[0].startswith("step,train_loss,") and "valid_loss" in csv[0]
        valid_loss = csv[0].split(",").index("valid_loss")
        assert float(csv[-1].split(",")[valid_loss]) == pytest.approx(last_step.data["valid_loss"], rel=1e-5)
        assert [j.id for j in sdk.fine_tuning.jobs.list()] == [job.id]
    assert published_models(stack, job.id) == 1


def steps_reported(messages: list[str]) -> list[int]:
    return [int(m.split()[1].split("/")[0]) for m in messages if m.startswith("Step ")]


def adapter_tensors(stack: Stack, model: str) -> dict:
    from safetensors.torch import load_file

    from app.tables import FineTunedModel

    with stack.sessionmaker() as session:
        key = session.get(FineTunedModel, model).storage_key
    return load_file(stack.tmp / "data" / "storage" / key / "adapter_model.safetensors")


def test_worker_killed_after_a_checkpoint_resumes_there(pg_stack):
    stack = pg_stack
    # 200 steps, a checkpoint every 20; a fixed seed so an uninterrupted run is comparable.
    hyperparameters = {"n_epochs": 10, "batch_size": 1, "n_checkpoints": 10, "seed": 7}
    with LiveServer(stack.env, stack.tmp / "api.log") as server:
        sdk = stack.sdk(server)
        with stack.worker() as first:
            job = start_job(sdk, **hyperparameters)
            wait_until(lambda: sdk.fine_tuning.jobs.checkpoints.list(job.id).data, what="a first checkpoint")
            first.kill()
        assert sdk.fine_tuning.jobs.retrieve(job.id).status == "running"  # nobody knows yet
        killed_at = sdk.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number

        with stack.worker():
            done = wait_terminal(sdk, job.id)
            straight = wait_terminal(sdk, start_job(sdk, **hyperparameters).id)  # the same job, never killed
        assert done.status == "succeeded" and straight.status == "succeeded", (done.error, straight.error)

        messages = event_messages(sdk, job.id)
        [resumed] = [i for i, m in enumerate(messages) if m.startswith("Fine-tuning job resumed from step")]
        assert messages[resumed] == f"Fine-tuning job resumed from step {killed_at} (attempt 2)"
        before, after = steps_reported(messages[:resumed]), steps_reported(messages[resumed:])
        # The first attempt reported every step up to its checkpoint (and maybe a few after, which are lost);
        # the second starts right after the checkpoint: no step up to it is trained or reported again.
        assert before == list(range(1, len(before) + 1)) and len(before) >= killed_at, messages
        assert after == list(range(killed_at + 1, 201))
        # And it ends where a run that was never interrupted ends.
        resumed_adapter, straight_adapter = (adapter_tensors(stack, j.fine_tuned_model) for j in (done, straight))
        assert resumed_adapter.keys() == straight_adapter.keys()
        for name, tensor in resumed_adapter.items():
            assert torch.equal(tensor, straight_adapter[name]), name
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


def test_a_job_created_while_the_broker_is_down_is_sent_once_it_is_back(tmp_path, postgres_url, pg_stack):
    broker = RedisServer(tmp_path / "redis")  # not started yet: the broker is down
    stack = Stack(tmp_path, postgres_url, broker.url)
    with LiveServer(stack.env, stack.tmp / "api.log") as server:
        sdk = stack.sdk(server)
        job = start_job(sdk)  # acknowledged: the row is committed; the send failed
        assert job.status == "queued"
        assert f"could not send job {job.id} to the broker" in server.log()
        with broker, stack.worker():  # the broker is up, empty
            done = wait_terminal(sdk, job.id)  # the worker's reconciler sent it from the job row
        assert done.status == "succeeded", done.error
        assert sum(m == "Fine-tuning job started" for m in event_messages(sdk, job.id)) == 1
    assert published_models(stack, job.id) == 1


def test_broker_flushed_while_a_job_runs_loses_nothing(tmp_path, postgres_url, pg_stack):
    with RedisServer(tmp_path / "redis") as redis_server:
        stack = Stack(tmp_path, postgres_url, redis_server.url)
        with LiveServer(stack.env, stack.tmp / "api.log") as server, stack.worker():
            sdk = stack.sdk(server)
            job = start_job(sdk, n_epochs=5, batch_size=1)  # 100 steps
            wait_until(lambda: steps_reported(event_messages(sdk, job.id)), what="training under way")
            redis_server.flushall()  # the running job's unacked message is gone
            done = wait_terminal(sdk, job.id)
            assert done.status == "succeeded", done.error
            messages = event_messages(sdk, job.id)
        assert steps_reported(messages) == list(range(1, 101))  # one attempt, never re-driven
        assert not any("resumed" in m or "re-queued" in m for m in messages)
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
