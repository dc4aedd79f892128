"""Where models run: one choice of device and weight dtype, shared by training and serving so both see the same
numerics on the same machine, and the device-memory bookkeeping of a long-lived process that runs job after job.

On CUDA the base weights are bf16 where the GPU supports it; training then runs its forward and backward under
bf16 autocast while the LoRA weights, their gradients and the optimizer state stay fp32 (PEFT keeps adapter
weights fp32 over a half-precision base), and serving runs the bf16 weights as they are.
"""

from __future__ import annotations

import gc

import torch


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 weights when the GPU supports it (training keeps its LoRA weights in fp32), else CPU float32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), weight_dtype(torch.device("cuda"))
    return torch.device("cpu"), torch.float32


def weight_dtype(device: torch.device) -> torch.dtype:
    """The base weights' dtype on `device`: bf16 on a CUDA GPU that has it (Ampere and later), else float32
    (fp16 weights would need loss scaling in training, which bf16's fp32-sized exponent does without)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype training computes in under autocast on `device`, or None for no autocast (CPU: float32)."""
    return torch.bfloat16 if weight_dtype(device) == torch.bfloat16 else None


def start_memory_accounting() -> dict[str, int]:
    """Reset CUDA's peak-memory counter and return what the process holds now (allocated by tensors, reserved by
    the caching allocator); empty without CUDA. Call before a job, read `peak_memory_bytes` after it."""
    if not torch.cuda.is_available():
        return {}
    torch.cuda.init()  # the allocator's counters exist once CUDA is initialised (a no-op after the first job)
    torch.cuda.reset_peak_memory_stats()
    return {"allocated_bytes": torch.cuda.memory_allocated(), "reserved_bytes": torch.cuda.memory_reserved()}


def peak_memory_bytes() -> int | None:
    """The most CUDA memory tensors held since `start_memory_accounting`, or None without CUDA."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def release_memory() -> None:
    """Free what a finished job left: collect reference cycles (a PEFT-wrapped model and an exception's traceback
    can keep tensors alive), then hand the caching allocator's unused blocks back to the driver, so the next job,
    or another process on the same GPU, starts with the memory free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
