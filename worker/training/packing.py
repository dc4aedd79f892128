"""Step planning, best-fit-decreasing packing, and collation into model inputs.

Packed rows carry no attention mask: `position_ids` restart at 0 for every example and transformers derives
the block-diagonal (per example) mask from them. A 2-D attention mask, a KV cache, or positions that do not
restart would each let packed examples attend to one another; tests/training/test_packing.py checks that.
Padding at the end of a row gets its own positions (0, 1, ...), so it forms a separate block and is never
attended to by a real token; its targets are -100.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from app.ml.chat import IGNORE_INDEX
from worker.training.data import TokenizedExample


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [rows, T]
    position_ids: torch.Tensor  # [rows, T]
    targets: torch.Tensor  # [rows, T], already shifted; -100 where not supervised
    attention_mask: torch.Tensor | None  # only for padded (unpacked) batches
    n_tokens: int  # real tokens, padding excluded
    n_supervised: int
    # Per row, the boundaries (0, end_1, ..., width) of its examples (and of its padding tail), for
    # worker.training.attention's per-example attention.
    segments: list[list[int]]

    def to(self, device: torch.device) -> MicroBatch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return MicroBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.targets.to(device),
            mask,
            self.n_tokens,
            self.n_supervised,
            self.segments,
        )


def plan_epoch(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices for each optimizer step of one epoch: a seeded shuffle cut into `batch_size` groups.

    Seeded by (seed, epoch) alone, so a resumed run recomputes exactly the order it left off in.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_examples).tolist()
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of indices) of total length <= capacity: longest first, each into the fullest bin it fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), kept sorted
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"an example of {need} tokens does not fit a row of {capacity}")
        pos = bisect.bisect_left(free, (need, -1))
        if pos < len(free):
            remaining, b = free.pop(pos)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (remaining - need, b))
    return bins


def collate_packed(rows: list[list[TokenizedExample]], pad_id: int) -> MicroBatch:
    width = max(sum(len(e) for e in row) for row in rows)
    ids: list[list[int]] = []
    pos: list[list[int]] = []
    tgt: list[list[int]] = []
    segments: list[list[int]] = []
    n_tokens = n_sup = 0
    for row in rows:
        r_ids: list[int] = []
        r_pos: list[int] = []
        r_tgt: list[int] = []
        bounds = [0]
        for e in row:
            r_ids += e.input_ids
            r_pos += range(len(e))
            r_tgt += e.targets
            n_sup += e.n_supervised
            bounds.append(len(r_ids))
        n_tokens += len(r_ids)
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        pos.append(r_pos + list(range(pad)))
        tgt.append(r_tgt + [IGNORE_INDEX] * pad)
        segments.append(bounds + [width] if pad else bounds)
    return MicroBatch(torch.tensor(ids), torch.tensor(pos), torch.tensor(tgt), None, n_tokens, n_sup, segments)


def collate_padded(examples: list[TokenizedExample], pad_id: int, pad_to: int | None = None) -> MicroBatch:
    """One example per row, right-padded (to the longest, or to `pad_to`), with a 2-D attention mask."""
    width = max(pad_to or 0, max(len(e) for e in examples))
    ids, pos, tgt, mask = [], [], [], []
    for e in examples:
        pad = width - len(e)
        ids.append(e.input_ids + [pad_id] * pad)
        pos.append(list(range(width)))
        tgt.append(e.targets + [IGNORE_INDEX] * pad)
        mask.append([1] * len(e) + [0] * pad)
    return MicroBatch(
        torch.tensor(ids),
        torch.tensor(pos),
        torch.tensor(tgt),
        torch.tensor(mask),
        sum(len(e) for e in examples),
        sum(e.n_supervised for e in examples),
        [[0, len(e), width] if len(e) < width else [0, width] for e in examples],
    )


def group_rows(widths: list[int], micro_batch_size: int | None, micro_batch_tokens: int) -> list[list[int]]:
    """Consecutive groups: `micro_batch_size` items each, or as many as fit `micro_batch_tokens` when padded
    to the group's widest item."""
    if micro_batch_size:
        return [list(range(i, min(i + micro_batch_size, len(widths)))) for i in range(0, len(widths), micro_batch_size)]
    groups: list[list[int]] = []
    current: list[int] = []
    widest = 0
    for i, w in enumerate(widths):
        if current and (len(current) + 1) * max(widest, w) > micro_batch_tokens:
            groups.append(current)
            current, widest = [], 0
        current.append(i)
        widest = max(widest, w)
    if current:
        groups.append(current)
    return groups


def step_micro_batches(
    examples: list[TokenizedExample],
    *,
    packing: bool,
    max_seq_length: int,
    pad_id: int,
    micro_batch_size: int | None = None,
    micro_batch_tokens: int = 16384,
) -> list[MicroBatch]:
    """The micro-batches of one optimizer step (its examples packed into rows, or padded one per row)."""
    if packing:
        bins = best_fit_decreasing([len(e) for e in examples], max_seq_length)
        rows = [[examples[i] for i in b] for b in bins]
        widths = [sum(len(e) for e in row) for row in rows]
        groups = group_rows(widths, micro_batch_size, micro_batch_tokens)
        return [collate_packed([rows[i] for i in g], pad_id) for g in groups]
    widths = [len(e) for e in examples]
    groups = group_rows(widths, micro_batch_size, micro_batch_tokens)
    return [collate_padded([examples[i] for i in g], pad_id) for g in groups]
