"""Packed rows must give exactly the loss and gradients of padded rows; the known packing mistakes must not."""

from __future__ import annotations

import pytest
import torch

from app.jobs.spec import resolve_spec
from app.ml.synthetic import varied_length_chat
from worker.training.attention import SEGMENT_ATTENTION
from worker.training.data import tokenize_examples
from worker.training.devices import DeviceGroup, StepLoss
from worker.training.loop import build_lora_model, load_base_model
from worker.training.loss import loss_sums
from worker.training.packing import (
    best_fit_decreasing,
    collate_packed,
    collate_padded,
    plan_epoch,
    step_micro_batches,
)
from worker.training.step import accumulate_gradients

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def examples(tokenizer):
    data = tokenize_examples(varied_length_chat(8, seed=3, max_words=5), tokenizer, max_seq_length=1024)
    assert len({len(e) for e in data.examples}) > 4  # lengths vary, so padding and packing really differ
    return data.examples


def lora_model(tiny, attn_implementation: str):
    spec = resolve_spec({"lora_dropout": 0.0}, 8, tiny.defaults, seed=0)
    model = build_lora_model(load_base_model(tiny.name_or_path, CPU, torch.float32, attn_implementation), spec)
    # LoRA B starts at zero, which would make every LoRA A gradient zero; give the adapter real weights.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    model.train()
    return model


@pytest.fixture(scope="module", params=[SEGMENT_ATTENTION, "sdpa"])
def model(tiny, request):
    """Both attention paths: per-example segments (the CPU default) and transformers' SDPA with the
    block-diagonal mask it derives from restarting position ids (the CUDA default)."""
    return lora_model(tiny, request.param)


@pytest.fixture(scope="module")
def sdpa_model(tiny):
    return lora_model(tiny, "sdpa")


def assert_grads_close(actual: dict, expected: dict, rtol: float = 1e-4) -> None:
    """Element-wise rtol, with an absolute floor scaled to each tensor (tiny entries are rounding noise)."""
    for name, want in expected.items():
        torch.testing.assert_close(actual[name], want, rtol=rtol, atol=rtol * float(want.abs().max()))


