"""Checkpoints that resume exactly: the PEFT adapter plus optimizer, scheduler, RNG and progress state.

A checkpoint directory is written under a temporary name and renamed into place, so a crash mid-write never
leaves a directory that looks complete. Its adapter files make it loadable for inference as it is.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from app.ml.adapter_files import ADAPTER_WEIGHTS
from worker.training.errors import TrainingError

STATE_FILE = "trainer_state.pt"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def write_atomically(target: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp_dir)`, then rename tmp_dir to `target` (replacing an older copy of the same name)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)
    return target


def save_adapter(model: PeftModel, directory: Path) -> None:
    """The LoRA weights and config, as PEFT loads them and serving accepts them."""
    # The config names the base by its registry name, which is no local path: PEFT's default ("auto") would ask
    # the Hub whether that model's embeddings were resized (a network call on every save). They never are.
    model.save_pretrained(str(directory), save_embedding_layers=False)


def save_checkpoint(
    root: Path,
    step: int,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
) -> Path:
    def write(tmp: Path) -> None:
        save_adapter(model, tmp)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(legacy=False),
            **progress,
        }
        torch.save(state, tmp / STATE_FILE)

    return write_atomically(root / checkpoint_name(step), write)


def load_adapter_weights(model: PeftModel, adapter_dir: Path) -> None:
    """Set the LoRA weights of `model` from a saved adapter (safetensors only) of the same shape."""
    device = next(p.device for p in model.parameters())
    set_peft_model_state_dict(model, load_file(Path(adapter_dir) / ADAPTER_WEIGHTS, device=str(device)))


def load_checkpoint(
    path: Path,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG from `path`; return the saved progress dict."""
    path = Path(path)
    if not (path / STATE_FILE).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise TrainingError("invalid_checkpoint", f"{path.name} is not a complete training checkpoint")
    # weights_only=False: the file is the engine's own (never user-supplied) and holds NumPy's RNG state,
    # which the weights-only unpickler refuses.
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    load_adapter_weights(model, path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    return state
