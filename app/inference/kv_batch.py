"""The KV cache of the running rows, left-padded so rows of different lengths decode in one forward.

New requests are prefilled together (left-padded, masked) and their cache is then joined to the batch: the
shorter side gets zero keys/values on the left, masked out by the attention mask. Every row passes its own
`position_ids`, so padding never shifts a position. Rows that finish are dropped with `index_select`, and columns
that became padding for every row are cut, so the cache tracks the longest live row rather than the longest row
ever seen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, cast

import torch

if TYPE_CHECKING:
    from transformers import DynamicCache

    from app.inference.runtime import BaseModelRuntime


class KVLayer(Protocol):
    """One decoder layer's cache once prefilled: keys and values [rows, heads, T, dim]."""

    keys: torch.Tensor
    values: torch.Tensor


def kv_layers(cache: DynamicCache) -> list[KVLayer]:
    """The layers of a prefilled cache. transformers declares them as any cache layer kind, linear attention and
    not-yet-filled layers included; a prefilled cache of the decoder-only models served here holds tensors."""
    return cast("list[KVLayer]", cache.layers)


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return t
    shape = list(t.shape)
    shape[dim] = width
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class KVBatch:
    def __init__(self) -> None:
        self.cache: DynamicCache | None = None  # its layers hold [rows, heads, T, dim] tensors
        self.mask: torch.Tensor | None = None  # [rows, T], 1 where a real token is

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def add(self, row_cache: DynamicCache, row_mask: torch.Tensor) -> None:
        """Append prefilled rows: their cache and attention mask [rows, length] (0 on their left padding)."""
        length = row_mask.shape[1]
        cache, own_mask = self.cache, self.mask
        if cache is None or own_mask is None:  # both or neither
            self.cache, self.mask = row_cache, row_mask
            return
        width = own_mask.shape[1]
        total = max(width, length)
        for mine, theirs in zip(kv_layers(cache), kv_layers(row_cache), strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, total - width, 2), _left_pad(theirs.keys, total - length, 2)])
            mine.values = torch.cat(
                [_left_pad(mine.values, total - width, 2), _left_pad(theirs.values, total - length, 2)]
            )
        self.mask = torch.cat([_left_pad(own_mask, total - width, 1), _left_pad(row_mask, total - length, 1)])

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at `indices` (in that order)."""
        cache, own_mask = self.cache, self.mask
        if not indices or cache is None or own_mask is None:  # no rows left (there are none without a cache)
            self.cache = self.mask = None
            return
        if indices == list(range(self.rows)):
            return
        index = torch.tensor(indices, dtype=torch.long, device=own_mask.device)
        mask = own_mask.index_select(0, index)
        start = int(torch.nonzero(mask.sum(0))[0])  # first column some row still uses
        self.mask = mask[:, start:]
        for layer in kv_layers(cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def decode(self, runtime: BaseModelRuntime, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step for every row: tokens and positions are [rows, 1]; returns float32 logits [rows, vocab]."""
        if self.cache is None or self.mask is None:
            raise RuntimeError("decode needs running rows")
        mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        logits = runtime.next_token_logits(self.cache, input_ids=tokens, attention_mask=mask, position_ids=positions)
        self.mask = mask
        return logits
