"""Preference data for DPO: each example's preferred and non-preferred answers, tokenized as chat examples that
supervise only that answer, and micro-batches that pack a pair's two sequences side by side in one row, so a pair
is never split between micro-batches, ranks or steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from app.datasets.examples import preference_conversations
from worker.training.data import TokenizedDataset, TokenizedExample, fit_example, read_jsonl, render_example
from worker.training.packing import MicroBatch, best_fit_decreasing, collate_packed, group_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class PreferencePair:
    chosen: TokenizedExample  # the preferred answer after the conversation
    rejected: TokenizedExample  # the non-preferred one
    line: int
    # The reference model's summed log-probabilities of (chosen, rejected): set once, before the first step.
    reference: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def n_supervised(self) -> int:
        return self.chosen.n_supervised + self.rejected.n_supervised


def load_preference_dataset(
    path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_length: int, policy: str, *, param: str
) -> TokenizedDataset[PreferencePair]:
    """Every pair whose two sequences each fit `max_seq_length` (under `policy`, applied to the pair) and supervise
    a token."""
    numbered = read_jsonl(path, param=param, preference=True)
    out: TokenizedDataset[PreferencePair] = TokenizedDataset(n_read=len(numbered))
    for line, example in numbered:
        rendered = [render_example(conversation, tokenizer) for conversation in preference_conversations(example)]
        # Both sequences start with the same conversation: over-long, they are cut by the same number of its tokens
        # (or dropped together), so each answer still follows the same prompt.
        over = max(0, max(len(ids) for ids, _ in rendered) - max_seq_length)
        chosen, rejected = (
            fit_example(ids, labels, len(ids) - over, policy, tokenizer.bos_token_id, line) for ids, labels in rendered
        )
        if out.count(chosen, rejected) and chosen.example is not None and rejected.example is not None:
            out.examples.append(PreferencePair(chosen.example, rejected.example, line))
    return out


@dataclass
class PairBatch:
    """Pairs packed into rows: sequence 2k is pair k's chosen answer, 2k + 1 its rejected one."""

    batch: MicroBatch
    pairs: list[PreferencePair]
    sequence_ids: torch.Tensor  # [rows, T]: the sequence each position belongs to (-1 for padding)

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.batch.to(device), self.pairs, self.sequence_ids.to(device))

    def references(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference log-probabilities of the chosen and of the rejected answers, [pairs] each."""
        if any(p.reference is None for p in self.pairs):
            raise RuntimeError("reference log-probabilities are computed before training on a pair")
        values = torch.tensor([p.reference for p in self.pairs], dtype=torch.float32, device=device)
        return values[:, 0], values[:, 1]


def pair_micro_batches(
    pairs: list[PreferencePair], max_seq_length: int, pad_id: int, micro_batch_tokens: int
) -> list[PairBatch]:
    """Pairs packed best-fit into rows of up to two `max_seq_length` sequences' width (a pair always fits one
    row), rows grouped into micro-batches of about `micro_batch_tokens`."""
    bins = best_fit_decreasing([len(p) for p in pairs], 2 * max_seq_length)
    widths = [sum(len(pairs[i]) for i in b) for b in bins]
    out = []
    for group in group_rows(widths, None, micro_batch_tokens):
        rows = [[pairs[i] for i in bins[j]] for j in group]
        batch = collate_packed([[s for p in row for s in (p.chosen, p.rejected)] for row in rows], pad_id)
        sequence_ids = torch.full(batch.input_ids.shape, -1, dtype=torch.long)
        first = 0
        for r, row in enumerate(rows):
            bounds = batch.segments[r]
            for k in range(2 * len(row)):
                sequence_ids[r, bounds[k] : bounds[k + 1]] = first + k
            first += 2 * len(row)
        out.append(PairBatch(batch, [p for row in rows for p in row], sequence_ids))
    return out
