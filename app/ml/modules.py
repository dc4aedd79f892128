"""The linear layers of a base model, known from its config alone: what LoRA can target and the engine serves."""

from __future__ import annotations

from functools import lru_cache

from app.ml.base_model import MODEL_CONSTRUCTION


@lru_cache(maxsize=16)
def linear_module_names(name_or_path: str) -> frozenset[str]:
    """Full names of the model's linear layers except the output head (PEFT's "all-linear"), found by building
    the architecture on the meta device: no weights are read or allocated. Raises OSError or ValueError when the
    config cannot be read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    with MODEL_CONSTRUCTION, torch.device("meta"):  # no model load may run inside this meta-device scope
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    head = model.get_output_embeddings()
    return frozenset(
        name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and module is not head
    )


def unmatched_targets(targets: list[str], modules: frozenset[str]) -> list[str]:
    """Entries of a LoRA `target_modules` list that match no layer (PEFT matches a full name or its last parts)."""
    return [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in modules)]


def short_names(modules: frozenset[str]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in modules})
