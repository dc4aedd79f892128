"""Per-example attention for packed rows: each example attends only to itself, computed only for itself.

Two implementations, chosen per device by worker.training.loop.default_attention:

`SEGMENT_ATTENTION` (CPU). With the standard SDPA path, a packed row of T tokens gets a dense T x T
block-diagonal mask, so attention costs T^2 however short the examples are and the kernel cannot skip the causal
upper half. Here each example's slice runs its own causal SDPA call, costing the sum of n_i^2 / 2. The row's
segment boundaries arrive as the `segments` keyword argument, which transformers passes through the decoder
layers to the attention function. Registered as an attention implementation, and not as a mask implementation,
so transformers builds no mask at all. For training only: without `segments` it is plain causal SDPA with no
padding mask, so a model loaded with this implementation must not be used for padded batched generation.

`PACKED_FLASH_ATTENTION` (CUDA with the `flash_attn` package). All rows of a micro-batch are flattened into one
ragged batch and FlashAttention's varlen kernel runs once per layer, with the example boundaries (cu_seqlens)
read from the position ids, which restart at 0 for every example and for a row's padding tail. transformers'
own "flash_attention_2" finds packed examples from the position ids only when a micro-batch has a single row;
with several rows it would let packed examples attend to each other, which this implementation never does.
Training only, like the segment implementation: no padding mask, no KV cache.

On CUDA without `flash_attn` training uses transformers' "sdpa", which builds the block-diagonal mask from the
same position ids.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SEGMENT_ATTENTION = "tuneserve_segments"
PACKED_FLASH_ATTENTION = "tuneserve_packed_varlen"  # no "flash" in the name: transformers reads that as a hub kernel


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


@lru_cache(maxsize=1)
def flash_attention_available() -> bool:
    """Whether FlashAttention 2's varlen kernel can be imported (an installed but broken build counts as absent)."""
    try:
        return callable(getattr(importlib.import_module("flash_attn"), "flash_attn_varlen_func", None))
    except Exception:  # an ImportError, or a build that does not match this torch
        return False


def flash_varlen_function() -> Callable[..., torch.Tensor]:
    """`flash_attn.flash_attn_varlen_func` (a seam: tests on CPU substitute a reference with its signature)."""
    function: Callable[..., torch.Tensor] = importlib.import_module("flash_attn").flash_attn_varlen_func
    return function


# What FlashAttention computes in; other inputs run in bf16.
FLASH_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)

# The boundaries are the same for every layer of one forward pass: computed once per position-ids tensor.
_boundaries_cache: tuple[torch.Tensor, tuple[int, int], torch.Tensor, int] | None = None


def sequence_boundaries(position_ids: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, longest sequence) of the flattened [rows * width] batch: a sequence starts at each row's
    first token and wherever a position does not follow its predecessor by one (a packed example, or the padding
    tail, restarts at 0). cu_seqlens is int32 on the positions' device, as FlashAttention takes it."""
    global _boundaries_cache
    cached = _boundaries_cache
    if cached is not None and cached[0] is position_ids and cached[1] == (rows, width):
        return cached[2], cached[3]
    positions = position_ids.expand(rows, width)
    starts = torch.ones((rows, width), dtype=torch.bool, device=positions.device)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    offsets = starts.reshape(-1).nonzero().flatten()
    end = torch.tensor([rows * width], device=offsets.device, dtype=offsets.dtype)
    cu_seqlens = torch.cat([offsets, end]).to(torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    _boundaries_cache = (position_ids, (rows, width), cu_seqlens, longest)
    return cu_seqlens, longest


def boundaries_from_segments(segments: list[list[int]], width: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, longest sequence) from per-row segment bounds (0, end_1, ..., width), without a device sync."""
    offsets = [r * width + b for r, bounds in enumerate(segments) for b in bounds[:-1]] + [len(segments) * width]
    longest = max(b - a for bounds in segments for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return torch.tensor(offsets, dtype=torch.int32, device=device), longest


def packed_flash_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_ids: torch.Tensor | None = None,
    segments: list[list[int]] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [rows, heads, T, dim], key/value [rows, kv_heads, T, dim] -> [rows, T, heads, dim]: causal attention
    within each sequence of the flattened rows, the sequences taken from `segments` if given, else from
    `position_ids`, else one per row. FlashAttention takes fp16/bf16 only: fp32 inputs run in bf16 and the
    output comes back in fp32."""
    rows, heads, width, dim = query.shape
    if segments is not None:
        cu_seqlens, longest = boundaries_from_segments(segments, width, query.device)
    elif position_ids is not None:
        cu_seqlens, longest = sequence_boundaries(position_ids, rows, width)
    else:
        cu_seqlens = torch.arange(0, (rows + 1) * width, width, dtype=torch.int32, device=query.device)
        longest = width
    out_dtype = query.dtype
    compute_dtype = out_dtype if out_dtype in FLASH_DTYPES else torch.bfloat16

    def flat(t: torch.Tensor) -> torch.Tensor:  # [rows, h, T, d] -> [rows * T, h, d]
        return t.transpose(1, 2).reshape(rows * width, t.shape[1], dim).to(compute_dtype)

    options: dict[str, Any] = {"dropout_p": dropout, "softmax_scale": scaling, "causal": True}
    if sliding_window is not None:
        options["window_size"] = (sliding_window - 1, 0)
    if softcap is not None:
        options["softcap"] = softcap
    out = flash_varlen_function()(
        flat(query), flat(key), flat(value), cu_seqlens, cu_seqlens, longest, longest, **options
    )
    return out.view(rows, width, heads, dim).to(out_dtype), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention_forward)
AttentionInterface.register(PACKED_FLASH_ATTENTION, packed_flash_attention_forward)
