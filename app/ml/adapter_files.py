"""A LoRA adapter as files: the directory PEFT writes, training continues from, serving loads and the API hands
out. The file names and the reading of `adapter_config.json` live here, for the worker and the API alike.

Only the config (JSON) and the weights (safetensors) make an adapter; a checkpoint directory holds more (its
optimizer and RNG state), which never leaves the server.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)

TAR_READ_BYTES = 1024 * 1024


class AdapterConfigError(ValueError):
    """`adapter_config.json` is there but is not a JSON object."""


def read_adapter_config(directory: Path) -> dict:
    """The adapter's PEFT config. Raises FileNotFoundError without one, AdapterConfigError if it is not a JSON
    object (the file comes from a client's upload or a past run: nothing in it is trusted)."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise AdapterConfigError(f"{ADAPTER_CONFIG} is not valid JSON") from None
    if not isinstance(config, dict):
        raise AdapterConfigError(f"{ADAPTER_CONFIG} is not a JSON object")
    return config


def lora_shape(config: dict) -> dict:
    """The LoRA hyperparameters an adapter was trained with, named as the training spec names them: a job that
    continues from the adapter must train factors of the same shape."""
    return {
        "lora_r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "target_modules": sorted(config["target_modules"]),
        "use_rslora": bool(config.get("use_rslora", False)),
    }


def adapter_tar(directory: Path) -> Iterator[bytes]:
    """The adapter as an uncompressed tar with its two files at the top level, streamed without buffering the
    whole archive: each member is its 512-byte header, its bytes, and padding to a 512-byte block."""
    for name in ADAPTER_FILES:
        path = Path(directory) / name
        member = tarfile.TarInfo(name)
        member.size, member.mtime, member.mode = path.stat().st_size, int(path.stat().st_mtime), 0o644
        yield member.tobuf(format=tarfile.PAX_FORMAT)
        with open(path, "rb") as f:
            while chunk := f.read(TAR_READ_BYTES):
                yield chunk
        if member.size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - member.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end of archive
