"""Where models run: one choice of device and weight dtype, shared by training and serving so both see the same
numerics on the same machine."""

from __future__ import annotations

import torch


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 weights when the GPU supports it (training keeps its LoRA weights in fp32), else CPU float32."""
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32
