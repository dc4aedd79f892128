"""Many LoRA adapters applied to one base model inside one batch.

Every linear layer of the decoder (all but the LM head) is wrapped once, when the base model loads. The base
matmul runs once for the whole batch; the LoRA delta of each row comes from its adapter's "slot" in per-layer
tables `A[slot] -> [r, in]`, `B[slot] -> [out, r]` (scale folded in). Slot 0 is the base model (all zeros).

Per forward the scheduler sets a `BatchPlan` (one slot per row):
- every row on slot 0: no LoRA work at all;
- every row on one adapter: two plain matmuls over the whole batch (the cheapest form);
- mixed: one gather of each row's factors and two batched matmuls (the BGMV form of Punica / S-LoRA), so the cost
  does not grow with the number of distinct adapters in the batch, unlike a loop over adapter groups.
Ranks differ between adapters: tables are zero-padded to the largest rank seen and each forward slices to the
largest rank in the batch; zero rows and columns add exact zeros, so padding changes no result.

Tables are only resized or written by the scheduler thread between forwards, never during one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class BatchPlan:
    """Which adapter slot each row of the next forward uses."""

    def __init__(self) -> None:
        self.single: int | None = 0  # the slot shared by every row, or None when rows differ
        self.slots: torch.Tensor | None = None  # [rows] slot ids when rows differ
        self.rank = 0  # largest rank among the rows' adapters
        # Bumped whenever the rows' slots or the tables change: layers reuse their gathered factors until then,
        # since a batch keeps its composition for many decode steps.
        self.version = 0
        self._last: list[int] | None = None

    def invalidate(self) -> None:
        self._last = None

    def set(self, slots: list[int], ranks: list[int], device: torch.device) -> None:
        if slots == self._last:
            return
        self._last = list(slots)
        self.version += 1
        self.rank = max(ranks[s] for s in slots)
        if len(set(slots)) == 1:
            self.single, self.slots = slots[0], None
        else:
            self.single, self.slots = None, torch.tensor(slots, dtype=torch.long, device=device)


class LoraSlotLinear(nn.Module):
    """A base `nn.Linear` plus per-row LoRA deltas read from slot tables."""

    def __init__(self, base: nn.Linear, plan: BatchPlan) -> None:
        super().__init__()
        self.base = base
        self.plan = plan
        self.lora_a: torch.Tensor | None = None  # [slots, r_max, in]
        self.lora_b: torch.Tensor | None = None  # [slots, out, r_max]
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (plan version, a^T, b^T) per row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        plan, lora_a, lora_b = self.plan, self.lora_a, self.lora_b
        if lora_a is None or lora_b is None or plan.single == 0 or plan.rank == 0:  # tables: both or neither
            return out
        r = plan.rank
        if plan.single is not None:
            a = lora_a[plan.single, :r]
            b = lora_b[plan.single, :, :r]
            return out + (x @ a.T) @ b.T
        rows = x.shape[0]
        if self._gathered is None or self._gathered[0] != plan.version:
            if plan.slots is None:
                raise RuntimeError("a plan whose rows differ has a slot per row")
            # Kept transposed and contiguous, as bmm reads them: on transposed views it copies them on every
            # call, which measured 2.5x the cost of the products themselves in a small model's decode step.
            a_t = lora_a.index_select(0, plan.slots)[:, :r].transpose(1, 2).contiguous()  # [rows, in, r]
            b_t = lora_b.index_select(0, plan.slots)[:, :, :r].transpose(1, 2).contiguous()  # [rows, r, out]
            self._gathered = (plan.version, a_t, b_t)
        _, a_t, b_t = self._gathered
        x3 = x.reshape(rows, -1, x.shape[-1])
        out3 = out.reshape(rows, -1, out.shape[-1])
        return torch.baddbmm(out3, torch.bmm(x3, a_t), b_t).view_as(out)


class LoraSlots:
    """The wrapped layers of one base model and their slot tables."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.plan = BatchPlan()
        self.layers: dict[str, LoraSlotLinear] = {}
        self.ranks: list[int] = [0]  # rank per slot; slot 0 is the base model
        self._rank_capacity = 0
        output = model.get_output_embeddings()
        targets = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not output
        ]
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = LoraSlotLinear(module, self.plan)
            setattr(parent, child, wrapped)
            self.layers[name] = wrapped
        first = next(iter(model.parameters()))
        self.device, self.dtype = first.device, first.dtype

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: (layer.base.in_features, layer.base.out_features) for name, layer in self.layers.items()}

    def use(self, slots: list[int]) -> None:
        """Set the adapter slot of each row for the next forward."""
        self.plan.set(slots, self.ranks, self.device)

    def install(self, slot: int, rank: int, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write an adapter's factors into `slot` (zeroing layers the adapter does not touch)."""
        self._grow(slot + 1, rank)
        self.plan.invalidate()  # a slot's content changes: gathered factors of the old content are stale
        while len(self.ranks) <= slot:
            self.ranks.append(0)
        self.ranks[slot] = rank
        for name, layer in self.layers.items():
            lora_a, lora_b = layer.lora_a, layer.lora_b
            if lora_a is None or lora_b is None:  # both or neither
                if name not in modules:
                    continue
                lora_a, lora_b = self._allocate(layer)
            lora_a[slot].zero_()
            lora_b[slot].zero_()
            if name in modules:
                a, b = modules[name]
                lora_a[slot, : a.shape[0]].copy_(a)
                lora_b[slot, :, : b.shape[1]].copy_(b)

    def _allocate(self, layer: LoraSlotLinear) -> tuple[torch.Tensor, torch.Tensor]:
        slots = len(self.ranks)
        base = layer.base
        layer.lora_a = torch.zeros(slots, self._rank_capacity, base.in_features, device=self.device, dtype=self.dtype)
        layer.lora_b = torch.zeros(slots, base.out_features, self._rank_capacity, device=self.device, dtype=self.dtype)
        return layer.lora_a, layer.lora_b

    def _grow(self, slots: int, rank: int) -> None:
        # Doubling keeps reallocations rare as adapters arrive; tables never shrink (slots are reused).
        new_slots = len(self.ranks)
        while new_slots < slots:
            new_slots *= 2
        new_rank = max(self._rank_capacity, rank)
        if new_slots == len(self.ranks) and new_rank == self._rank_capacity:
            return
        for layer in self.layers.values():
            if layer.lora_a is None or layer.lora_b is None:
                continue
            a = torch.zeros(new_slots, new_rank, layer.base.in_features, device=self.device, dtype=self.dtype)
            b = torch.zeros(new_slots, layer.base.out_features, new_rank, device=self.device, dtype=self.dtype)
            old_slots, old_rank = layer.lora_a.shape[0], layer.lora_a.shape[1]
            a[:old_slots, :old_rank] = layer.lora_a
            b[:old_slots, :, :old_rank] = layer.lora_b
            layer.lora_a, layer.lora_b = a, b
        self.ranks += [0] * (new_slots - len(self.ranks))
        self._rank_capacity = new_rank

    def table_bytes(self) -> int:
        """Bytes the slot tables hold now (the engine exports it as the `lora_table_bytes` gauge)."""
        return sum(
            layer.lora_a.numel() * layer.lora_a.element_size() + layer.lora_b.numel() * layer.lora_b.element_size()
            for layer in self.layers.values()
            if layer.lora_a is not None and layer.lora_b is not None
        )
