"""The engine's LoRA arithmetic against PEFT: logits of one mixed batch equal `PeftModel` with each row's adapter.

Each adapter is loaded the way the engine loads it for serving (a request through `InferenceEngine`: adapter cache,
`read_adapter`, then the scheduler installs it into its slot of `LoraSlots`). The test then runs the engine's own
forward (`BaseModelRuntime.forward` with `LoraSlots.use`) on a left-padded batch that mixes every adapter and the
base model, prefill and one decode step, and compares every real position's logits with PEFT's, row by row and
unpadded.

Tolerance: float32 on CPU, absolute `ATOL` on logits. Both sides compute the same function in a different order
(the engine folds the LoRA scale into B and applies every row's factors with batched matmuls on padded tables;
PEFT scales after `B(A(x))` module by module; the engine's rows are left-padded and masked). That reordering moves
logits by float32 rounding only: at most about 1.5e-5 here, on logits of magnitude about 10 (relative 1e-6, a few
float32 ulps through four layers). `ATOL` leaves several times that for other CPUs and summation orders, and is
five orders of magnitude below what these adapters change (about 5-15 on the same logits; the test checks every
adapter moves them by more than 100 x `ATOL`), so a wrong scale on any module cannot hide inside the tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from app.inference import AdapterRef
from app.inference.adapter_weights import read_adapter
from tests.inference.adapters import build_random_adapter
from tests.inference.conftest import TINY, prompt_ids, request, run_together

ATOL = 1e-4

# name -> options of build_random_adapter. Comments give the LoRA scale PEFT applies.
SPECS = {
    # alpha / r = 2 on every linear layer
    "plain": dict(rank=8, alpha=16),
    # alpha / r = 8, attention only: the MLP rows of its slot stay zero
    "attention": dict(rank=4, alpha=32, target_modules=["q_proj", "v_proj"]),
    # rsLoRA: alpha / sqrt(r) = 2 (alpha / r would be 0.5), MLP only
    "rslora": dict(rank=16, alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
    # per-module alpha: q_proj 64/8 = 8, down_proj 2/8, layer 1's o_proj 48/8 (a regex key); the rest 16/8
    "alpha_pattern": dict(
        rank=8, alpha=16, alpha_pattern={"q_proj": 64, "mlp.down_proj": 2, r"layers\.1\.self_attn\.o_proj": 48}
    ),
    # per-module rank: k_proj r=2 (16/2 = 8), up_proj r=16 (16/16 = 1); the rest r=8 (16/8 = 2)
    "rank_pattern": dict(rank=8, alpha=16, rank_pattern={"k_proj": 2, "up_proj": 16}),
    # all three: o_proj alpha 4 at r=2 -> 4/sqrt(2); v_proj r=16 -> 16/4; gate_proj alpha 40 -> 40/sqrt(8)
    "rslora_patterns": dict(
        rank=8,
        alpha=16,
        use_rslora=True,
        rank_pattern={"o_proj": 2, "v_proj": 16},
        alpha_pattern={"o_proj": 4, "gate_proj": 40},
    ),
}

# (module, adapter) -> (rank, scale) that PEFT must have built: proves the options took effect in the reference.
EXPECTED_PEFT_LAYERS = {
    ("model.layers.0.self_attn.q_proj", "plain"): (8, 2.0),
    ("model.layers.0.self_attn.q_proj", "attention"): (4, 8.0),
    ("model.layers.2.mlp.down_proj", "rslora"): (16, 2.0),
    ("model.layers.3.self_attn.q_proj", "alpha_pattern"): (8, 8.0),
    ("model.layers.0.mlp.down_proj", "alpha_pattern"): (8, 0.25),
    ("model.layers.1.self_attn.o_proj", "alpha_pattern"): (8, 6.0),
    ("model.layers.2.self_attn.o_proj", "alpha_pattern"): (8, 2.0),
    ("model.layers.1.self_attn.k_proj", "rank_pattern"): (2, 8.0),
    ("model.layers.1.mlp.up_proj", "rank_pattern"): (16, 1.0),
    ("model.layers.1.mlp.gate_proj", "rank_pattern"): (8, 2.0),
    ("model.layers.0.self_attn.o_proj", "rslora_patterns"): (2, 4 / math.sqrt(2)),
    ("model.layers.0.self_attn.v_proj", "rslora_patterns"): (16, 4.0),
    ("model.layers.0.mlp.gate_proj", "rslora_patterns"): (8, 40 / math.sqrt(8)),
    ("model.layers.0.mlp.up_proj", "rslora_patterns"): (8, 16 / math.sqrt(8)),
}

PROMPTS = [
    "hello",
    "the quick brown fox jumps over the lazy dog",
    "a",
    "LoRA adapters, many of them, in one batch!",
    "xyz " * 9,
    "scales: alpha / r, alpha / sqrt(r)",
    "0123456789",
    "per-module overrides",
]


@pytest.fixture(scope="module")
def parity_adapters(registry, tmp_path_factory) -> dict[str, AdapterRef]:
    from transformers import AutoModelForCausalLM

    base_dir = registry.resolve(TINY).name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("parity")
    return {
        name: AdapterRef(
            name=f"ft:{TINY}:parity::{name}",
            path=build_random_adapter(base_dir, root / name, seed=200 + i, base_model=base, **options),
        )
        for i, (name, options) in enumerate(SPECS.items())
    }


@pytest.fixture(scope="module")
def peft_model(registry, parity_adapters):
    """Every adapter loaded into one `PeftModel` (float32, CPU), switched with `set_adapter`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(registry.resolve(TINY).name_or_path, dtype=torch.float32)
    model = None
    for name, ref in parity_adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(base, ref.path, adapter_name=name)
        else:
            model.load_adapter(ref.path, adapter_name=name)
    return model.eval()


