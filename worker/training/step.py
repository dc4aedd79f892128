"""One optimizer step of supervised training: the step's examples split into micro-batches (packed rows, or padded
examples), gradients accumulated over them and normalised by the step's supervised-token count, then clipped and
applied (`apply_update`, which DPO's step shares: worker/training/dpo.py). The loop (worker/training/loop.py)
calls one of them once per step."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from app.jobs.spec import TrainingSpec
from worker.training.data import TokenizedExample
from worker.training.devices import DeviceGroup
from worker.training.errors import TrainingError
from worker.training.evaluation import autocast
from worker.training.packing import MicroBatch, step_micro_batches

# Tokens per forward pass when the spec leaves it open and rows are batched (GPU, or padded batches).
DEFAULT_MICRO_BATCH_TOKENS = 16384


def micro_batch_tokens(spec: TrainingSpec, device: torch.device) -> int:
    """The spec's value, else: on CPU with packing one row per forward (measured faster than batching rows:
    no padding to the widest row, a smaller working set), otherwise DEFAULT_MICRO_BATCH_TOKENS."""
    if spec.micro_batch_tokens is not None:
        return spec.micro_batch_tokens
    if spec.packing and device.type == "cpu":
        return spec.max_seq_length
    return DEFAULT_MICRO_BATCH_TOKENS


# Packed rows per forward when scoring on CPU: a forward without its backward has the working set to spare, and four
# rows of 1024 tokens scored 30% faster than one (validation of 51 examples, tuneserve-tiny, 2 cores).
SCORING_ROWS_CPU = 4


def scoring_micro_batch_tokens(spec: TrainingSpec, device: torch.device) -> int:
    """Tokens per forward for validation, reports and DPO's references (no backward): the training value, but
    SCORING_ROWS_CPU rows where training takes one."""
    tokens = micro_batch_tokens(spec, device)
    if spec.micro_batch_tokens is None and spec.packing and device.type == "cpu":
        return SCORING_ROWS_CPU * tokens
    return tokens


@dataclass
class StepFigures:
    """One optimizer step, over all ranks."""

    loss: float  # mean over the step's supervised tokens (DPO: over its pairs)
    accuracy: float  # of the argmax prediction, over the same tokens (DPO: the share of pairs preferred)
    grad_norm: float  # of the LoRA gradients, before clipping
    n_tokens: int
    n_supervised: int
    extra: dict[str, float] = field(default_factory=dict)  # the objective's own figures, by metric name


def apply_update(
    mean_loss: float,
    trainable: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float,
) -> float:
    """Refuse a non-finite loss, then clip, step and clear the accumulated gradients; the norm before clipping."""
    if not math.isfinite(mean_loss):
        raise TrainingError("nan_loss", "the training loss became NaN or infinite; lower the learning rate")
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm).item()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def accumulate_gradients(
    step_loss: torch.nn.Module,
    micro_batches: list[MicroBatch],
    group: DeviceGroup,
    n_supervised: int | None = None,
    weight: float = 1.0,
) -> tuple[float, int]:
    """Backward over this process's micro-batches of one step, each scaled by 1 / `n_supervised` (the whole step's
    supervised tokens over all ranks; by default these micro-batches'), so the accumulated gradient is that of the
    mean loss over the step, however it is split between micro-batches and ranks. DDP's all-reduce averages over
    ranks, so the scale is `group.size` times that; it runs once, after the last micro-batch's backward.
    `weight` 0 makes the backward count for nothing. Returns (summed loss, correct predictions), times `weight`."""
    n_supervised = n_supervised or sum(mb.n_supervised for mb in micro_batches)
    scale = weight * group.size
    loss_total = 0.0
    correct_total = 0
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else group.no_sync(step_loss):
            with autocast(group.device):
                loss, correct = step_loss(mb.to(group.device))
            (loss * scale / n_supervised).backward()
        loss_total += loss.item()
        correct_total += int(correct)
    return loss_total * weight, int(correct_total * weight)


def optimizer_step(
    step_loss: torch.nn.Module,
    group: DeviceGroup,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainable: list[torch.nn.Parameter],
    batch: list[TokenizedExample],
    spec: TrainingSpec,
    pad_id: int,
) -> StepFigures:
    """One optimizer step over `batch` examples: accumulate over micro-batches, normalised by the step's
    supervised-token count (not per micro-batch, nor per rank), so batch 8 x 1, 2 x 4 and two ranks of 4 give the
    same update. Returns the step's figures over all ranks."""
    n_supervised = sum(e.n_supervised for e in batch)
    mine = group.share(batch)
    # A step of fewer examples than ranks (the last of an epoch) leaves some with none; DDP's all-reduce still
    # needs their backward, so they run the step's shortest example with its loss weighted 0.
    weight = 1.0 if mine else 0.0
    micro_batches = step_micro_batches(
        mine or [min(batch, key=len)],
        packing=spec.packing,
        max_seq_length=spec.max_seq_length,
        pad_id=pad_id,
        micro_batch_size=spec.micro_batch_size,
        micro_batch_tokens=micro_batch_tokens(spec, group.device),
    )
    loss_total, correct_total = accumulate_gradients(step_loss, micro_batches, group, n_supervised, weight)
    n_tokens = weight * sum(mb.n_tokens for mb in micro_batches)
    loss_sum, correct_sum, tokens_sum = group.sum([loss_total, correct_total, n_tokens])
    mean_loss = loss_sum / n_supervised
    grad_norm = apply_update(mean_loss, trainable, optimizer, scheduler, spec.max_grad_norm)
    return StepFigures(mean_loss, correct_sum / n_supervised, grad_norm, int(tokens_sum), n_supervised)
