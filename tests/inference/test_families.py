"""Every built-in family through the serving engine: Llama 3, Qwen2 (q/k/v biases, tied embeddings), Qwen3 (q/k
norms), Mistral and Llama 3 (no pad token), Gemma 2 (soft-capping, a 64-token sliding window on alternate layers,
tied embeddings) and Phi-3 (fused qkv_proj and gate_up_proj).

- Mixed-adapter batches generate, greedily, exactly what PEFT's `generate` gives for each request alone.
- The engine's KV-cache path (left-padded prefill, rows joining with other widths, rows leaving, decode steps)
  gives PEFT's logits at every step, with prompts longer than Gemma 2's window.
- The adapter the training loop writes, as the download route hands it out, loads in `PeftModel.from_pretrained`
  with every LoRA weight, on every linear layer but the LM head.
- Generation stops on each EOS id of the model's generation config, not only on the tokenizer's EOS.
- Streamed text keeps the space a SentencePiece-style decoder strips at the start of what it decodes.

The models (tests/inference/families.py) are the built-in ones with random biases and norm weights (the built-in
ones have zero biases and neutral norms, which would hide an engine that dropped them). The adapters: two random
ones on all linear layers (fused and biased ones included), one trained for three steps by the real training loop.

Tolerance: float32 on CPU; the engine and PEFT compute the same function in a different order (see
test_lora_parity). The largest difference measured is 6e-5, on logits of about 13 (the rsLoRA adapter over the
long prompt); `ATOL` leaves about 8 times that. What it must catch is far larger: these adapters move logits by
1 to 35, and removing Gemma 2's attention soft-capping, the smallest effect tried, moves them by 7.6e-3.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from app.config import Settings
from app.errors import ServiceUnavailable
from app.inference import Finished, GenerationRequest
from app.inference.kv_batch import KVBatch
from app.inference.runtime import check_attention_layers
from app.inference.text_stream import IncrementalDetokenizer
from app.ml.adapter_files import ADAPTER_FILES, ADAPTER_WEIGHTS
from app.ml.chat import render_completion_prompt
from app.ml.registry import BaseModelRegistry
from tests.inference.conftest import run_together
from tests.inference.families import (
    ADAPTERS,
    FAMILIES,
    STOP_PROMPTS,
    STOP_STEP,
    TRAINED,
    FamilyCase,
    build_stop_model,
    completion_text,
    peft_greedy,
)

each_family = pytest.mark.parametrize("family", FAMILIES)

CPU = dict(device=torch.device("cpu"), dtype=torch.float32)
ATOL = 5e-4
MAX_TOKENS = 10
# (adapter, prompt) per row: every adapter and the base model, the long prompt on several of them.
MIXED_ROWS = [
    (None, "chat"),
    ("r4", "long"),
    ("r8-rslora", "completion"),
    (TRAINED, "chat"),
    ("r4", "short"),
    (None, "long"),
    ("r8-rslora", "chat"),
    (TRAINED, "long"),
]


def generation_request(case: FamilyCase, adapter: str | None, prompt: str, **options) -> GenerationRequest:
    return GenerationRequest(
        base_model=case.name,
        adapter=None if adapter is None else case.adapters[adapter],
        prompt_ids=case.prompts[prompt],
        max_tokens=options.pop("max_tokens", MAX_TOKENS),
        temperature=0.0,
        continues_prompt=prompt != "chat",  # a chat answer is read on its own, a completion after its prompt
        **options,
    )


@each_family
def test_mixed_adapter_batch_generates_what_peft_generates_alone(family, family_cases, make_engine):
    case = family_cases(family)
    engine = make_engine(case.registry, max_batch_size=len(MIXED_ROWS), **CPU)
    got = run_together(engine, [generation_request(case, adapter, prompt) for adapter, prompt in MIXED_ROWS])
    expected = [
        peft_greedy(case, adapter, case.prompts[prompt], MAX_TOKENS, continues_prompt=prompt != "chat")
        for adapter, prompt in MIXED_ROWS
    ]
    assert got == expected
    metrics = engine.metrics()
    assert metrics["batch_size_sum"] / metrics["batch_size_count"] > 4  # decoded together
    # The adapters steer generation: one prompt, different texts. Not on Gemma 2: its post-norms bound what any
    # layer adds to the (scaled, tied) embedding of the last token, which its random weights then repeat whatever
    # the adapter; the logits comparison below is what proves its adapters there.
    if family != "gemma2":
        text = {row: text for row, (text, _) in zip(MIXED_ROWS, got, strict=True)}
        assert text["r8-rslora", "chat"] != text[None, "chat"] and text["r4", "long"] != text[None, "long"]


def slots_after_loading(make_engine, case: FamilyCase):
    """An engine that has installed every adapter, stopped so its runtime can be driven from this thread."""
    engine = make_engine(case.registry, max_batch_size=len(ADAPTERS), **CPU)
    results = run_together(engine, [generation_request(case, name, "short", max_tokens=1) for name in ADAPTERS])
    assert all(finished.completion_tokens == 1 for _, finished in results)
    engine.stop()
    entries = {name: engine._cache._entries[case.adapters[name].name] for name in ADAPTERS}
    assert all(entry.installed for entry in entries.values())
    return engine._runtimes[case.name], {name: entry.slot for name, entry in entries.items()}


def peft_logits(case: FamilyCase, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """PEFT's logits [len(ids), vocab] for one unpadded sequence."""
    with torch.inference_mode():
        inputs = torch.tensor([ids])
        if adapter is None:
            with case.peft.disable_adapter():
                return case.peft(input_ids=inputs).logits[0].float()
        case.peft.set_adapter(adapter)
        return case.peft(input_ids=inputs).logits[0].float()


