"""A KV cache that appends in place.

transformers' `DynamicLayer` appends a step's keys and values with `torch.cat`, which copies the layer's whole cache
at every decode step: O(length) bytes per token, O(length^2) per completion, and a fresh cache-sized allocation per
layer per step. `GrowingLayer` keeps keys and values as views of buffers with room to spare: a step writes its
positions in place, and a full buffer is replaced by one half as large again (amortised O(1) copies per token, at
most about 1.5 x the memory).

`KVBatch` replaces a layer's `keys` and `values` outright when rows join, finish or lose their padding: the layer
lets its buffers go then, and the next update starts new ones from the tensors it was given.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Room a new buffer leaves beyond what it must hold: half as much again, and at least this many positions.
MIN_HEADROOM = 32


class GrowingLayer(DynamicLayer):
    """One decoder layer's cache, [rows, heads, positions, dim], appended in place."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None
    _keys: torch.Tensor | None = None
    _values: torch.Tensor | None = None

    # `keys` and `values` assigned from outside (KVBatch, or transformers' crop and row selection) let the buffers go
    # at once, so a replaced cache is not held until the next step; `update` writes its views past the setters.
    @property
    def keys(self) -> torch.Tensor | None:
        return self._keys

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._keys, self._buffers = value, None

    @property
    def values(self) -> torch.Tensor | None:
        return self._values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._values, self._buffers = value, None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        total = length + key_states.shape[-2]
        buffers = self._buffers
        if buffers is None or total > buffers[0].shape[2]:
            capacity = total + max(total // 2, MIN_HEADROOM)
            buffers = (
                _buffer(self._keys, key_states, length, capacity),
                _buffer(self._values, value_states, length, capacity),
            )
        keys, values = buffers
        keys[:, :, length:total].copy_(key_states)
        values[:, :, length:total].copy_(value_states)
        self._keys, self._values, self._buffers = keys[:, :, :total], values[:, :, :total], buffers
        return keys[:, :, :total], values[:, :, :total]


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
