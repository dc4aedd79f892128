"""`tuneserve worker --devices 2` on CPU: a job trains on two gloo ranks, the worker process (rank 0) holding the
lease and writing; SIGKILL of the helper rank re-queues the job at once and it resumes from its checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.e2e.conftest import event_messages, published_models, start_job, wait_terminal, wait_until
from tests.e2e.server import LiveServer, WorkerProcess

pytestmark = pytest.mark.slow


def helper_ranks(worker: WorkerProcess) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(worker.proc.pid), "-f", "worker.training.ranks"], capture_output=True)
    return [int(pid) for pid in found.stdout.split()]


def test_a_job_trains_on_two_ranks_and_survives_the_loss_of_one(pg_stack):
    stack = pg_stack
    with LiveServer(stack.env, stack.tmp / "api.log") as server:
        sdk = stack.sdk(server)
        with WorkerProcess(stack.env, stack.tmp / "worker.log", args=("--devices", "2")) as worker:
            job = start_job(sdk, 40, n_epochs=10, batch_size=2, n_checkpoints=10, seed=7)
            wait_until(lambda: sdk.fine_tuning.jobs.checkpoints.list(job.id).data, what="a first checkpoint")
            helpers = helper_ranks(worker)
            assert len(helpers) == 1  # one helper: the worker process itself is rank 0
            os.kill(helpers[0], signal.SIGKILL)
            killed_at = sdk.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number
            done = wait_terminal(sdk, job.id)
            assert helper_ranks(worker) == []
        assert done.status == "succeeded", done.error
        messages = event_messages(sdk, job.id)
        lost = [m for m in messages if "data-parallel rank 1 of 2 exited with signal 9" in m]
        assert len(lost) == 1 and "re-queued to resume from its last checkpoint" in lost[0]
        resumed = [m for m in messages if m.startswith("Fine-tuning job resumed from step")]
        assert len(resumed) == 1 and int(resumed[0].split()[5]) >= killed_at, resumed
        # Checkpoints were written once per step (by rank 0 alone), and the model serves.
        steps = [c.step_number for c in sdk.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data]
        assert len(steps) == len(set(steps))
        chat = sdk.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert chat.choices[0].message.content is not None
    assert published_models(stack, job.id) == 1
