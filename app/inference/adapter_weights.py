"""Reading a PEFT LoRA adapter's weights for serving, safely: safetensors only, validated against the base model
it will run on.

Nothing here unpickles (no `.bin` fallback) or runs code from the adapter directory: the config is JSON and the
weights go through `safetensors`. Every check that can fail for a client's adapter raises a domain error with
`param="model"`, so the API answers 400/404 instead of 500.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from app.errors import InvalidRequest, NotFound
from app.inference.types import AdapterRef
from app.ml.adapter_files import ADAPTER_WEIGHTS, AdapterConfigError, read_adapter_config
from app.ml.registry import BaseModelInfo

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass
class AdapterWeights:
    """LoRA factors per base-model module: A [r, in] and B [out, r] with the LoRA scale folded into B."""

    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


def _refuse(ref: AdapterRef, why: str) -> InvalidRequest:
    return InvalidRequest(f"The model '{ref.name}' cannot be served: {why}", param="model", code="model_not_servable")


def same_base(declared: str | None, base: BaseModelInfo) -> bool:
    """Whether an adapter's `base_model_name_or_path` names `base` (the same string, directory or registry name)."""
    if not declared:
        return False
    if declared in (base.name_or_path, base.name):
        return True
    try:
        return Path(declared).resolve() == Path(base.name_or_path).resolve()
    except OSError:
        return False


def _read_config(ref: AdapterRef) -> dict:
    try:
        return read_adapter_config(Path(ref.path))
    except FileNotFoundError:
        raise NotFound(f"The files of model '{ref.name}' are missing", param="model", code="model_not_found") from None
    except AdapterConfigError as exc:
        raise _refuse(ref, str(exc)) from None


def _check_config(ref: AdapterRef, config: dict, base: BaseModelInfo) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise _refuse(ref, f"only LoRA adapters are served, not {config.get('peft_type')}")
    if not same_base(config.get("base_model_name_or_path"), base):
        raise _refuse(
            ref,
            f"it was trained on '{config.get('base_model_name_or_path')}', not on the base model '{base.name}'",
        )
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
    }
    for option, used in unsupported.items():
        if used:
            raise _refuse(ref, f"the LoRA option '{option}' is not supported for serving")


def _alpha_for(module: str, config: dict) -> float:
    # PEFT's alpha_pattern keys match a module name's suffix; the default alpha applies otherwise.
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def read_adapter(
    ref: AdapterRef,
    base: BaseModelInfo,
    module_shapes: dict[str, tuple[int, int]],
    *,
    max_rank: int,
    dtype: torch.dtype,
) -> AdapterWeights:
    """Load and validate `ref` for `base`; `module_shapes` maps servable module names to (in, out) features."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = _read_config(ref)
    _check_config(ref, config, base)
    weights_path = Path(ref.path) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise _refuse(ref, f"no {ADAPTER_WEIGHTS} (only safetensors weights are loaded)")
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _refuse(ref, f"{ADAPTER_WEIGHTS} is unreadable ({exc})") from None

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise _refuse(ref, f"unexpected tensor '{key}' (only LoRA A/B weights of linear layers are served)")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise _refuse(ref, "the adapter holds no LoRA weights")

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    use_rslora = bool(config.get("use_rslora"))
    for module, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise _refuse(ref, f"module '{module}' lacks its lora_A or lora_B weight")
        if module not in module_shapes:
            raise _refuse(ref, f"module '{module}' is not a linear layer of '{base.name}'")
        a, b = pair["A"], pair["B"]
        in_features, out_features = module_shapes[module]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (out_features, r):
            raise _refuse(
                ref,
                f"module '{module}' has LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} that do not fit '{base.name}'",
            )
        if r > max_rank:
            raise _refuse(ref, f"rank {r} exceeds the largest servable rank {max_rank}")
        alpha = _alpha_for(module, config)
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        modules[module] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
        rank = max(rank, r)
    nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in modules.values())
    return AdapterWeights(rank=rank, modules=modules, nbytes=nbytes)
