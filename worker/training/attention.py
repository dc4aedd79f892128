"""Per-example attention for packed rows: each example attends only to itself, computed only for itself.

With the standard SDPA path, a packed row of T tokens gets a dense T x T block-diagonal mask, so attention
costs T^2 however short the examples are and the kernel cannot skip the causal upper half. Here each example's
slice runs its own causal SDPA call, costing the sum of n_i^2 / 2. The row's segment boundaries arrive as the
`segments` keyword argument, which transformers passes through the decoder layers to the attention function.
Registered as an attention implementation, and not as a mask implementation, so transformers builds no mask
at all. For training only: without `segments` it is plain causal SDPA with no padding mask, so a model
loaded with this implementation must not be used for padded batched generation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SEGMENT_ATTENTION = "tuneserve_segments"


def segment_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segments: list[list[int]] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [rows, heads, T, dim], key/value [rows, kv_heads, T, dim]; `segments[r]` are the boundaries
    (0, end_1, end_2, ..., T) of the examples in row r. Returns [rows, T, heads, dim] like SDPA's wrapper."""
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for r, bounds in enumerate(segments):
        parts = [
            F.scaled_dot_product_attention(
                query[r : r + 1, :, start:end],
                key[r : r + 1, :, start:end],
                value[r : r + 1, :, start:end],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for start, end in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention_forward)