def peft_logits(model, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """PEFT's logits [len(ids), vocab] for one unpadded sequence on `adapter` (None: the base model)."""
    with torch.inference_mode():
        inputs = torch.tensor([ids])
        if adapter is None:
            with model.disable_adapter():
                return model(input_ids=inputs).logits[0].float()
        model.set_adapter(adapter)
        return model(input_ids=inputs).logits[0].float()


def loaded_engine(make_engine, tokenizer, refs: list[AdapterRef]):
    """An engine (CPU float32) that has served one request on each adapter, then stopped so that its base model
    runtime, slot tables and adapter slots can be used from this thread. Returns (runtime, slot per adapter)."""
    engine = make_engine(max_batch_size=len(refs), device=torch.device("cpu"), dtype=torch.float32)
    results = run_together(engine, [request(tokenizer, "load", ref, max_tokens=1) for ref in refs])
    assert all(finished.completion_tokens == 1 for _, finished in results)
    engine.stop()  # the scheduler thread has ended: nothing else touches the runtime now
    entries = {ref.name: engine._cache._entries[ref.name] for ref in refs}
    assert all(entry.installed for entry in entries.values())
    return engine._runtimes[TINY], {name: entry.slot for name, entry in entries.items()}


def engine_logits(runtime, slots: list[int], prompts: list[list[int]], next_tokens: list[int]):
    """The engine's forward on a left-padded batch (as the scheduler builds it): prefill logits [rows, width, vocab]
    and the logits [rows, vocab] of one decode step feeding `next_tokens` through the prefill's KV cache."""
    width = max(len(p) for p in prompts)
    pad = runtime.pad_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        runtime.lora.use(slots)
        cache = runtime.new_cache()
        prefill = runtime.forward(cache, input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
        runtime.lora.use(slots)  # the same rows, as a decode step follows its prefill in serving
        decode = (
            runtime.forward(
                cache,
                input_ids=torch.tensor([[t] for t in next_tokens]),
                attention_mask=torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1),
                position_ids=torch.tensor([[len(p)] for p in prompts]),
            )
            .logits[:, -1]
            .float()
        )
    return prefill, decode


def compare_rows(runtime, peft_model, slot_of, rows: list[tuple[str | None, list[int]]]) -> float:
    """Run `rows` (adapter name or None, prompt ids) as one engine batch; assert each row equals PEFT; return the
    largest difference seen."""
    prompts = [ids for _, ids in rows]
    expected = [peft_logits(peft_model, adapter, ids) for adapter, ids in rows]
    next_tokens = [int(logits[-1].argmax()) for logits in expected]
    slots = [0 if adapter is None else slot_of[adapter] for adapter, _ in rows]
    prefill, decode = engine_logits(runtime, slots, prompts, next_tokens)
    worst = 0.0
    for i, (adapter, ids) in enumerate(rows):
        got = prefill[i, prefill.shape[1] - len(ids) :]
        want_decode = peft_logits(peft_model, adapter, [*ids, next_tokens[i]])[-1]
        for what, a, b in (("prefill", got, expected[i]), ("decode", decode[i], want_decode)):
            diff = float((a - b).abs().max())
            assert diff <= ATOL, f"row {i} ({adapter or 'base model'}) {what}: max |engine - PEFT| = {diff:.3g}"
            worst = max(worst, diff)
    return worst


def test_peft_reference_applies_the_scaling_options(peft_model):
    # Without this the comparison could pass on options that PEFT silently ignored (a pattern matching nothing).
    for (module, adapter), (rank, scale) in EXPECTED_PEFT_LAYERS.items():
        layer = peft_model.base_model.model.get_submodule(module)
        assert layer.r[adapter] == rank, (module, adapter)
        assert layer.scaling[adapter] == pytest.approx(scale), (module, adapter)


def test_mixed_batch_of_every_adapter_and_the_base_model_equals_peft(
    make_engine, tokenizer, parity_adapters, peft_model
):
    names = list(parity_adapters)
    runtime, slots = loaded_engine(make_engine, tokenizer, list(parity_adapters.values()))
    slot_of = {name: slots[ref.name] for name, ref in parity_adapters.items()}
    # The base model, every adapter, and one adapter twice, with prompts of different lengths (left padding).
    adapters_of_rows = [None, *names, "alpha_pattern"]
    rows = [(adapter, prompt_ids(tokenizer, PROMPTS[i % len(PROMPTS)])) for i, adapter in enumerate(adapters_of_rows)]
    worst = compare_rows(runtime, peft_model, slot_of, rows)
    # Rows come and go while the batch keeps its adapters (decode reuses each group's gathered factors with a new
    # row layout: other group sizes, other padding); then the set of adapters changes, to one whose largest rank
    # (8) is below the tables' (16).
    for adapters in ([*reversed(names), "plain", "plain", None], ["attention", "plain", "plain"]):
        rows = [(adapter, prompt_ids(tokenizer, PROMPTS[(i + 1) % len(PROMPTS)])) for i, adapter in enumerate(adapters)]
        worst = max(worst, compare_rows(runtime, peft_model, slot_of, rows))
    # A slot takes another adapter of the same rank (as when an evicted adapter's slot is reused) while the batch's
    # slots stay those of the last batch: the rows on that slot now follow the new adapter.
    other = read_adapter(
        parity_adapters["alpha_pattern"], runtime.info, runtime.lora.module_shapes(), max_rank=64, dtype=torch.float32
    )
    with torch.inference_mode():  # as the scheduler installs adapters
        runtime.lora.install(slot_of["plain"], other.rank, other.modules)
    rows = [("attention", prompt_ids(tokenizer, PROMPTS[0])), ("alpha_pattern", prompt_ids(tokenizer, PROMPTS[2]))]
    worst = max(worst, compare_rows(runtime, peft_model, {**slot_of, "alpha_pattern": slot_of["plain"]}, rows))
    print(f"mixed batches: max |engine - PEFT| = {worst:.3g} (tolerance {ATOL})")

    # Each adapter really moves the logits, far beyond the tolerance: a wrong scale could not pass unseen.
    ids = prompt_ids(tokenizer, PROMPTS[1])
    base = peft_logits(peft_model, None, ids)
    for name in names:
        assert float((peft_logits(peft_model, name, ids) - base).abs().max()) > 100 * ATOL, name


def test_single_adapter_batches_equal_peft(make_engine, tokenizer, parity_adapters, peft_model):
    # Every row on one adapter takes the plain-matmul path instead of the grouped or per-row ones.
    runtime, slots = loaded_engine(make_engine, tokenizer, list(parity_adapters.values()))
    worst = 0.0
    for name, ref in parity_adapters.items():
        rows = [(name, prompt_ids(tokenizer, PROMPTS[0])), (name, prompt_ids(tokenizer, PROMPTS[3]))]
        worst = max(worst, compare_rows(runtime, peft_model, {name: slots[ref.name]}, rows))
    print(f"single-adapter batches: max |engine - PEFT| = {worst:.3g} (tolerance {ATOL})")
