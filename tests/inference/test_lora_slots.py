"""One wrapped layer against the LoRA formula row by row: every form (single adapter, mixed prefill, mixed decode),
hidden states as [rows, positions, in] or flattened to [tokens, in] (as MoE blocks pass them), ranks below the
tables' padded rank, and base-model rows beside adapter rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.inference.lora_slots import LoraSlots

IN, OUT = 12, 10


class OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT, bias=True)
        self.head = nn.Linear(OUT, 3)  # the output embeddings: never wrapped

    def get_output_embeddings(self) -> nn.Module:
        return self.head


@pytest.fixture
def layer():
    torch.manual_seed(0)
    model = OneLayer()
    lora = LoraSlots(model)
    factors = {}
    with torch.inference_mode():
        for slot, rank in ((1, 2), (2, 5), (3, 3)):
            a, b = torch.randn(rank, IN), torch.randn(OUT, rank)
            lora.install(slot, rank, {"proj": (a, b)})
            factors[slot] = (a, b)
        lora.install(4, 8, {"proj": (torch.randn(8, IN), torch.randn(OUT, 8))})  # tables padded to rank 8
    return model, lora, factors


@pytest.mark.parametrize("positions", [1, 4])
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("slots", [[1, 1, 1], [2, 0, 1, 2, 2], [3, 1]])
def test_every_row_gets_its_own_adapter(layer, positions, flat, slots):
    model, lora, factors = layer
    x = torch.randn(len(slots), positions, IN)
    with torch.inference_mode():
        want = torch.stack(
            [
                model.proj.base(x[row]) + (x[row] @ factors[s][0].T @ factors[s][1].T if s else 0)
                for row, s in enumerate(slots)
            ]
        )
        for _ in range(2):  # the second pass reuses what the first gathered
            lora.use(slots)
            got = model.proj(x.reshape(-1, IN) if flat else x)
            torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)