class KVRows:
    """Rows driven through the engine's own KV path (`KVBatch`, `BaseModelRuntime`, `LoraSlots`), each compared
    with PEFT on its whole unpadded sequence at every step; the next token fed is PEFT's greedy choice."""

    def __init__(self, case: FamilyCase, runtime, slot_of: dict[str, int]) -> None:
        self.case, self.runtime, self.slot_of = case, runtime, slot_of
        self.kv = KVBatch()
        self.rows: list[tuple[str | None, list[int]]] = []  # (adapter, ids fed so far)
        self.next: list[int] = []  # the token each row feeds next
        self.worst = 0.0

    def _check(self, what: str, adapter: str | None, got: torch.Tensor, ids: list[int]) -> torch.Tensor:
        want = peft_logits(self.case, adapter, ids)[-got.shape[0] :]
        diff = float((got - want).abs().max())
        assert diff <= ATOL, f"{what} ({adapter or 'base model'}, {len(ids)} tokens): max |engine - PEFT| = {diff:.3g}"
        self.worst = max(self.worst, diff)
        return want

    def _slots(self) -> list[int]:
        return [0 if adapter is None else self.slot_of[adapter] for adapter, _ in self.rows]

    def join(self, rows: list[tuple[str | None, str]]) -> None:
        """Prefill new rows (left-padded as the scheduler pads them) and join them to the running batch."""
        runtime = self.runtime
        prompts = [self.case.prompts[prompt] for _, prompt in rows]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[runtime.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        runtime.lora.use([0 if a is None else self.slot_of[a] for a, _ in rows])
        cache = runtime.new_cache()
        with torch.inference_mode():
            logits = runtime.forward(cache, input_ids=ids, attention_mask=mask, position_ids=positions).logits
        self.kv.add(cache, mask)
        for i, ((adapter, _), prompt) in enumerate(zip(rows, prompts, strict=True)):
            want = self._check("prefill", adapter, logits[i, width - len(prompt) :].float(), prompt)
            self.rows.append((adapter, list(prompt)))
            self.next.append(int(want[-1].argmax()))

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            self.runtime.lora.use(self._slots())
            tokens = torch.tensor([[t] for t in self.next])
            positions = torch.tensor([[len(ids)] for _, ids in self.rows])
            with torch.inference_mode():
                logits = self.kv.decode(self.runtime, tokens, positions)
            for i, (adapter, ids) in enumerate(self.rows):
                ids.append(self.next[i])
                want = self._check("decode", adapter, logits[i : i + 1], ids)
                self.next[i] = int(want[-1].argmax())

    def keep(self, indices: list[int]) -> None:
        self.kv.keep(indices)
        self.rows = [self.rows[i] for i in indices]
        self.next = [self.next[i] for i in indices]


@each_family
def test_kv_cache_path_gives_peft_logits_at_every_step(family, family_cases, make_engine):
    case = family_cases(family)
    runtime, slot_of = slots_after_loading(make_engine, case)
    # The engine's LoRA slots sit on exactly the modules PEFT's "all-linear" picks for this architecture: not on
    # the LM head (tied to the input embeddings in Qwen2 and Gemma 2), on Phi-3's fused projections.
    assert set(runtime.lora.layers) == lora_modules(load_file(str(case.trained_dir / ADAPTER_WEIGHTS)))
    rows = KVRows(case, runtime, slot_of)
    rows.join([(None, "long"), ("r4", "chat"), (TRAINED, "short")])
    rows.decode(2)
    # Newcomers of other widths join the running rows (the shorter side is padded on the left), among them a
    # second long prompt: decode positions run past the window on both sides of the join.
    rows.join([("r8-rslora", "long"), ("r4", "completion"), (None, "short")])
    rows.decode(2)
    rows.keep([0, 3, 4])  # rows leave; the columns only they used are cut
    rows.decode(2)
    print(f"{family}: max |engine - PEFT| = {rows.worst:.3g} (tolerance {ATOL})")
    # Each adapter moves the logits far beyond the tolerance, so a wrong module or scale cannot hide in it.
    base = peft_logits(case, None, case.prompts["chat"])
    for name in ADAPTERS:
        assert float((peft_logits(case, name, case.prompts["chat"]) - base).abs().max()) > 100 * ATOL, name


@each_family
def test_trained_adapter_as_downloaded_loads_in_peft_on_every_linear_layer(family, family_cases):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    case = family_cases(family)
    assert sorted(p.name for p in case.trained_dir.iterdir()) == sorted(ADAPTER_FILES)
    written = load_file(str(case.trained_dir / ADAPTER_WEIGHTS))
    base = AutoModelForCausalLM.from_pretrained(case.builtin.name_or_path, dtype=torch.float32)
    head = base.get_output_embeddings()
    linear = {name for name, module in base.named_modules() if isinstance(module, nn.Linear) and module is not head}
    model = PeftModel.from_pretrained(base, case.trained_dir)
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == written.keys()
    for key, tensor in written.items():
        assert torch.equal(loaded[key], tensor), key
    # LoRA on every linear layer of the decoder (Phi-3's fused qkv_proj and gate_up_proj, Qwen2's biased
    # projections) and never on the LM head, which Qwen2 and Gemma 2 tie to the input embeddings.
    assert lora_modules(written) == linear
    assert any(float(t.abs().max()) > 0 for key, t in written.items() if key.endswith(".lora_B.weight"))  # trained


def lora_modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    """The base-model modules an adapter's weights apply to."""
    return {key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for key in tensors}


@each_family
def test_generation_stops_on_every_eos_id_of_the_generation_config(family, family_cases, make_engine, tmp_path):
    from transformers import AutoModelForCausalLM

    case = family_cases(family)
    tokenizer = case.tokenizer
    assert len(case.stop_ids) <= len(STOP_PROMPTS)
    prompts = [render_completion_prompt(text, tokenizer) for text in STOP_PROMPTS[: len(case.stop_ids)]]
    stop_dir = tmp_path / "stop-model"
    expected = build_stop_model(case.builtin.name_or_path, stop_dir, prompts, case.stop_ids)
    # The construction holds: transformers' own greedy generate (which stops on the generation config's EOS
    # ids) gives these completions on the stop model.
    reference = AutoModelForCausalLM.from_pretrained(stop_dir, dtype=torch.float32)
    for ids, completion in zip(prompts, expected, strict=True):
        with torch.inference_mode():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=STOP_STEP + 4, do_sample=False)
        assert out[0, len(ids) :].tolist() == completion

    name = f"{case.builtin.name}-stops"
    registry = BaseModelRegistry(Settings(data_dir=tmp_path / "data", base_models={name: str(stop_dir)}))
    engine = make_engine(registry, max_batch_size=len(prompts), **CPU)
    requests = [
        GenerationRequest(base_model=name, adapter=None, prompt_ids=ids, max_tokens=STOP_STEP + 4, temperature=0.0)
        for ids in prompts
    ]
    got = run_together(engine, requests)
    assert got == [
        (completion_text(tokenizer, ids, completion[:-1]), Finished("stop", len(ids), STOP_STEP))
        for ids, completion in zip(prompts, expected, strict=True)
    ]


