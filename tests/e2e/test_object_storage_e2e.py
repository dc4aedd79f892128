"""Machines that share no disk: the API and two workers, each with a data directory of its own, sharing only
Postgres, Redis and an S3-compatible object store (moto's standalone server). Files, checkpoints and adapters live
in the store; a job killed on one worker resumes on the other from its last checkpoint there; the API serves the
adapter it fetched from the store."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.e2e.conftest import Stack, event_messages, published_models, start_job, wait_terminal, wait_until
from tests.e2e.server import LiveServer, WorkerProcess

pytestmark = pytest.mark.slow


def machine(stack: Stack, s3_server, prefix: str, name: str) -> dict[str, str]:
    """The environment of one machine: its own data directory, the shared database, broker and store."""
    return {
        **stack.env,
        **s3_server.env,
        "TUNESERVE_DATA_DIR": str(stack.tmp / name),
        "TUNESERVE_STORAGE_URL": f"s3://{s3_server.BUCKET}/{prefix}",
        "TUNESERVE_MAX_UPLOAD_BYTES": str(12 * 1024 * 1024),
    }


def test_a_job_moves_between_workers_through_the_object_store_and_is_served_from_it(pg_stack, s3_server):
    stack, prefix = pg_stack, f"e2e-{uuid.uuid4().hex[:8]}"
    api_env = machine(stack, s3_server, prefix, "api-machine")
    with LiveServer(api_env, stack.tmp / "api.log") as server:
        sdk = stack.sdk(server)

        # An upload over the cap is cut off as it streams (past the first 8 MiB part): nothing stays in the store.
        too_big = b'{"messages": []}\n' * (20 * 1024 * 1024 // 17)
        r = httpx.post(
            f"{server.url}/v1/files",
            headers={"Authorization": f"Bearer {sdk.api_key}"},
            data={"purpose": "fine-tune"},
            files={"file": ("big.jsonl", too_big)},
            timeout=120,
        )
        assert r.status_code == 413, r.text
        assert s3_server.objects(prefix) == [] and s3_server.multipart_uploads() == []

        hyperparameters = {"n_epochs": 10, "batch_size": 1, "n_checkpoints": 10, "seed": 7}
        with WorkerProcess(machine(stack, s3_server, prefix, "worker-machine-1"), stack.tmp / "w1.log") as first:
            job = start_job(sdk, **hyperparameters)
            wait_until(lambda: sdk.fine_tuning.jobs.checkpoints.list(job.id).data, what="a first checkpoint")
            first.kill()
        killed_at = sdk.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number
        with WorkerProcess(machine(stack, s3_server, prefix, "worker-machine-2"), stack.tmp / "w2.log"):
            done = wait_terminal(sdk, job.id)
        assert done.status == "succeeded", done.error
        assert f"Fine-tuning job resumed from step {killed_at} (attempt 2)" in event_messages(sdk, job.id)

        # The API machine fetches the adapter from the store and serves it.
        chat = sdk.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        assert chat.choices[0].finish_reason in ("stop", "length")
        checkpoint = sdk.fine_tuning.jobs.checkpoints.list(job.id).data[-1].fine_tuned_model_checkpoint
        assert sdk.completions.create(model=checkpoint, prompt="hi", max_tokens=2).choices
        csv = sdk.files.content(done.result_files[0]).read().decode()
        assert csv.startswith("step,train_loss,")

    stored = s3_server.objects(prefix)
    assert any(k.startswith(f"{prefix}/files/") for k in stored)
    assert any(k.startswith(f"{prefix}/jobs/{job.id}/checkpoints/") for k in stored)
    adapter_config = next(k for k in stored if k.startswith(f"{prefix}/models/") and k.endswith("adapter_config.json"))
    config = json.loads(s3_server.client().get_object(Bucket=s3_server.BUCKET, Key=adapter_config)["Body"].read())
    assert config["base_model_name_or_path"] == "tuneserve-tiny"  # no machine's path
    # Nothing was stored on any machine's disk: only their caches hold what they fetched.
    for name in ("api-machine", "worker-machine-1", "worker-machine-2"):
        storage_dir = stack.tmp / name / "storage"
        assert not storage_dir.exists() or not any(p.is_file() for p in storage_dir.rglob("*")), name
    assert published_models(stack, job.id) == 1
