"""Scoring a model on examples without training it, on supervised tokens only, as the training loss counts them:
the validation metrics (mean loss and token accuracy over a set) and the per-example report (each training row's
loss, to find the rows the model finds hardest: mislabelled or inconsistent ones)."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

import torch
from peft import PeftModel

from app.jobs.spec import TrainingSpec
from app.ml.device import autocast_dtype
from worker.training.data import TokenizedExample
from worker.training.devices import DeviceGroup
from worker.training.loss import loss_sums, token_losses
from worker.training.packing import best_fit_decreasing, collate_packed, group_rows, step_micro_batches


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast over bf16 base weights (the fp32 LoRA weights' matmuls run in bf16 too; their gradients and
    the optimizer state stay fp32); none elsewhere."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def scoring(model: PeftModel, device: torch.device):  # type: ignore[no-untyped-def]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device):
            yield
    finally:
        model.train(was_training)


def evaluate(
    model: PeftModel,
    examples: list[TokenizedExample],
    spec: TrainingSpec,
    pad_id: int,
    group: DeviceGroup,
    micro_batch_tokens: int,
) -> tuple[float, float]:
    """Mean loss and token accuracy over supervised tokens of `examples` (packed, no gradients; each rank of a
    group scores its slice)."""
    loss_total, correct_total, n_total = 0.0, 0, 0
    with scoring(model, group.device):
        for mb in step_micro_batches(
            group.shard(examples),
            packing=True,
            max_seq_length=spec.max_seq_length,
            pad_id=pad_id,
            micro_batch_tokens=micro_batch_tokens,
        ):
            loss, correct = loss_sums(model, mb.to(group.device))
            loss_total += loss.item()
            correct_total += int(correct)
            n_total += mb.n_supervised
    loss_sum, correct_sum, n_sum = group.sum([loss_total, correct_total, n_total])
    return loss_sum / n_sum, correct_sum / n_sum


@dataclass
class ExampleScore:
    """One training row as the trained model sees it. `wrong`: the model's greedy prediction still misses at least
    one of the row's supervised tokens."""

    line: int
    loss: float
    max_token_loss: float
    mean_token_accuracy: float
    supervised_tokens: int
    wrong: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_examples(
    model: PeftModel,
    examples: list[TokenizedExample],
    max_seq_length: int,
    pad_id: int,
    device: torch.device,
    micro_batch_tokens: int,
) -> list[ExampleScore]:
    """Every example's mean loss and token accuracy, worst (highest loss) first. Examples are packed as in
    training and split back by their segment bounds."""
    bins = best_fit_decreasing([len(e) for e in examples], max_seq_length)
    widths = [sum(len(examples[i]) for i in b) for b in bins]
    scores: list[ExampleScore] = []
    with scoring(model, device):
        for group in group_rows(widths, None, micro_batch_tokens):
            rows = [bins[i] for i in group]
            batch = collate_packed([[examples[i] for i in row] for row in rows], pad_id)
            losses, correct = token_losses(model, batch.to(device))
            # Per row, sums over each example's span from running totals (float64: a row holds thousands).
            loss_runs = torch.nn.functional.pad(losses.double().cumsum(1), (1, 0)).cpu()
            correct_runs = torch.nn.functional.pad(correct.long().cumsum(1), (1, 0)).cpu()
            for r, row in enumerate(rows):
                bounds = batch.segments[r]
                for k, i in enumerate(row):
                    start, end = bounds[k], bounds[k + 1]
                    n = examples[i].n_supervised
                    hits = int(correct_runs[r, end] - correct_runs[r, start])
                    loss = float(loss_runs[r, end] - loss_runs[r, start]) / n
                    worst = float(losses[r, start:end].max())
                    scores.append(ExampleScore(examples[i].line, loss, worst, hits / n, n, hits < n))
    return sorted(scores, key=lambda s: -s.loss)
