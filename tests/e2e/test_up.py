"""`tuneserve up`, the embedded all-in-one that `make run` starts: migrate, API, one worker, an API key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import start_job, wait_terminal, wait_until
from tests.e2e.server import free_port, tuneserve_env

pytestmark = pytest.mark.slow


def start_up(data_dir, **extra) -> tuple[subprocess.Popen, str, list[str]]:
    port = free_port()
    env = tuneserve_env(data_dir, f"sqlite:///{data_dir / 'tuneserve.db'}", TUNESERVE_PORT=str(port), **extra)
    env.pop("TUNESERVE_DATABASE_URL")  # the embedded default: SQLite under the data dir
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    first = proc.stdout.readline().strip()
    url = f"http://127.0.0.1:{port}"
    # "up" means up: the first request after the announcement is answered, with no retrying.
    if first:
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    lines = [first, proc.stdout.readline().strip()]
    # Keep reading what follows (uvicorn's access log goes to stdout): a full pipe would block the server.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, url, lines


def worker_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def stop(proc: subprocess.Popen) -> None:
    children = worker_pids(proc.pid)
    assert children, "up started no worker"
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    for pid in children:  # the worker goes down with it
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_up_creates_a_key_once_and_serves(tmp_path):
    proc, url, lines = start_up(tmp_path / "data")
    try:
        assert lines[0] == f"tuneserve is up at {url}/v1"
        assert "shown once" in lines[1]
        key = lines[1].split()[-1]
        r = httpx.get(f"{url}/v1/files", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["data"] == []
    finally:
        stop(proc)
    assert (tmp_path / "data" / "tuneserve.db").exists()

    proc, url, lines = start_up(tmp_path / "data")
    try:
        assert "ts-" not in lines[1]  # not shown again
        assert httpx.get(f"{url}/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    finally:
        stop(proc)


def test_up_uses_the_key_from_the_environment_and_its_worker_trains(tmp_path):
    key = "ts-my-chosen-key-0123456789"
    proc, url, lines = start_up(tmp_path / "data", TUNESERVE_API_KEY=key)
    try:
        assert lines[1].endswith(key)
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)
        job = start_job(sdk)  # through the embedded broker to the worker `up` started
        done = wait_terminal(sdk, job.id)
        assert done.status == "succeeded", done.error
        messages = [{"role": "user", "content": "hi"}]
        reply = sdk.chat.completions.create(model=done.fine_tuned_model, messages=messages, max_tokens=3)
        assert reply.choices[0].message.role == "assistant"
    finally:
        stop(proc)


def test_up_restarts_a_worker_that_dies_and_the_job_finishes(tmp_path):
    """kill -9 of up's worker mid-job: up starts another, the job's lease lapses, and it resumes there."""
    key = "ts-my-chosen-key-0123456789"
    fast_recovery = {
        "TUNESERVE_JOB_LEASE_SECONDS": "3",
        "TUNESERVE_JOB_HEARTBEAT_SECONDS": "0.5",
        "TUNESERVE_RECONCILE_INTERVAL_SECONDS": "1",
    }
    proc, url, _ = start_up(tmp_path / "data", TUNESERVE_API_KEY=key, **fast_recovery)
    try:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)
        job = start_job(sdk, n_epochs=10, batch_size=1, n_checkpoints=10)  # 200 steps, a checkpoint every 20
        wait_until(lambda: sdk.fine_tuning.jobs.checkpoints.list(job.id).data, what="a first checkpoint")
        [first] = worker_pids(proc.pid)
        os.kill(first, signal.SIGKILL)
        second = wait_until(lambda: [p for p in worker_pids(proc.pid) if p != first], 30, "a new worker")
        done = wait_terminal(sdk, job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        assert any(m.startswith("Fine-tuning job resumed from step") for m in messages), messages
        assert second == worker_pids(proc.pid)  # one worker, the restarted one
    finally:
        stop(proc)
