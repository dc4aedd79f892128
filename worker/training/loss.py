"""Summed next-token loss over supervised positions only, with the LM head computed only there.

Running the decoder alone and applying the LM head to the supervised hidden states avoids the
[tokens x vocab] logits tensor of a plain `model(..., labels=...)` call: prompt tokens (often most of a
chat example) never reach the head. With a large vocabulary the head runs in chunks under activation
checkpointing, so at most one chunk of logits is alive at a time, in forward and in backward.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from app.ml.chat import IGNORE_INDEX
from worker.training.attention import SEGMENT_ATTENTION
from worker.training.packing import MicroBatch

# Logits elements per chunk (2^24 fp32 = 64 MiB): small datasets with small vocabularies use one chunk.
LOGITS_CHUNK_ELEMENTS = 1 << 24


def unwrap_causal_lm(model: PeftModel | PreTrainedModel) -> PreTrainedModel:
    """The transformers *ForCausalLM under a PEFT wrapper (LoRA layers stay injected in it)."""
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    if not isinstance(causal_lm, PreTrainedModel):
        raise TypeError(f"expected a transformers model under the adapter, got {type(causal_lm).__name__}")
    return causal_lm


def _chunk_sums(
    lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = lm_head(hidden).float()
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.detach().argmax(-1) == targets).sum()
    return loss, correct


def _supervised_hidden(
    model: PeftModel | PreTrainedModel,
    batch: MicroBatch,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    use_cache: bool = False,
    segments: list[list[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """The decoder's hidden states at the batch's supervised positions, their targets, the mask of those
    positions [rows, T], and the LM head (not yet applied)."""
    causal_lm = unwrap_causal_lm(model)
    decoder = causal_lm.base_model  # e.g. LlamaModel: the transformer without the LM head (and its config)
    lm_head = cast(torch.nn.Linear, causal_lm.get_output_embeddings())
    extra = {}
    if causal_lm.config._attn_implementation == SEGMENT_ATTENTION:
        extra["segments"] = batch.segments if segments is None else segments
    outputs = decoder(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask if attention_mask is None else attention_mask,
        position_ids=batch.position_ids if position_ids is None else position_ids,
        use_cache=use_cache,
        **extra,
    )
    selected = batch.targets != IGNORE_INDEX
    return outputs.last_hidden_state[selected], batch.targets[selected], selected, lm_head


def loss_sums(
    model: PeftModel | PreTrainedModel,
    batch: MicroBatch,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    use_cache: bool = False,
    segments: list[list[int]] | None = None,
    chunk_elements: int = LOGITS_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of correct argmax predictions) over the batch's supervised targets.

    `attention_mask`, `position_ids` and `use_cache` default to the batch's own (packed: no mask, restarting
    positions, no cache, and with the segment attention implementation the batch's segments); the overrides
    exist so tests can reproduce the known packing mistakes.
    """
    hidden, targets, _, lm_head = _supervised_hidden(model, batch, attention_mask, position_ids, use_cache, segments)
    n, vocab = hidden.shape[0], lm_head.weight.shape[0]
    chunk = max(1, chunk_elements // vocab)
    if n <= chunk:
        return _chunk_sums(lm_head, hidden, targets)
    loss = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, n, chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():
            part_loss, part_correct = checkpoint(_chunk_sums, lm_head, h, t, use_reentrant=False)
        else:
            part_loss, part_correct = _chunk_sums(lm_head, h, t)
        loss = loss + part_loss
        correct = correct + part_correct
    return loss, correct


@torch.no_grad()
def token_losses(
    model: PeftModel | PreTrainedModel, batch: MicroBatch, *, chunk_elements: int = LOGITS_CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position [rows, T]: the cross-entropy of its target and whether the argmax predicted it (0 and False
    where nothing is supervised), as `loss_sums` counts them; for reports on single examples."""
    hidden, targets, selected, lm_head = _supervised_hidden(model, batch)
    chunk = max(1, chunk_elements // lm_head.weight.shape[0])
    losses, correct = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = lm_head(hidden[start : start + chunk]).float()
        t = targets[start : start + chunk]
        losses.append(F.cross_entropy(logits, t, reduction="none"))
        correct.append(logits.argmax(-1) == t)
    loss_grid = torch.zeros(selected.shape, dtype=torch.float32, device=hidden.device)
    correct_grid = torch.zeros(selected.shape, dtype=torch.bool, device=hidden.device)
    if losses:
        loss_grid[selected] = torch.cat(losses)
        correct_grid[selected] = torch.cat(correct)
    return loss_grid, correct_grid


def _token_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(lm_head(hidden).float(), targets, reduction="none")


def sequence_logps(
    model: PeftModel | PreTrainedModel,
    batch: MicroBatch,
    sequence_ids: torch.Tensor,
    n_sequences: int,
    *,
    chunk_elements: int = LOGITS_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """[n_sequences]: each sequence's summed log-probability of its supervised targets (DPO's log p(answer |
    prompt)), where `sequence_ids` [rows, T] says which sequence each position belongs to. Differentiable; the
    LM head runs on supervised positions only, chunked as in `loss_sums`."""
    hidden, targets, selected, lm_head = _supervised_hidden(model, batch)
    owners = sequence_ids.to(hidden.device)[selected]
    chunk = max(1, chunk_elements // lm_head.weight.shape[0])
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and hidden.shape[0] > chunk:
            parts.append(checkpoint(_token_logps, lm_head, h, t, use_reentrant=False))
        else:
            parts.append(_token_logps(lm_head, h, t))
    sums = hidden.new_zeros(n_sequences, dtype=torch.float32)
    return sums.index_add(0, owners, torch.cat(parts)) if parts else sums
