"""The in-place KV cache holds exactly what transformers' DynamicCache holds, without copying the cache per step."""

from __future__ import annotations

import gc
import weakref

import torch
from transformers import DynamicCache

from app.inference.kv_cache import GrowingCache


def states(rows: int, positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, 2, positions, 8, generator=generator),
        torch.randn(rows, 2, positions, 8, generator=generator),
    )


def test_appends_equal_dynamic_cache_and_reuse_the_buffer_until_it_is_full():
    growing, dynamic = GrowingCache(), DynamicCache()
    buffers: list[int] = []
    for step in range(80):  # a 5-position prefill, then one position per step, past two regrowths
        keys, values = states(3, 5 if step == 0 else 1, seed=step)
        for layer in (0, 1):
            got = growing.update(keys, values, layer)
            want = dynamic.update(keys, values, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        pointer = growing.layers[0].keys.data_ptr()
        if not buffers or buffers[-1] != pointer:
            buffers.append(pointer)
    assert growing.get_seq_length() == 84
    # 5 + 79 positions in three buffers (capacity 37, then 70, then 106): every other step wrote in place.
    assert len(buffers) == 3


def test_keys_replaced_from_outside_start_a_new_buffer_from_them():
    # KVBatch drops finished rows and trims padding columns by assigning new tensors to a layer.
    growing, dynamic = GrowingCache(), DynamicCache()
    for cache in (growing, dynamic):
        cache.update(*states(3, 6, seed=0), 0)
    for cache in (growing, dynamic):
        layer = cache.layers[0]
        index = torch.tensor([2, 0])
        layer.keys = layer.keys.index_select(0, index)[:, :, 1:]
        layer.values = layer.values.index_select(0, index)[:, :, 1:]
    for step in range(1, 4):
        keys, values = states(2, 1, seed=step)
        got, want = growing.update(keys, values, 0), dynamic.update(keys, values, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert growing.get_seq_length() == dynamic.get_seq_length() == 8


def test_row_prefixes_crops_and_resets_match_dynamic_cache():
    # Views that start where the buffer starts (the first rows, the first positions) must not pass for the buffer.
    growing, dynamic = GrowingCache(), DynamicCache()
    for cache in (growing, dynamic):
        cache.update(*states(3, 6, seed=0), 0)
        layer = cache.layers[0]
        layer.keys, layer.values = layer.keys[:2], layer.values[:2]
    for cache in (growing, dynamic):
        cache.update(*states(2, 1, seed=1), 0)
        cache.crop(-2)  # back to 5 positions, then overwrite the sixth
    for step in range(2, 5):
        keys, values = states(2, 1, seed=step)
        got, want = growing.update(keys, values, 0), dynamic.update(keys, values, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for cache in (growing, dynamic):
        cache.reset()
        cache.update(*states(1, 2, seed=9), 0)
    assert torch.equal(growing.layers[0].keys, dynamic.layers[0].keys)


def test_replaced_keys_let_the_buffers_go_at_once():
    cache = GrowingCache()
    cache.update(*states(3, 6, seed=0), 0)
    layer = cache.layers[0]
    buffers = [weakref.ref(layer.keys._base), weakref.ref(layer.values._base)]
    index = torch.tensor([0, 2])
    layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
    gc.collect()
    assert [ref() for ref in buffers] == [None, None]
