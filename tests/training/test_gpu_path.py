"""The GPU path's logic, checked on the CPU: which device and dtypes are chosen, that LoRA weights, gradients and
optimizer state stay fp32 over a bf16 base, which attention implementation packed training gets on CUDA, that the
FlashAttention varlen path keeps packed examples apart over several rows (with a reference kernel standing in
for flash_attn), and that a job's device memory is accounted and released. benchmarks/gpu_check.sh runs the
same path on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.jobs.spec import resolve_spec
from app.ml import device as device_module
from app.ml.device import autocast_dtype, pick_device, release_memory, start_memory_accounting, weight_dtype
from app.ml.synthetic import varied_length_chat
from tests.training.conftest import write_jsonl
from worker.training import attention, loop
from worker.training.attention import (
    PACKED_FLASH_ATTENTION,
    SEGMENT_ATTENTION,
    boundaries_from_segments,
    packed_flash_attention_forward,
    segment_attention_forward,
    sequence_boundaries,
)
from worker.training.checkpoint import load_adapter_weights
from worker.training.data import load_dataset
from worker.training.devices import DeviceGroup, StepLoss
from worker.training.evaluation import autocast
from worker.training.loop import build_lora_model, default_attention, load_base_model, train
from worker.training.loss import loss_sums
from worker.training.packing import collate_packed, collate_padded
from worker.training.step import optimizer_step

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def cuda_present(monkeypatch):
    """torch.cuda as on a GPU machine, as far as the device choice reads it."""

    def set_bf16(supported: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    set_bf16(True)
    return set_bf16


def test_without_cuda_everything_runs_on_the_cpu_in_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == (CPU, torch.float32)
    assert autocast_dtype(CPU) is None
    assert not autocast(CPU)._enabled
    assert start_memory_accounting() == {}


def test_on_cuda_weights_are_bf16_and_training_autocasts_to_bf16(cuda_present):
    assert pick_device() == (CUDA, torch.bfloat16)
    assert autocast_dtype(CUDA) == torch.bfloat16
    context = autocast(CUDA)
    assert context._enabled and context.fast_dtype == torch.bfloat16
    cuda_present(False)  # a GPU without bf16 (before Ampere): fp32 weights, no autocast
    assert weight_dtype(CUDA) == torch.float32 and autocast_dtype(CUDA) is None


def test_packed_training_attention_per_device(monkeypatch):
    assert default_attention(CPU) == SEGMENT_ATTENTION
    monkeypatch.setattr(loop, "flash_attention_available", lambda: False)
    assert default_attention(CUDA) == "sdpa"  # transformers' block-diagonal mask from the position ids
    monkeypatch.setattr(loop, "flash_attention_available", lambda: True)
    assert default_attention(CUDA) == PACKED_FLASH_ATTENTION


def test_memory_is_released_between_jobs(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(device_module.gc, "collect", lambda: calls.append("collect"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    release_memory()
    assert calls == ["collect"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    release_memory()
    assert calls == ["collect", "collect", "empty_cache"]


# --- fp32 LoRA over a bf16 base ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def examples(tiny, tokenizer, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("gpu") / "train.jsonl", varied_length_chat(12, seed=5, max_words=30))
    return load_dataset(path, tokenizer, 512, "drop", param="training_file").examples


def test_lora_weights_gradients_and_optimizer_state_stay_fp32_over_a_bf16_base(tiny, tokenizer, examples, tmp_path):
    spec = resolve_spec({"n_epochs": 1, "batch_size": 8, "lora_dropout": 0.0}, 12, tiny.defaults, seed=1)
    model = build_lora_model(load_base_model(tiny.name_or_path, CPU, torch.bfloat16), spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)

    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    before = [p.detach().clone() for p in trainable]
    pad_id = tokenizer.pad_token_id
    step = optimizer_step(
        StepLoss(model), DeviceGroup(CPU), optimizer, scheduler, trainable, examples[:8], spec, pad_id
    )
    assert step.loss == step.loss and step.n_tokens == sum(len(e) for e in examples[:8])
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable, strict=True))
    states = [optimizer.state[p] for p in trainable]
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)
    assert all(p.dtype == torch.float32 for p in trainable)

    # A saved adapter (what a job publishes and a continued job starts from) loads back as fp32 weights.
    model.save_pretrained(tmp_path / "adapter")
    again = build_lora_model(load_base_model(tiny.name_or_path, CPU, torch.bfloat16), spec)
    load_adapter_weights(again, tmp_path / "adapter")
    reloaded = [p for p in again.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in reloaded)
    assert all(torch.equal(a, b) for a, b in zip(trainable, reloaded, strict=True))


def test_a_run_reports_its_own_tokens_and_step_time(tiny, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", varied_length_chat(8, seed=2, max_words=20))
    spec = resolve_spec({"n_epochs": 1, "batch_size": 4, "n_checkpoints": 0}, 8, tiny.defaults, seed=1)
    result = train(spec, path, None, tiny, tmp_path / "out")
    assert result.run_tokens == result.trained_tokens > 0
    assert result.train_seconds > 0


# --- FlashAttention's varlen path over packed rows -------------------------------------------------------------


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options):
    """flash_attn_varlen_func's contract, computed with SDPA one sequence at a time (q [total, heads, dim])."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    assert q.dtype in attention.FLASH_DTYPES
    bounds = cu_seqlens_q.tolist()
    assert max_seqlen_q == max_seqlen_k == max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    assert options["causal"] is True
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q_, k_, v_ = (t[start:end].transpose(0, 1).unsqueeze(0).float() for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q_, k_, v_, is_causal=True, scale=options["softmax_scale"], enable_gqa=True
        )
        parts.append(out[0].transpose(0, 1).to(q.dtype))
    return torch.cat(parts)


