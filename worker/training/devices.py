"""The processes that train one job together: one device, or a torch.distributed group of N (one per device).

The loop asks its group for everything that differs between the two, so it has one code path:
- `share(batch)`: the examples of a step this process trains on (all of them, or a token-balanced slice);
- `wrap(model, forward)`: the module whose forward gives a micro-batch's loss sums, or DPO's sequence log-probs
  (under DDP, which all-reduces the LoRA gradients on the last micro-batch of a step; `no_sync` skips that on the
  others);
- `agree(stop)`: rank 0's stop request, so every rank stops at the same step;
- `sum(values)`: figures summed over the ranks (loss, accuracy and token counts of a step, validation sums);
- `is_main`: whether this process writes (checkpoints, the adapter; its callbacks write events and hold the lease).

DDP averages gradients over ranks; the loop scales each rank's loss by `size` so the result is the gradient of the
step's summed loss over its supervised tokens, as on one device with gradient accumulation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sized
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from peft import PeftModel
from torch.nn.parallel import DistributedDataParallel

from worker.training.callbacks import StopRequest
from worker.training.loss import loss_sums
from worker.training.packing import MicroBatch

T = TypeVar("T")
E = TypeVar("E", bound=Sized)  # a training example or preference pair: its length is its token count

# How long a rank waits in a collective for the others. A rank that dies closes its connections, and the others'
# collectives fail at once; this bounds only a rank that hangs (rank 0 uploads checkpoints while the others wait).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
_STOP_CODES: list[StopRequest] = [None, "cancel", "pause"]


class StepLoss(torch.nn.Module):
    """A training objective's forward (`loss_sums`, or DPO's `sequence_logps`: `forward(model, batch, ...)`) as a
    module's, so that DDP sees the forward it must prepare the backward for."""

    def __init__(self, model: PeftModel, forward: Callable[..., Any] = loss_sums):
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, batch: MicroBatch, *args: Any) -> Any:
        return self._forward(self.model, batch, *args)


class DeviceGroup:
    """One process on one device: every method is the identity."""

    rank = 0
    size = 1

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch: list[E]) -> list[E]:
        return batch

    def shard(self, examples: list[T]) -> list[T]:
        """An even slice of `examples` (for evaluation, where order does not matter)."""
        return examples

    def wrap(self, model: PeftModel, forward: Callable[..., Any] = loss_sums) -> torch.nn.Module:
        return StepLoss(model, forward)

    def no_sync(self, module: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def agree(self, stop: StopRequest) -> StopRequest:
        return stop

    def sum(self, values: list[float]) -> list[float]:
        return values


class DistributedGroup(DeviceGroup):
    """This process's place in a torch.distributed group: NCCL between GPUs (device = cuda:rank), gloo on CPU."""

    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device, join_timeout: timedelta):
        """Set up this process's device, say so in the store (`ready/{rank}`: rank 0 waits for its helpers' before
        it joins), and join the group, waiting at most `join_timeout` for the others."""
        super().__init__(device)
        self.rank, self.size = rank, size
        self._threads = torch.get_num_threads()
        if device.type == "cuda":
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            # The ranks share this machine's cores: each takes its part, not all of them (oversubscribed, every
            # rank's matmuls would contend with the others').
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // size))
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks are all on this machine
            backend = "gloo"
        try:
            store.set(f"ready/{rank}", "1")
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=join_timeout)
            dist.distributed_c10d._set_pg_timeout(COLLECTIVE_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._threads)  # rank 0 is a worker that goes on to other jobs

    def abort(self) -> None:
        """Unblock this rank's collectives after another rank died. gloo notices by itself (the dead rank's
        sockets close); NCCL between GPUs of one machine has no socket to notice, and is aborted."""
        if self.device.type == "cuda" and dist.is_initialized():
            dist.distributed_c10d._abort_process_group()

    def share(self, batch: list[E]) -> list[E]:
        return [batch[i] for i in balanced_shares([len(e) for e in batch], self.size)[self.rank]]

    def shard(self, examples: list[T]) -> list[T]:
        return examples[self.rank :: self.size]

    def wrap(self, model: PeftModel, forward: Callable[..., Any] = loss_sums) -> torch.nn.Module:
        module = StepLoss(model, forward)
        # Only the LoRA weights train. The frozen base is loaded identically by every rank, so DDP neither
        # broadcasts it at start (gigabytes on a real model) nor buckets it; its buffers are never written.
        frozen = [f"model.{name}" for name, p in model.named_parameters() if not p.requires_grad]
        frozen += [f"model.{name}" for name, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)

    def no_sync(self, module: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        assert isinstance(module, DistributedDataParallel)
        return module.no_sync()

    def agree(self, stop: StopRequest) -> StopRequest:
        code = torch.tensor([_STOP_CODES.index(stop)], device=self.device)
        dist.broadcast(code, src=0)
        return _STOP_CODES[int(code.item())]

    def sum(self, values: list[float]) -> list[float]:
        # float64: token counts reach billions over a job, and sums must not lose the low digits.
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def balanced_shares(lengths: list[int], n: int) -> list[list[int]]:
    """Indices of `lengths` dealt to `n` shares, longest first to the share with the fewest tokens so far, so each
    rank's step takes about as long as the others' (they wait for the slowest at the gradient all-reduce).
    Deterministic: every rank computes the same deal."""
    shares: list[list[int]] = [[] for _ in range(n)]
    totals = [0] * n
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        least = min(range(n), key=lambda r: (totals[r], r))
        shares[least].append(i)
        totals[least] += lengths[i]
    for share in shares:
        share.sort()
    return shares