def lora_grads(model, fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    fn()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def test_best_fit_decreasing_fills_rows_without_overflow():
    lengths = [6, 5, 4, 3, 2, 1, 7, 3]
    bins = best_fit_decreasing(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 4  # 31 tokens need at least 4 rows of 8
    with pytest.raises(ValueError):
        best_fit_decreasing([9], 8)


def test_epoch_plan_is_a_seeded_permutation_in_batches():
    plan = plan_epoch(10, 4, seed=5, epoch=1)
    assert [len(b) for b in plan] == [4, 4, 2]
    assert sorted(i for b in plan for i in b) == list(range(10))
    assert plan == plan_epoch(10, 4, seed=5, epoch=1) != plan_epoch(10, 4, seed=5, epoch=2)


def test_packed_positions_restart_per_example_and_carry_no_mask(examples):
    batch = collate_packed([examples[:3]], pad_id=0)
    assert batch.attention_mask is None
    lengths = [len(e) for e in examples[:3]]
    expected = [p for n in lengths for p in range(n)]
    assert batch.position_ids[0].tolist() == expected
    assert batch.n_supervised == sum(e.n_supervised for e in examples[:3])


def test_packed_equals_padded_loss_count_and_lora_gradients(model, examples):
    padded = collate_padded(examples, pad_id=0)
    packed = step_micro_batches(examples, packing=True, max_seq_length=1024, pad_id=0)
    assert len(packed) == 1 and packed[0].input_ids.shape[0] < len(examples)  # several examples per row
    packed = packed[0]
    with torch.no_grad():
        loss_padded, correct_padded = loss_sums(model, padded)
        loss_packed, correct_packed = loss_sums(model, packed)
    assert packed.n_supervised == padded.n_supervised
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=0)
    assert int(correct_packed) == int(correct_padded)

    g_padded = lora_grads(model, lambda: loss_sums(model, padded)[0].backward())
    g_packed = lora_grads(model, lambda: loss_sums(model, packed)[0].backward())
    assert any(g.abs().sum() > 0 for n, g in g_packed.items() if "lora_A" in n)
    assert_grads_close(g_packed, g_padded)


@pytest.mark.parametrize("mistake", ["2d_attention_mask", "use_cache", "positions_not_restarted"])
def test_each_known_packing_mistake_is_detected(sdpa_model, examples, mistake):
    padded = collate_padded(examples, pad_id=0)
    packed = step_micro_batches(examples, packing=True, max_seq_length=1024, pad_id=0)[0]
    kwargs = {
        "2d_attention_mask": {"attention_mask": torch.ones_like(packed.input_ids)},
        "use_cache": {"use_cache": True},
        "positions_not_restarted": {
            "position_ids": torch.arange(packed.input_ids.shape[1]).expand_as(packed.input_ids)
        },
    }[mistake]
    with torch.no_grad():
        reference, _ = loss_sums(sdpa_model, padded)
        wrong, _ = loss_sums(sdpa_model, packed, **kwargs)
    # The same tolerance as the equality check above fails: examples attended to their neighbours.
    assert not torch.allclose(wrong, reference, rtol=1e-5, atol=0)


def test_segment_attention_with_one_segment_per_row_is_detected(tiny, examples):
    model = lora_model(tiny, SEGMENT_ATTENTION)
    padded = collate_padded(examples, pad_id=0)
    packed = step_micro_batches(examples, packing=True, max_seq_length=1024, pad_id=0)[0]
    whole_rows = [[0, packed.input_ids.shape[1]] for _ in range(packed.input_ids.shape[0])]
    with torch.no_grad():
        reference, _ = loss_sums(model, padded)
        wrong, _ = loss_sums(model, packed, segments=whole_rows)
    assert not torch.allclose(wrong, reference, rtol=1e-5, atol=0)


def test_supervised_only_head_equals_the_models_own_full_logits_loss(model, examples):
    padded = collate_padded(examples, pad_id=0)
    labels = torch.full_like(padded.targets, -100)
    labels[:, 1:] = padded.targets[:, :-1]
    with torch.no_grad():
        ours, _ = loss_sums(model, padded)
        theirs = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask, labels=labels).loss
    torch.testing.assert_close(ours / padded.n_supervised, theirs, rtol=1e-5, atol=0)


def test_chunked_lm_head_gives_the_same_loss_and_gradients(model, examples):
    batch = collate_packed([examples], pad_id=0)
    vocab = model.get_base_model().get_output_embeddings().weight.shape[0]
    whole = lora_grads(model, lambda: loss_sums(model, batch)[0].backward())
    chunked_loss = {}

    def chunked():
        loss, _ = loss_sums(model, batch, chunk_elements=vocab * 7)  # 7 positions per chunk
        chunked_loss["value"] = loss.detach()
        loss.backward()

    chunks = lora_grads(model, chunked)
    with torch.no_grad():
        torch.testing.assert_close(chunked_loss["value"], loss_sums(model, batch)[0], rtol=1e-5, atol=0)
    assert_grads_close(chunks, whole)


@pytest.mark.parametrize("packing", [True, False])
def test_gradient_accumulation_8x1_equals_2x4(model, examples, packing):
    row = 2 * max(len(e) for e in examples)  # rows of two or more examples

    def micro(size):
        return step_micro_batches(examples, packing=packing, max_seq_length=row, pad_id=0, micro_batch_size=size)

    one, four = micro(8), micro(2)
    assert len(one) == 1 and len(four) > 1
    g_one = lora_grads(model, lambda: accumulate_gradients(StepLoss(model), one, DeviceGroup(CPU)))
    g_four = lora_grads(model, lambda: accumulate_gradients(StepLoss(model), four, DeviceGroup(CPU)))
    assert_grads_close(g_four, g_one)

    # Negative control: averaging per micro-batch (the old transformers bug) does not match.
    def per_micro_mean():
        for mb in four:
            (loss_sums(model, mb)[0] / mb.n_supervised / len(four)).backward()

    g_wrong = lora_grads(model, per_micro_mean)
    assert any(not torch.allclose(g_wrong[n], g_one[n], rtol=1e-3, atol=1e-7) for n in g_one)
