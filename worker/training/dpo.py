"""DPO (Rafailov et al. 2023) over LoRA: the step, validation and per-pair report of the "dpo" method.

Per pair, with log p the summed log-probability of an answer's tokens given its conversation:
loss = -log sigmoid(beta * ((log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected)))).
The reference is the model the job starts from: the base model with the adapter disabled (no second copy of the
weights), or the fine-tuned model a job continues from. Its log-probabilities never change, so they are computed
once per pair before the first step and travel in every checkpoint (a resumed run uses the very same values).
The reported figures are TRL's: rewards beta * (log p - log p_ref) of each answer, their margin, and the share
of pairs whose chosen answer has the higher reward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel

from worker.training.devices import DeviceGroup
from worker.training.evaluation import autocast, scoring
from worker.training.loss import sequence_logps
from worker.training.preference import PairBatch, PreferencePair, pair_micro_batches
from worker.training.step import StepFigures, apply_update


@dataclass
class PairFigures:
    """Per pair of a micro-batch, [pairs] each."""

    loss: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor

    @property
    def preferred(self) -> torch.Tensor:
        return self.chosen_reward > self.rejected_reward

    def sums(self) -> list[float]:
        """[loss, preferred, chosen reward, rejected reward] summed over the pairs (for a step or a set)."""
        return [
            float(self.loss.detach().sum()),
            float(self.preferred.sum()),
            float(self.chosen_reward.detach().sum()),
            float(self.rejected_reward.detach().sum()),
        ]


def pair_figures(logps: torch.Tensor, pairs: PairBatch, beta: float) -> PairFigures:
    """From the sequence log-probabilities of a micro-batch (chosen, rejected, chosen, ...)."""
    ref_chosen, ref_rejected = pairs.references(logps.device)
    chosen = beta * (logps[0::2] - ref_chosen)
    rejected = beta * (logps[1::2] - ref_rejected)
    return PairFigures(-F.logsigmoid(chosen - rejected), chosen, rejected)


def figures_by_name(sums: list[float], n_pairs: int) -> dict[str, float]:
    """The metric-row figures beyond loss and accuracy, from `PairFigures.sums` totals."""
    chosen, rejected = sums[2] / n_pairs, sums[3] / n_pairs
    return {"rewards_chosen": chosen, "rewards_rejected": rejected, "reward_margin": chosen - rejected}


def _scored(
    model: PeftModel,
    pairs: list[PreferencePair],
    max_seq_length: int,
    pad_id: int,
    device: torch.device,
    micro_batch_tokens: int,
) -> Iterator[tuple[PairBatch, torch.Tensor]]:
    """Each micro-batch of `pairs` with its sequences' log-probabilities (chosen, rejected, chosen, ...), scored in
    eval mode without gradients: what references, validation and the per-pair report all start from."""
    with scoring(model, device):
        for pb in pair_micro_batches(pairs, max_seq_length, pad_id, micro_batch_tokens):
            pb = pb.to(device)
            yield pb, sequence_logps(model, pb.batch, pb.sequence_ids, 2 * len(pb.pairs))


def compute_references(
    model: PeftModel,
    pairs: list[PreferencePair],
    max_seq_length: int,
    pad_id: int,
    group: DeviceGroup,
    micro_batch_tokens: int,
    *,
    adapter_disabled: bool,
) -> None:
    """Set every pair's `reference` from the model as it is now (`adapter_disabled`: the base alone). Each rank
    scores its slice and the slices are summed, so every rank ends with them all."""
    index = {id(p): i for i, p in enumerate(pairs)}
    values = [0.0] * (2 * len(pairs))
    mine = group.shard(pairs)
    with model.disable_adapter() if adapter_disabled else contextlib.nullcontext():
        for pb, logps in _scored(model, mine, max_seq_length, pad_id, group.device, micro_batch_tokens):
            for k, (chosen, rejected) in enumerate(logps.view(-1, 2).tolist()):
                i = index[id(pb.pairs[k])]
                values[2 * i : 2 * i + 2] = chosen, rejected
    values = group.sum(values)
    for i, pair in enumerate(pairs):
        pair.reference = (values[2 * i], values[2 * i + 1])


def dpo_step(
    step_module: torch.nn.Module,
    group: DeviceGroup,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainable: list[torch.nn.Parameter],
    batch: list[PreferencePair],
    beta: float,
    max_seq_length: int,
    max_grad_norm: float,
    pad_id: int,
    micro_batch_tokens: int,
) -> StepFigures:
    """One optimizer step over `batch` pairs: the gradient of their mean DPO loss, accumulated over micro-batches
    and ranks as the supervised step does (a rank with no pair runs the shortest one at weight 0)."""
    mine = group.share(batch)
    weight = 1.0 if mine else 0.0
    micro_batches = pair_micro_batches(mine or [min(batch, key=len)], max_seq_length, pad_id, micro_batch_tokens)
    totals = [0.0] * 4
    n_tokens = 0
    for i, pb in enumerate(micro_batches):
        pb = pb.to(group.device)
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else group.no_sync(step_module):
            with autocast(group.device):
                logps = step_module(pb.batch, pb.sequence_ids, 2 * len(pb.pairs))
            figures = pair_figures(logps, pb, beta)
            (figures.loss.sum() * weight * group.size / len(batch)).backward()
        totals = [t + weight * v for t, v in zip(totals, figures.sums(), strict=True)]
        n_tokens += int(weight * pb.batch.n_tokens)
    *sums, tokens = group.sum([*totals, n_tokens])
    mean_loss = sums[0] / len(batch)
    grad_norm = apply_update(mean_loss, trainable, optimizer, scheduler, max_grad_norm)
    n_supervised = sum(p.n_supervised for p in batch)
    return StepFigures(
        mean_loss, sums[1] / len(batch), grad_norm, int(tokens), n_supervised, figures_by_name(sums, len(batch))
    )


def evaluate_pairs(
    model: PeftModel,
    pairs: list[PreferencePair],
    beta: float,
    max_seq_length: int,
    pad_id: int,
    group: DeviceGroup,
    micro_batch_tokens: int,
) -> tuple[float, float]:
    """Mean DPO loss and reward accuracy over `pairs` (each rank scores its slice)."""
    totals = [0.0] * 4
    for pb, logps in _scored(model, group.shard(pairs), max_seq_length, pad_id, group.device, micro_batch_tokens):
        totals = [t + v for t, v in zip(totals, pair_figures(logps, pb, beta).sums(), strict=True)]
    sums = group.sum(totals)
    return sums[0] / len(pairs), sums[1] / len(pairs)


@dataclass
class PairScore:
    """One training pair as the trained model sees it. `wrong`: it still does not prefer the chosen answer."""

    line: int
    loss: float
    reward_margin: float
    chosen_reward: float
    rejected_reward: float
    wrong: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_pairs(
    model: PeftModel,
    pairs: list[PreferencePair],
    beta: float,
    max_seq_length: int,
    pad_id: int,
    device: torch.device,
    micro_batch_tokens: int,
) -> list[PairScore]:
    """Every pair's DPO loss and rewards under the trained model, worst (highest loss) first."""
    scores: list[PairScore] = []
    for pb, logps in _scored(model, pairs, max_seq_length, pad_id, device, micro_batch_tokens):
        figures = pair_figures(logps, pb, beta)
        for k, pair in enumerate(pb.pairs):
            chosen, rejected = float(figures.chosen_reward[k]), float(figures.rejected_reward[k])
            loss = float(figures.loss[k])
            scores.append(PairScore(pair.line, loss, chosen - rejected, chosen, rejected, chosen <= rejected))
    return sorted(scores, key=lambda s: -s.loss)
