"""Building small LoRA adapters for the tiny model without training: random, non-zero B so each one differs."""

from __future__ import annotations

from pathlib import Path

import torch


def build_random_adapter(
    base_dir: str,
    out_dir: Path,
    *,
    seed: int,
    rank: int = 8,
    alpha: int = 16,
    target_modules: str | list[str] = "all-linear",
    std: float = 0.05,
    use_rslora: bool = False,
    alpha_pattern: dict[str, float] | None = None,
    rank_pattern: dict[str, int] | None = None,
    base_model=None,
) -> Path:
    """Write a PEFT LoRA adapter of the model at `base_dir` into `out_dir` (safetensors) and return `out_dir`.

    `use_rslora`, `alpha_pattern` and `rank_pattern` are passed to `LoraConfig` as they are (per-module alpha and
    rank overrides keyed by module-name patterns). `base_model` may be a loaded copy to reuse (PEFT wraps it in
    place, so it is unloaded again afterwards).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = base_model or AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        lora_dropout=0.0,
        use_rslora=use_rslora,
        alpha_pattern=alpha_pattern or {},
        rank_pattern=rank_pattern or {},
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, std)
    peft_model.save_pretrained(out_dir)
    peft_model.unload()  # give the base model back unwrapped for the next adapter
    return Path(out_dir)
