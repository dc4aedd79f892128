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
# How long finished helpers get to exit on their own before they are killed.
EXIT_GRACE_SECONDS = 10.0
EXIT_OUT_OF_MEMORY = 3  # a helper's exit status when its device ran out of memory


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
        failed = True
        try:
            _wait_for_helpers(store, helpers)
            group = DistributedGroup(store, 0, n_devices, rank_device(0), timeout)
            try:
                with _Watch(helpers, group):
                    result = _train(job, output_dir, callbacks, group)
            except TrainingError:
                raise  # every rank met the same condition (no examples, NaN loss): the user's to fix
            except Exception as exc:
                # Before the group is closed, so that no helper's end can be a reaction to rank 0's.
                failure = _helper_failure(helpers, n_devices)
                if failure is None:
                    raise
                raise failure from exc
            finally:
                group.close()
            failed = False
            return result
        finally:
            _stop(helpers, grace=0 if failed else EXIT_GRACE_SECONDS)


class _Watch:
    """Rank 0's watch over its helpers while it trains: the first to end in failure aborts rank 0's collectives
    (see DistributedGroup.abort), which then fail as they would with gloo."""

    def __init__(self, helpers: dict[int, subprocess.Popen[bytes]], group: DistributedGroup):
        self._helpers, self._group = helpers, group
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rank-watch", daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(0.2):
            if _dead_helper(self._helpers, wait=0) is not None:
                try:
                    self._group.abort()
                except Exception:
                    log.warning("aborting the data-parallel group failed", exc_info=True)
                return


def _helper_failure(helpers: dict[int, subprocess.Popen[bytes]], size: int) -> Exception | None:
    """What a helper's failure means for the job, if one failed: out of memory (as on one device), or a lost
    rank. Waits a moment: rank 0's collective can fail before the dead helper's exit status is in."""
    lost = _dead_helper(helpers, wait=2.0)
    if lost is None:
        return None
    rank, code = lost
    if code == EXIT_OUT_OF_MEMORY:
        return torch.OutOfMemoryError(f"data-parallel rank {rank} of {size} ran out of memory")
    return RankLost(f"data-parallel rank {rank} of {size} exited with {_how(code)}")


def _how(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit code {code}"


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
    """Until every helper has set up its device; one that exits first is a `RankLost`, not a wait for the
    timeout."""
    keys = [f"ready/{rank}" for rank in helpers]
    deadline = time.monotonic() + JOIN_TIMEOUT_SECONDS
    while not store.check(keys):
        lost = _dead_helper(helpers, wait=0)
        if lost is not None:
            raise RankLost(f"data-parallel rank {lost[0]} exited with {_how(lost[1])} before joining")
        if time.monotonic() > deadline:
            raise RankLost(f"data-parallel ranks did not join within {JOIN_TIMEOUT_SECONDS:.0f} s")
        time.sleep(0.1)


def _dead_helper(helpers: dict[int, subprocess.Popen[bytes]], wait: float) -> tuple[int, int] | None:
    """(rank, exit status; negative: the signal) of a helper that ended in failure, waiting up to `wait` seconds
    for one to."""
    deadline = time.monotonic() + wait
    while True:
        for rank, process in helpers.items():
            code = process.poll()
            if code is not None and code != 0:
                return rank, code
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def _stop(helpers: dict[int, subprocess.Popen[bytes]], grace: float) -> None:
    """Helpers that finished exit by themselves within `grace`; after a failure they are waiting in a collective
    for a rank 0 that will not come, and are killed at once."""
    deadline = time.monotonic() + grace
    for rank, process in helpers.items():
        try:
            code = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        if grace and code != 0:  # rank 0 finished: a helper that did not is worth an operator's look
            log.warning("data-parallel rank %s did not finish with rank 0 (%s)", rank, _how(code))


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
    group = DistributedGroup(store, int(rank), int(size), rank_device(int(rank)), timeout)
    try:
        _train(job, Path(output_dir), None, group)
    except torch.OutOfMemoryError:
        log.exception("rank %s ran out of memory", rank)
        return EXIT_OUT_OF_MEMORY  # rank 0 fails the job as out of memory, as on one device
    finally:
        group.close()
    return 0


def main() -> Any:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(process)d %(levelname)s %(message)s")
    return _helper_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
