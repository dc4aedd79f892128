"""The production topology as processes on this machine, sharing nothing but Postgres, Redis and an S3-compatible
object store (moto's standalone server): one API, two inference replicas and two workers, each with a data
directory of its own. Files, checkpoints and adapters live in the store; two jobs train at once, one per worker; a
job whose worker is killed resumes on the other from its last checkpoint there; every model is served through the
API by the replica it hashes to, from adapters fetched from the store; a replica that dies, even mid-stream, is
skipped."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from sqlalchemy import select

from app.api.replicas import rank
from app.tables import Job
from tests.e2e.conftest import Stack, event_messages, published_models, start_job, wait_terminal, wait_until
from tests.e2e.server import LiveServer, WorkerProcess

pytestmark = pytest.mark.slow

TOKEN = "internal-token-for-the-topology-test"


def machine(stack: Stack, s3_server, prefix: str, name: str) -> dict[str, str]:
    """The environment of one machine: its own data directory, the shared database, broker and store."""
    return {
        **stack.env,
        **s3_server.env,
        "TUNESERVE_DATA_DIR": str(stack.tmp / name),
        "TUNESERVE_STORAGE_URL": f"s3://{s3_server.BUCKET}/{prefix}",
        "TUNESERVE_MAX_UPLOAD_BYTES": str(12 * 1024 * 1024),
    }


def served_by(sdk, model: str) -> str:
    raw = sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0
    )
    assert raw.parse().choices[0].message.content is not None
    return raw.headers["x-tuneserve-replica"]


def running_on(stack: Stack, job_ids: list[str]) -> dict[str, str] | None:
    """job id -> its worker, once all the jobs are running at the same moment."""
    with stack.sessionmaker() as session:
        rows = session.execute(select(Job.id, Job.status, Job.worker).where(Job.id.in_(job_ids))).all()
    return {job_id: worker for job_id, status, worker in rows} if all(r.status == "running" for r in rows) else None


def test_the_production_topology_shares_only_the_database_the_broker_and_the_store(pg_stack, s3_server):
    stack, prefix = pg_stack, f"e2e-{uuid.uuid4().hex[:8]}"

    def on(name: str) -> dict[str, str]:
        return machine(stack, s3_server, prefix, name) | {"TUNESERVE_INTERNAL_TOKEN": TOKEN}

    with (
        LiveServer(on("gpu-1"), stack.tmp / "r1.log", command="inference") as first,
        LiveServer(on("gpu-2"), stack.tmp / "r2.log", command="inference") as second,
    ):
        replicas = [first.url, second.url]
        api_env = on("api-machine") | {"TUNESERVE_INFERENCE_REPLICAS": json.dumps(replicas)}
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

            # Two jobs train at once, one on each worker; the first worker is killed after a checkpoint.
            hyperparameters = {"n_epochs": 10, "batch_size": 1, "n_checkpoints": 10}
            with (
                WorkerProcess(on("worker-machine-1"), stack.tmp / "w1.log") as one,
                WorkerProcess(on("worker-machine-2"), stack.tmp / "w2.log"),
            ):
                jobs = [start_job(sdk, seed=7, **hyperparameters), start_job(sdk, seed=8, **hyperparameters)]
                workers = wait_until(lambda: running_on(stack, [j.id for j in jobs]), what="both jobs running")
                assert len(set(workers.values())) == 2, workers
                victim = next(j for j in jobs if workers[j.id].endswith(f":{one.proc.pid}"))
                wait_until(lambda: sdk.fine_tuning.jobs.checkpoints.list(victim.id).data, what="a first checkpoint")
                one.kill()
                killed_at = sdk.fine_tuning.jobs.checkpoints.list(victim.id).data[0].step_number
                done = [wait_terminal(sdk, j.id, timeout=300) for j in jobs]
            assert [d.status for d in done] == ["succeeded", "succeeded"], [d.error for d in done]
            assert f"Fine-tuning job resumed from step {killed_at} (attempt 2)" in event_messages(sdk, victim.id)

            # Every model is served through the API, each by the replica it hashes to, every time, from adapters
            # the replicas fetched from the store.
            checkpoint = sdk.fine_tuning.jobs.checkpoints.list(victim.id).data[-1].fine_tuned_model_checkpoint
            models = ["tuneserve-tiny", checkpoint] + [d.fine_tuned_model for d in done]
            owners = {model: rank(replicas, model)[0] for model in models}
            for _ in range(2):
                assert {model: served_by(sdk, model) for model in models} == owners
            csv = sdk.files.content(done[0].result_files[0]).read().decode()
            assert csv.startswith("step,train_loss,")

            # The replica serving a stream dies mid-answer: the stream ends with an error event, not a hang or a
            # cut; then every model is answered by the survivor.
            owner = owners["tuneserve-tiny"]
            dead, survivor = (first, second) if owner == first.url else (second, first)
            body = {"model": "tuneserve-tiny", "prompt": "hi", "max_tokens": 2000, "temperature": 0, "stream": True}
            headers = {"Authorization": f"Bearer {sdk.api_key}"}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data: ")).startswith('data: {"id"')
                dead.kill()
                rest = [line for line in lines if line]
            assert rest, "the stream ended without a word when its replica died"
            assert json.loads(rest[-1].removeprefix("data: "))["error"]["code"] == "replica_lost", rest[-3:]
            assert {model: served_by(sdk, model) for model in models} == dict.fromkeys(models, survivor.url)

    stored = s3_server.objects(prefix)
    assert any(k.startswith(f"{prefix}/files/") for k in stored)
    assert any(k.startswith(f"{prefix}/jobs/{victim.id}/checkpoints/") for k in stored)
    adapter_config = next(k for k in stored if k.startswith(f"{prefix}/models/") and k.endswith("adapter_config.json"))
    config = json.loads(s3_server.client().get_object(Bucket=s3_server.BUCKET, Key=adapter_config)["Body"].read())
    assert config["base_model_name_or_path"] == "tuneserve-tiny"  # no machine's path
    # Nothing was stored on any machine's disk: only their caches hold what they fetched.
    for name in ("api-machine", "gpu-1", "gpu-2", "worker-machine-1", "worker-machine-2"):
        storage_dir = stack.tmp / name / "storage"
        assert not storage_dir.exists() or not any(p.is_file() for p in storage_dir.rglob("*")), name
    assert [published_models(stack, j.id) for j in jobs] == [1, 1]
