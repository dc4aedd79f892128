"""Training one job on N devices of this machine, data-parallel.

The calling process is rank 0: it keeps the job (its callbacks hold the lease and write events; it alone writes
checkpoints and the adapter). It starts ranks 1..N-1 as helper processes (`python -m worker.training.ranks`),
which run the same `train` with the same arguments on their share of every step and write nothing. They meet
through a TCPStore on a free local port and then form a gloo (CPU) or NCCL (GPU) group; see
worker/training/devices.py for what the ranks exchange.

Failure: a rank that dies closes its connections and the collectives of the others fail. A helper's death is
reported to the caller as `RankLost` (its job goes back to the queue and resumes from its last checkpoint); a
helper whose rank 0 died notices the same way, or by its parent going away, and exits.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from app.jobs.spec import TrainingSpec
from app.ml.registry import BaseModelInfo
from worker.training.callbacks import TrainingCallbacks
from worker.training.devices import DistributedGroup
from worker.training.errors import TrainingError
from worker.training.loop import TrainingResult, train

log = logging.getLogger("tuneserve.ranks")

# How long the helpers may take to start (import torch and transformers) before rank 0 gives up on them.
JOIN_TIMEOUT_SECONDS = 300.0
# How long finished helpers get to exit on their own before they are terminated.
EXIT_GRACE_SECONDS = 10.0


class RankLost(RuntimeError):
    """A helper rank died (killed, out of memory, its machine's fault): the group cannot go on."""


@dataclass
class _RankJob:
    """What every rank trains: `train`'s arguments except the callbacks and the output directory."""

    spec: TrainingSpec
    train_path: Path
    validation_path: Path | None
    base_model: BaseModelInfo | str | Path
    resume_from: Path | None
    init_adapter: Path | None


def rank_device(rank: int) -> torch.device:
    """GPU `rank` on a CUDA machine; the CPU otherwise (gloo ranks share it)."""
    return torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")


def train_on_devices(
    n_devices: int,
    spec: TrainingSpec,
    train_path: Path,
    validation_path: Path | None,
    base_model: BaseModelInfo | str | Path,
    output_dir: Path,
    callbacks: TrainingCallbacks | None = None,
    resume_from: Path | None = None,
    init_adapter: Path | None = None,
) -> TrainingResult:
    """`train` on `n_devices` devices: the same steps, each step's examples shared among the ranks. With 1, plain
    `train` in this process. Raises `RankLost` if a helper rank dies."""
    job = _RankJob(spec, train_path, validation_path, base_model, resume_from, init_adapter)
    if n_devices == 1:
        return _train(job, output_dir, callbacks, None)
    timeout = timedelta(seconds=JOIN_TIMEOUT_SECONDS)
    store = dist.TCPStore("127.0.0.1", 0, n_devices, is_master=True, wait_for_workers=False, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="tuneserve-ranks-") as scratch:
        job_file = Path(scratch) / "job.pickle"
        job_file.write_bytes(pickle.dumps(job))
        helpers = {
            rank: subprocess.Popen(
                [sys.executable, "-m", __name__, str(job_file), str(output_dir / f"rank-{rank}"), str(store.port)]
                + [str(rank), str(n_devices), str(os.getpid())]
            )
            for rank in range(1, n_devices)
        }
        try:
            _wait_for_helpers(store, helpers)
            group = DistributedGroup(store, 0, n_devices, rank_device(0))
            try:
                return _train(job, output_dir, callbacks, group)
            finally:
                group.close()
        except TrainingError:
            raise  # every rank met the same condition (no examples, NaN loss): the user's to fix
        except Exception as exc:
            lost = _dead_helper(helpers, wait=5.0)
            if lost is not None:
                raise RankLost(f"data-parallel rank {lost[0]} of {n_devices} exited with {lost[1]}") from exc
            raise
        finally:
            _stop(helpers)


def _train(
    job: _RankJob, output_dir: Path, callbacks: TrainingCallbacks | None, group: DistributedGroup | None
) -> TrainingResult:
    return train(
        job.spec,
        job.train_path,
        job.validation_path,
        job.base_model,
        output_dir,
        callbacks,
        resume_from=job.resume_from,
        init_adapter=job.init_adapter,
        devices=group,
    )


def _wait_for_helpers(store: dist.TCPStore, helpers: dict[int, subprocess.Popen[bytes]]) -> None:
    """Until every helper has checked in; a helper that exits first is a `RankLost`, not a wait for the timeout."""
    keys = [f"ready/{rank}" for rank in helpers]
    deadline = time.monotonic() + JOIN_TIMEOUT_SECONDS
    while not store.check(keys):
        lost = _dead_helper(helpers, wait=0)
        if lost is not None:
            raise RankLost(f"data-parallel rank {lost[0]} exited with {lost[1]} before joining")
        if time.monotonic() > deadline:
            raise RankLost(f"data-parallel ranks did not join within {JOIN_TIMEOUT_SECONDS:.0f} s")
        time.sleep(0.1)


def _dead_helper(helpers: dict[int, subprocess.Popen[bytes]], wait: float) -> tuple[int, str] | None:
    """(rank, how it ended) of a helper that ended in failure, waiting up to `wait` seconds for one to."""
    deadline = time.monotonic() + wait
    while True:
        for rank, process in helpers.items():
            code = process.poll()
            if code is not None and code != 0:
                return rank, f"signal {-code}" if code < 0 else f"exit code {code}"
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def _stop(helpers: dict[int, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + EXIT_GRACE_SECONDS
    for process in helpers.values():
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _exit_with(parent_pid: int) -> None:
    """A helper whose rank 0 is gone (killed with the worker) must not hold its device: exit."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _helper_main(argv: list[str]) -> int:
    job_file, output_dir, port, rank, size, parent = argv
    _exit_with(int(parent))
    job: _RankJob = pickle.loads(Path(job_file).read_bytes())
    timeout = timedelta(seconds=JOIN_TIMEOUT_SECONDS)
    store = dist.TCPStore("127.0.0.1", int(port), int(size), is_master=False, timeout=timeout)
    store.set(f"ready/{rank}", "1")
    group = DistributedGroup(store, int(rank), int(size), rank_device(int(rank)))
    try:
        _train(job, Path(output_dir), None, group)
    finally:
        group.close()
    return 0


def main() -> Any:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(process)d %(levelname)s %(message)s")
    return _helper_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
