"""The intra-op thread policy of CPU forwards: small ones (a small model's decode steps) on one thread, where waking
a second costs more than it saves; large ones (prefills, and every forward of a model of real size) on all."""

from __future__ import annotations

import torch

from app.inference.runtime import SINGLE_THREAD_MACS, BaseModelRuntime


def test_small_forwards_run_on_one_thread_and_large_ones_on_all(registry):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runtime = BaseModelRuntime(registry.resolve("tuneserve-tiny"), device=torch.device("cpu"), dtype=torch.float32)
        threads_during: list[int] = []
        runtime.model.register_forward_pre_hook(lambda module, args: threads_during.append(torch.get_num_threads()))
        widest = max(layer.base.in_features * layer.base.out_features for layer in runtime.lora.layers.values())
        small = SINGLE_THREAD_MACS // widest // 2  # tokens
        large = SINGLE_THREAD_MACS // widest + 1
        for tokens in (small, large):
            ids = torch.ones(1, tokens, dtype=torch.long)
            runtime.forward(runtime.new_cache(), input_ids=ids, attention_mask=torch.ones_like(ids))
            assert torch.get_num_threads() == 2  # restored after each
        assert threads_during == [1, 2]
    finally:
        torch.set_num_threads(before)
