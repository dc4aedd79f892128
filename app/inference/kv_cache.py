"""A KV cache that appends in place.

transformers' `DynamicLayer` appends a step's keys and values with `torch.cat`, which copies the layer's whole cache
at every decode step: O(length) bytes per token, O(length^2) per completion, and a fresh cache-sized allocation per
layer per step. `GrowingLayer` keeps keys and values as views of buffers with room to spare: a step writes its
positions in place, and a full buffer is replaced by one half as large again (amortised O(1) copies per token, at
most about 1.5 x the memory).

`KVBatch` replaces a layer's `keys` and `values` outright when rows join, finish or lose their padding; the next
update sees they are no longer views of the buffers and starts new buffers from them.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Room a new buffer leaves beyond what it must hold: half as much again, and at least this many positions.
MIN_HEADROOM = 32


class GrowingLayer(DynamicLayer):
    """One decoder layer's cache, [rows, heads, positions, dim], appended in place."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        total = length + key_states.shape[-2]
        buffers = self._buffers
        if buffers is None or not (
            _is_prefix(self.keys, buffers[0], total) and _is_prefix(self.values, buffers[1], total)
        ):
            capacity = total + max(total // 2, MIN_HEADROOM)
            buffers = (
                _buffer(self.keys, key_states, length, capacity),
                _buffer(self.values, value_states, length, capacity),
            )
            self._buffers = buffers
        keys, values = buffers
        keys[:, :, length:total].copy_(key_states)
        values[:, :, length:total].copy_(value_states)
        self.keys, self.values = keys[:, :, :total], values[:, :, :total]
        return self.keys, self.values


def _is_prefix(view: torch.Tensor | None, buffer: torch.Tensor, total: int) -> bool:
    """Whether `view` is the buffer's first positions, with room in it for `total`."""
    return (
        view is not None
        and view.dim() == 4
        and view.data_ptr() == buffer.data_ptr()
        and view.stride() == buffer.stride()
        and view.shape[:2] == buffer.shape[:2]
        and total <= buffer.shape[2]
    )


def _buffer(cached: torch.Tensor | None, new: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    """A buffer of `capacity` positions shaped like `new`, starting with the `length` cached positions."""
    rows, heads, _, dim = new.shape
    buffer = new.new_empty(rows, heads, capacity, dim)
    if length and cached is not None:
        buffer[:, :, :length].copy_(cached)
    return buffer


class GrowingCache(DynamicCache):
    """A `DynamicCache` whose layers are `GrowingLayer`s, made as the model first writes to them."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer
