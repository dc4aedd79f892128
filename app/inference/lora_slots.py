"""Many LoRA adapters applied to one base model inside one batch.

Every linear layer of the decoder (all but the LM head) is wrapped once, when the base model loads. The base
matmul runs once for the whole batch; the LoRA delta of each row comes from its adapter's "slot" in per-layer
tables kept as batched matmuls read them: `A^T[slot] -> [in, r]`, `B^T[slot] -> [r, out]` (scale folded in). Slot 0
is the base model (all zeros).

Per forward the scheduler sets a `BatchPlan` (one slot per row):
- every row on slot 0: no LoRA work at all;
- every row on one adapter: two plain matmuls over the whole batch (the cheapest form);
- mixed, one position per row (decode): rows are gathered into one group per adapter (padded to the largest
  group) and two batched matmuls apply each group's factors (the SGMV form of Punica / S-LoRA). Each adapter's
  factors are read once per layer, not once per row: a decode step's small products are bound by the bytes they
  read (8 adapters' factors weigh as much as a small base model), and gathering factors per row read them twice
  over at 2 rows per adapter;
- mixed, several positions per row (prefill): each row's factors are gathered and two batched matmuls apply them
  per row (BGMV), the sum written into the base output in place. Here the activations outweigh the factors, and
  grouping rows copied them twice (in and out of the group layout): in benchmarks/bench_serve.py's workload the
  LoRA part of a prefill cost 90% of its base matmuls with groups, 35% per row.
Either way the cost does not grow with the number of distinct adapters in the batch, unlike a loop over adapters.
Ranks differ between adapters: tables are zero-padded to the largest rank seen and each forward slices to the
largest rank in the batch; zero rows and columns add exact zeros, so padding changes no result.

Tables are only resized or written by the scheduler thread between forwards, never during one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class MixedRows:
    """The layout of a batch whose rows use different slots."""

    slots: torch.Tensor  # [rows] each row's slot
    groups: tuple[int, ...]  # the distinct slots, in order
    group_slots: torch.Tensor  # the same, on the model's device
    group_rows: int  # rows per group: the largest group's
    gather: torch.Tensor  # [groups * group_rows] the row at each group position; padding repeats a group's first row
    scatter: torch.Tensor  # [rows] each row's group position

    @classmethod
    def of(cls, slots: list[int], device: torch.device) -> MixedRows:
        groups = sorted(set(slots))
        rows_of: dict[int, list[int]] = {slot: [] for slot in groups}
        for row, slot in enumerate(slots):
            rows_of[slot].append(row)
        width = max(len(rows) for rows in rows_of.values())
        gather: list[int] = []
        scatter = [0] * len(slots)
        for group, slot in enumerate(groups):
            rows = rows_of[slot]
            for k, row in enumerate(rows):
                scatter[row] = group * width + k
            gather += rows + [rows[0]] * (width - len(rows))
        return cls(
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            groups=tuple(groups),
            group_slots=torch.tensor(groups, dtype=torch.long, device=device),
            group_rows=width,
            gather=torch.tensor(gather, dtype=torch.long, device=device),
            scatter=torch.tensor(scatter, dtype=torch.long, device=device),
        )


class BatchPlan:
    """Which adapter slot each row of the next forward uses."""

    def __init__(self) -> None:
        self.single: int | None = 0  # the slot shared by every row, or None when rows differ
        self.mixed: MixedRows | None = None  # when rows differ
        self.rank = 0  # largest rank among the rows' adapters
        # Bumped when the slot tables change. Layers keep their groups' factors gathered, keyed by this and the
        # groups, across rows that come and go: a batch keeps its adapters for many decode steps.
        self.tables_version = 0
        self._last: list[int] | None = None
        # One forward's input in group layout, for the layers that read the same input (q, k and v; gate and up).
        self._grouped_input: tuple[torch.Tensor, torch.Tensor] | None = None

    def tables_changed(self) -> None:
        self.tables_version += 1
        self._last = None

    def set(self, slots: list[int], ranks: list[int], device: torch.device) -> None:
        self._grouped_input = None
        if slots == self._last:
            return
        self._last = list(slots)
        self.rank = max(ranks[s] for s in slots)
        if len(set(slots)) == 1:
            self.single, self.mixed = slots[0], None
            return
        self.single, self.mixed = None, MixedRows.of(slots, device)

    def grouped_input(self, x: torch.Tensor, mixed: MixedRows) -> torch.Tensor:
        """A decode step's input `x` (one position per row) as [groups, group_rows, in], gathered once for all the
        layers that read this very tensor."""
        if self._grouped_input is None or self._grouped_input[0] is not x:  # `x` is held: no other gets its id
            rows, features = mixed.slots.shape[0], x.shape[-1]
            grouped = x.reshape(rows, features).index_select(0, mixed.gather)
            grouped = grouped.view(len(mixed.groups), mixed.group_rows, features)
            self._grouped_input = (x, grouped)
        return self._grouped_input[1]


class LoraSlotLinear(nn.Module):
    """A base `nn.Linear` plus per-row LoRA deltas read from slot tables."""

    def __init__(self, base: nn.Linear, plan: BatchPlan) -> None:
        super().__init__()
        self.base = base
        self.plan = plan
        self.lora_a: torch.Tensor | None = None  # A^T [slots, in, r_max]
        self.lora_b: torch.Tensor | None = None  # B^T [slots, r_max, out]
        # ((tables version, groups), A^T, B^T) of the groups last seen in a decode step
        self._group_factors: tuple[tuple[int, tuple[int, ...]], torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [rows, positions, in], as a decoder's hidden states are, or [tokens, in] flattened from them."""
        out = self.base(x)
        plan, lora_a, lora_b = self.plan, self.lora_a, self.lora_b
        if lora_a is None or lora_b is None or plan.single == 0 or plan.rank == 0:  # tables: both or neither
            return out
        r = plan.rank
        if plan.single is not None:  # the sum fused into the second product, in place
            h = x.reshape(-1, x.shape[-1]) @ lora_a[plan.single, :, :r]
            out.view(-1, out.shape[-1]).addmm_(h, lora_b[plan.single, :r])
            return out
        mixed = plan.mixed
        if mixed is None:
            raise RuntimeError("a plan whose rows differ has their layout")
        rows = mixed.slots.shape[0]
        if x.numel() > rows * x.shape[-1]:  # prefill, several positions per row: per-row factors
            # Sliced to the batch's rank before gathering: one contiguous copy of what the products read.
            a = lora_a[:, :, :r].index_select(0, mixed.slots)
            b = lora_b[:, :r].index_select(0, mixed.slots)
            x3 = x.reshape(rows, -1, x.shape[-1])
            out.view(rows, -1, out.shape[-1]).baddbmm_(torch.bmm(x3, a), b)  # in place: no copy of `out`
            return out
        key = (plan.tables_version, mixed.groups)
        if self._group_factors is None or self._group_factors[0] != key:
            self._group_factors = (
                key,
                lora_a[:, :, :r].index_select(0, mixed.group_slots),
                lora_b[:, :r].index_select(0, mixed.group_slots),
            )
        _, a, b = self._group_factors
        delta = torch.bmm(torch.bmm(plan.grouped_input(x, mixed), a), b)  # [groups, group_rows, out]
        return out.add_(delta.view(-1, delta.shape[-1]).index_select(0, mixed.scatter).view_as(out))


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
        self.plan.tables_changed()  # a slot's content changes: gathered factors of the old content are stale
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
                lora_a[slot, :, : a.shape[0]].copy_(a.T)
                lora_b[slot, : b.shape[1]].copy_(b.T)

    def _allocate(self, layer: LoraSlotLinear) -> tuple[torch.Tensor, torch.Tensor]:
        slots = len(self.ranks)
        base = layer.base
        layer.lora_a = torch.zeros(slots, base.in_features, self._rank_capacity, device=self.device, dtype=self.dtype)
        layer.lora_b = torch.zeros(slots, self._rank_capacity, base.out_features, device=self.device, dtype=self.dtype)
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
            a = torch.zeros(new_slots, layer.base.in_features, new_rank, device=self.device, dtype=self.dtype)
            b = torch.zeros(new_slots, new_rank, layer.base.out_features, device=self.device, dtype=self.dtype)
            old_slots, old_rank = layer.lora_a.shape[0], layer.lora_a.shape[2]
            a[:old_slots, :, :old_rank] = layer.lora_a
            b[:old_slots, :old_rank] = layer.lora_b
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