@each_family
def test_streamed_text_is_what_the_completion_appends_to_the_prompt(family, registry):
    # Mistral's and Phi-3's decoders strip the leading space of what they decode: the completion " Paris" of "The
    # capital of France is", decoded alone, would read "Paris". Multi-byte characters arrive whole (byte-level
    # tokenizers and byte fallback split them across tokens).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(registry.resolve(f"tiny-{family}").name_or_path)
    prompt = "The capital of France is"
    text = prompt + " Paris, and  that of Japan is \u6771\u4eac \u2014 \u00fcn\u00efc\u00f6d\u00e9!\n  Done."
    ids = render_completion_prompt(text, tokenizer)
    prompt_ids = render_completion_prompt(prompt, tokenizer)
    assert ids[: len(prompt_ids)] == prompt_ids and tokenizer.decode(ids, skip_special_tokens=True) == text
    completion = ids[len(prompt_ids) :]
    detokenizer = IncrementalDetokenizer(tokenizer, context=prompt_ids)
    deltas = [detokenizer.add(token) for token in completion] + [detokenizer.flush()]
    assert "".join(deltas) == text[len(prompt) :]
    assert not any("\ufffd" in delta for delta in deltas)
    # Without the prompt (a chat answer), the text is the completion decoded on its own.
    alone = IncrementalDetokenizer(tokenizer)
    assert "".join([alone.add(token) for token in completion] + [alone.flush()]) == tokenizer.decode(completion)


def test_attention_the_engine_would_compute_differently_is_refused():
    from transformers import PretrainedConfig

    config = PretrainedConfig()
    config.layer_types = ["sliding_attention", "full_attention"]  # Gemma 2's: the mask applies the window
    check_attention_layers(config, "served")
    config.layer_types = ["chunked_attention", "full_attention"]  # Llama 4's: not what the engine's cache does
    with pytest.raises(ServiceUnavailable, match="chunked_attention"):
        check_attention_layers(config, "refused")
