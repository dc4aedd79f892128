"""The built-in family models as the inference tests use them: each family's model with its biases and norm
weights varied (`build_varied_base`), three adapters of it (two random, one trained by the real training loop and
handed out as the download route hands it out), a PEFT reference holding them, prompts (one longer than twice
Gemma 2's window), and a "stop model" whose greedy continuations end on each of the family's stop ids.

A `FamilyCase` is built once per test session and family, on first use (conftest `family_cases`).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.config import Settings
from app.inference import AdapterRef, Finished
from app.ml.adapter_files import adapter_tar
from app.ml.chat import render_chat_prompt, render_completion_prompt
from app.ml.registry import BaseModelInfo, BaseModelRegistry, TrainingDefaults
from tests.inference.adapters import build_random_adapter

FAMILIES = ["llama3", "qwen2", "qwen3", "mistral", "gemma2", "phi3"]
GEMMA2_WINDOW = 64  # tiny-gemma2's sliding window: the long prompt must outgrow it

# Random adapters large enough to change what the random models generate (at the usual 0.05 the tied-embedding
# families keep repeating their last token whatever the adapter); the trained one comes from three real steps.
RANDOM_ADAPTERS = {
    "r4": dict(rank=4, alpha=8, std=0.4),
    "r8-rslora": dict(rank=8, alpha=8, std=0.3, use_rslora=True),
}
TRAINED = "trained"
ADAPTERS = [*RANDOM_ADAPTERS, TRAINED]

LONG_TEXT = "the quick brown fox jumps over the lazy dog while the sleepy cat watches it from the old wall. " * 4
STOP_PROMPTS = ["Case one: the colour of the sky is", "Case two: a list of numbers", "Case three, finally:"]
STOP_STEP = 3  # the stop model emits two tokens of the base model's continuation, then the stop id


@dataclass
class FamilyCase:
    """One family as the engine tests use it. `info` is the family model with varied biases and norm weights
    (`build_varied_base`), served under its own name by `registry`; `builtin` is the registry's built-in one."""

    family: str
    builtin: BaseModelInfo
    info: BaseModelInfo
    registry: BaseModelRegistry
    tokenizer: Any
    peft: Any  # PeftModel over the family's base (float32, CPU) holding every adapter of `adapters`
    adapters: dict[str, AdapterRef]
    prompts: dict[str, list[int]]
    stop_ids: list[int]  # the EOS ids of the model's generation config
    trained_dir: Path  # the trained adapter as the download route serves it (extracted from its tar)

    @property
    def name(self) -> str:
        return self.info.name


def generation_config_stop_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]


def completion_text(tokenizer, prompt: list[int], completion: list[int]) -> str:
    """What `completion` appends to the prompt's text: the reference for the engine's streamed text."""
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    return tokenizer.decode(prompt + completion, skip_special_tokens=True)[len(before) :]


def family_prompts(tokenizer) -> dict[str, list[int]]:
    prompts = {
        "chat": render_chat_prompt([{"role": "user", "content": "Which colour is the sky on a clear day?"}], tokenizer),
        "completion": render_completion_prompt("The capital of France is", tokenizer),
        "short": render_completion_prompt("a", tokenizer),
        "long": render_completion_prompt(LONG_TEXT, tokenizer),
    }
    # Past the window by more than the window: both the prefill and every decode step see tokens it hides.
    assert len(prompts["long"]) > 2 * GEMMA2_WINDOW, len(prompts["long"])
    return prompts


def download_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    """The adapter as a client gets it from GET /v1/models/{model}/adapter: the same tar stream, extracted."""
    data = b"".join(adapter_tar(adapter_dir))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(out_dir, filter="data")
    return out_dir


def train_adapter(info: BaseModelInfo, defaults: TrainingDefaults, out_dir: Path) -> Path:
    """Three steps of the real training loop on a few chat examples, with the service's defaults for the built-in
    family model (all-linear targets): the adapter directory exactly as a job writes it."""
    from app.jobs.spec import resolve_spec
    from worker.training.loop import train

    examples = [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}, {w}!"}]}
        for w in ("red", "green", "blue", "yellow")
    ]
    data = out_dir / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    spec = resolve_spec({"n_epochs": 3, "batch_size": 4}, len(examples), defaults, seed=0)
    result = train(spec, data, None, info, out_dir / "run")
    assert result.adapter_dir is not None
    return result.adapter_dir