@pytest.fixture
def reference_flash(monkeypatch):
    monkeypatch.setattr(attention, "flash_varlen_function", lambda: reference_varlen)


def packed_positions(rows: list[list[int]], width: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Position ids and segment bounds of rows holding examples of the given lengths, padded to `width` (the
    padding tail restarting at 0, as collate_packed lays it out)."""
    positions, segments = [], []
    for lengths in rows:
        row, bounds = [], [0]
        for n in lengths:
            row += range(n)
            bounds.append(len(row))
        if len(row) < width:
            bounds.append(width)
            row += range(width - len(row))
        positions.append(row)
        segments.append(bounds)
    return torch.tensor(positions), segments


def test_sequence_boundaries_come_from_restarting_positions_across_rows():
    positions, segments = packed_positions([[3, 2], [4, 1]], 6)
    cu_seqlens, longest = sequence_boundaries(positions, 2, 6)
    assert cu_seqlens.tolist() == [0, 3, 5, 6, 10, 11, 12] and longest == 4
    assert cu_seqlens.dtype == torch.int32
    assert sequence_boundaries(positions, 2, 6)[0] is cu_seqlens  # once per forward pass, not once per layer
    from_segments, longest_too = boundaries_from_segments(segments, 6, CPU)
    assert from_segments.tolist() == cu_seqlens.tolist() and longest_too == longest


def test_fp32_inputs_run_in_bf16_and_come_back_fp32(reference_flash):
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    out, _ = packed_flash_attention_forward(torch.nn.Module(), q, k, v, None, position_ids=torch.arange(6)[None])
    assert out.dtype == torch.float32
    expected = F.scaled_dot_product_attention(*(t.bfloat16().float() for t in (q, k, v)), is_causal=True)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)])
def test_packed_flash_attention_keeps_examples_apart_over_several_rows(reference_flash, heads, kv_heads):
    width, dim = 12, 8
    positions, segments = packed_positions([[5, 4, 2], [7, 3], [12]], width)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, heads, width, dim, generator=generator, dtype=torch.bfloat16)
    k, v = (torch.randn(3, kv_heads, width, dim, generator=generator, dtype=torch.bfloat16) for _ in range(2))
    module = torch.nn.Module()
    expected, _ = segment_attention_forward(module, q, k, v, None, scaling=0.3, segments=segments)
    from_positions, _ = packed_flash_attention_forward(module, q, k, v, None, scaling=0.3, position_ids=positions)
    from_segments, _ = packed_flash_attention_forward(module, q, k, v, None, scaling=0.3, segments=segments)
    assert from_positions.shape == expected.shape == (3, width, heads, dim)
    torch.testing.assert_close(from_positions, expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(from_segments, expected, atol=2e-2, rtol=2e-2)
    # Negative control: positions that never restart make each row one sequence, and examples attend across.
    no_restart = torch.arange(width).expand(3, width)
    crossed, _ = packed_flash_attention_forward(module, q, k, v, None, scaling=0.3, position_ids=no_restart)
    assert (crossed.float() - expected.float()).abs().max() > 0.1


def test_a_model_with_packed_flash_attention_gives_the_padded_loss(tiny, examples, reference_flash, monkeypatch):
    """Through the real decoder: the position ids reach the attention function, and a micro-batch of several
    packed rows gives the loss of the same examples padded one per row (SDPA with a padding mask), to fp32
    rounding (the reference kernel runs fp32 here, so the comparison is as tight as tests/training/test_packing's)."""
    monkeypatch.setattr(attention, "FLASH_DTYPES", (torch.float32, torch.float16, torch.bfloat16))
    spec = resolve_spec({"lora_dropout": 0.0}, 12, tiny.defaults, seed=1)
    flash = build_lora_model(load_base_model(tiny.name_or_path, CPU, torch.float32, PACKED_FLASH_ATTENTION), spec)
    sdpa = build_lora_model(load_base_model(tiny.name_or_path, CPU, torch.float32, "sdpa"), spec)
    rows = [examples[0:3], examples[3:5], examples[5:9]]
    packed = collate_packed(rows, pad_id=0)
    padded = collate_padded(examples[:9], pad_id=0)
    assert packed.input_ids.shape[0] == 3 and packed.n_supervised == padded.n_supervised
    with torch.no_grad():
        reference, _ = loss_sums(sdpa, padded)
        loss, _ = loss_sums(flash, packed)
        crossed, _ = loss_sums(flash, packed, position_ids=torch.arange(packed.input_ids.shape[1]).expand(3, -1))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)
    assert not torch.allclose(crossed, reference, rtol=1e-5, atol=0)  # examples attending across rows' neighbours
