"""What a job trains for, by method: the data it reads, its optimizer step, how it is validated and how each training
example is scored at the end. The loop (worker/training/loop.py) is the same for every method; it asks its
objective (`objective_for(spec)`) for these."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from app.jobs.spec import TrainingSpec
from worker.training.data import TokenizedDataset, TokenizedExample, load_dataset
from worker.training.devices import DeviceGroup
from worker.training.dpo import PairScore, compute_references, dpo_step, evaluate_pairs, score_pairs
from worker.training.errors import TrainingError
from worker.training.evaluation import ExampleScore, evaluate, score_examples
from worker.training.loss import loss_sums, sequence_logps
from worker.training.preference import PreferencePair, load_preference_dataset
from worker.training.step import StepFigures, micro_batch_tokens, optimizer_step, scoring_micro_batch_tokens


class _Base:
    forward: Callable[..., Any]  # the micro-batch forward: `forward(model, batch, ...)`

    def __init__(self, spec: TrainingSpec, tokenizer: PreTrainedTokenizerBase, group: DeviceGroup, pad_id: int):
        self.spec, self.tokenizer, self.group, self.pad_id = spec, tokenizer, group, pad_id
        self.micro_batch_tokens = micro_batch_tokens(spec, group.device)  # of a training step
        self.scoring_tokens = scoring_micro_batch_tokens(spec, group.device)  # of a forward without backward

    def wrap(self, model: PeftModel) -> torch.nn.Module:
        """The module whose forward the step calls per micro-batch (DDP-wrapped in a group of ranks)."""
        return self.group.wrap(model, self.forward)


class Supervised(_Base):
    """Next-token cross-entropy on the answers' tokens; accuracy is that of the argmax prediction."""

    accuracy_name = "mean_token_accuracy"  # metric rows say train_<this>, valid_<this>, full_valid_<this>
    forward = staticmethod(loss_sums)

    def load(self, path: Path, param: str) -> TokenizedDataset[TokenizedExample]:
        spec = self.spec
        return load_dataset(path, self.tokenizer, spec.max_seq_length, spec.long_example_policy, param=param)

    def prepare(self, model: PeftModel, examples: list[TokenizedExample], saved: Any, *, from_adapter: bool) -> None:
        """Before the first step, or (`saved`: the checkpoint's `state()`) before a resumed run's: nothing."""

    def state(self, examples: list[TokenizedExample]) -> Any:
        return None

    def step(
        self,
        step_module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        trainable: list[torch.nn.Parameter],
        batch: list[TokenizedExample],
    ) -> StepFigures:
        return optimizer_step(step_module, self.group, optimizer, scheduler, trainable, batch, self.spec, self.pad_id)

    def evaluate(self, model: PeftModel, examples: list[TokenizedExample]) -> tuple[float, float]:
        return evaluate(model, examples, self.spec, self.pad_id, self.group, self.scoring_tokens)

    def score(self, model: PeftModel, examples: list[TokenizedExample]) -> list[ExampleScore]:
        device, length = self.group.device, self.spec.max_seq_length
        return score_examples(model, examples, length, self.pad_id, device, self.scoring_tokens)


class Dpo(_Base):
    """Preference pairs under DPO (worker/training/dpo.py); accuracy is the share of pairs whose chosen answer has
    the higher reward."""

    accuracy_name = "reward_accuracy"
    forward = staticmethod(sequence_logps)

    @property
    def beta(self) -> float:
        if self.spec.beta is None:
            raise ValueError("a dpo spec has its beta resolved")
        return self.spec.beta

    def load(self, path: Path, param: str) -> TokenizedDataset[PreferencePair]:
        spec = self.spec
        return load_preference_dataset(path, self.tokenizer, spec.max_seq_length, spec.long_example_policy, param=param)

    def prepare(self, model: PeftModel, examples: list[PreferencePair], saved: Any, *, from_adapter: bool) -> None:
        """The reference log-probabilities: the checkpoint's, or computed now from the starting weights (the base
        alone unless the job continues from an adapter)."""
        if saved is not None:
            if len(saved) != len(examples):
                raise TrainingError("checkpoint_mismatch", "the checkpoint was written for a different dataset")
            for pair, (chosen, rejected) in zip(examples, saved, strict=True):
                pair.reference = (chosen, rejected)
            return
        length, tokens = self.spec.max_seq_length, self.scoring_tokens
        compute_references(model, examples, length, self.pad_id, self.group, tokens, adapter_disabled=not from_adapter)

    def state(self, examples: list[PreferencePair]) -> Any:
        return [pair.reference for pair in examples]

    def step(
        self,
        step_module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        trainable: list[torch.nn.Parameter],
        batch: list[PreferencePair],
    ) -> StepFigures:
        spec = self.spec
        return dpo_step(
            step_module, self.group, optimizer, scheduler, trainable, batch, self.beta,
            spec.max_seq_length, spec.max_grad_norm, self.pad_id, self.micro_batch_tokens,
        )  # fmt: skip

    def evaluate(self, model: PeftModel, examples: list[PreferencePair]) -> tuple[float, float]:
        length, tokens = self.spec.max_seq_length, self.scoring_tokens
        return evaluate_pairs(model, examples, self.beta, length, self.pad_id, self.group, tokens)

    def score(self, model: PeftModel, examples: list[PreferencePair]) -> list[PairScore]:
        length, tokens = self.spec.max_seq_length, self.scoring_tokens
        return score_pairs(model, examples, self.beta, length, self.pad_id, self.group.device, tokens)


Objective = Supervised | Dpo


def objective_for(spec: TrainingSpec, tokenizer: PreTrainedTokenizerBase, group: DeviceGroup, pad_id: int) -> Objective:
    return (Dpo if spec.method == "dpo" else Supervised)(spec, tokenizer, group, pad_id)