def build_varied_base(source_dir: str, out_dir: Path, seed: int) -> Path:
    """The family model with its structural parameters made to matter: the built-in models keep transformers'
    initialisation, where biases are zero and norm weights neutral, so an engine that dropped Qwen2's q/k/v biases
    or a norm's weight would compute the same logits on them. Here biases are random (about the size of the
    projection's own output) and every norm weight moves off its neutral value; nothing else changes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    varied = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            elif "norm" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
            else:
                continue
            varied.append(name)
    assert varied
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(source_dir).save_pretrained(out_dir)
    return out_dir


def build_family_case(registry: BaseModelRegistry, family: str, root: Path) -> FamilyCase:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    builtin = registry.resolve(f"tiny-{family}")
    name = f"tiny-{family}-varied"
    varied_dir = build_varied_base(builtin.name_or_path, root / name, seed=FAMILIES.index(family))
    own_registry = BaseModelRegistry(Settings(data_dir=root / "data", base_models={name: str(varied_dir)}))
    info = own_registry.resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(info.name_or_path)
    base = AutoModelForCausalLM.from_pretrained(info.name_or_path, dtype=torch.float32)
    paths = {
        adapter: build_random_adapter(info.name_or_path, root / adapter, seed=300 + i, base_model=base, **options)
        for i, (adapter, options) in enumerate(RANDOM_ADAPTERS.items())
    }
    trained_dir = download_adapter(train_adapter(info, builtin.defaults, root / "training"), root / "downloaded")
    paths[TRAINED] = trained_dir
    peft = None
    for adapter, path in paths.items():
        if peft is None:
            peft = PeftModel.from_pretrained(base, path, adapter_name=adapter)
        else:
            peft.load_adapter(path, adapter_name=adapter)
    return FamilyCase(
        family=family,
        builtin=builtin,
        info=info,
        registry=own_registry,
        tokenizer=tokenizer,
        peft=peft.eval(),
        adapters={a: AdapterRef(name=f"ft:{name}:test::{a}", path=path) for a, path in paths.items()},
        prompts=family_prompts(tokenizer),
        stop_ids=generation_config_stop_ids(base),
        trained_dir=trained_dir,
    )


def peft_greedy(
    case: FamilyCase, adapter: str | None, prompt: list[int], max_tokens: int, continues_prompt: bool = True
) -> tuple[str, Finished]:
    """PEFT's own greedy `generate` for one request alone (None: the base model), with the stop ids of the
    model's generation config as transformers applies them; as the engine reports it (the text read after the
    prompt, or on its own: `GenerationRequest.continues_prompt`)."""
    inputs = torch.tensor([prompt])
    options = dict(
        attention_mask=torch.ones_like(inputs),
        max_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=case.tokenizer.pad_token_id if case.tokenizer.pad_token_id is not None else case.stop_ids[0],
    )
    with torch.inference_mode():
        if adapter is None:
            with case.peft.disable_adapter():
                output = case.peft.generate(inputs, **options)
        else:
            case.peft.set_adapter(adapter)
            output = case.peft.generate(inputs, **options)
    new = output[0, len(prompt) :].tolist()
    stopped = bool(new) and new[-1] in case.stop_ids
    text = completion_text(case.tokenizer, prompt if continues_prompt else [], new[:-1] if stopped else new)
    return text, Finished("stop" if stopped else "length", len(prompt), len(new))


def lm_head_inputs(model, ids: list[int]) -> torch.Tensor:
    """The final hidden states [len(ids), hidden] the LM head reads (after the final norm)."""
    captured: list[torch.Tensor] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: captured.append(args[0]))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        hook.remove()
    return captured[0][0].float()


def build_stop_model(base_dir: str, out_dir: Path, prompts: list[list[int]], stop_ids: list[int]) -> list[list[int]]:
    """A copy of the base model whose greedy continuation of `prompts[i]` is the base model's own first
    STOP_STEP - 1 tokens, then `stop_ids[i]`. Returns each prompt's expected completion (stop id included).

    Only the LM head rows of the stop ids change: row `stop_ids[i]` becomes a multiple of the part of the hidden
    state at prompt i's stop step that is orthogonal to every other hidden state involved, so its logit is 0
    wherever no stop is wanted and larger than every other logit at prompt i's stop step. With tied embeddings
    the stop tokens' input embeddings change too; no prompt or continuation here holds a stop token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    continuations, quiet, fire = [], [], []
    for ids in prompts:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=STOP_STEP - 1, do_sample=False, pad_token_id=stop_ids[0]
            )
        continuation = out[0, len(ids) :].tolist()
        assert len(continuation) == STOP_STEP - 1 and not set(ids + continuation) & set(stop_ids)
        hidden = lm_head_inputs(model, ids + continuation)[len(ids) - 1 :]  # predictions of steps 1..STOP_STEP
        quiet.append(hidden[:-1])
        fire.append(hidden[-1])
        continuations.append(continuation)
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        for i, stop in enumerate(stop_ids):
            others = torch.cat([*quiet, *(f[None] for j, f in enumerate(fire) if j != i)]).double()
            basis, _ = torch.linalg.qr(others.T)  # orthonormal columns spanning the other hidden states
            h = fire[i].double()
            u = h - basis @ (basis.T @ h)
            raw = (head.double() @ h).max()  # the largest logit there before the change
            head[stop] = (u * (raw.abs() + 20.0) / (u @ h)).to(head.dtype)  # its logit: raw + 20 there, 0 elsewhere
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return [c + [s] for c, s in zip(continuations, stop_ids, strict=True)]
