"""Base models a job may fine-tune: `TUNESERVE_BASE_MODELS` (name -> local dir or hub id), `tuneserve-tiny` and
the built-in family models (`tiny-llama3`, `tiny-qwen2`, ...; app.ml.families).

Training defaults live here, with the model they suit: a random tiny model needs a learning rate two orders
of magnitude above what a pretrained 1B model tolerates, so one global default would be wrong for both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from app.config import Settings
from app.errors import NotFound
from app.ml.families import FAMILIES, ensure_family_model, family_of_model_name
from app.ml.families.specs import CONTEXT_LENGTH as FAMILY_CONTEXT_LENGTH
from app.ml.tiny import TINY_CONTEXT_LENGTH, TINY_MODEL_NAME, ensure_tiny_model


@dataclass(frozen=True)
class TrainingDefaults:
    """Per-base-model defaults that `app.jobs.spec.resolve_spec` starts from.

    `learning_rate` is what `learning_rate_multiplier=1` means. `auto_min_target_examples` is the least number
    of example passes (examples x epochs) "auto" epochs aims for, so small datasets still see enough passes.
    """

    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_seq_length: int = 2048
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    auto_min_target_examples: int = 100
    auto_max_batch_size: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


# A pretrained model fine-tunes gently; the random tiny model has everything to learn, and fast.
PRETRAINED_DEFAULTS = TrainingDefaults()
TINY_DEFAULTS = TrainingDefaults(
    learning_rate=3e-3,
    lora_r=16,
    lora_alpha=32,
    lora_dropout=0.0,
    max_seq_length=1024,
    warmup_ratio=0.05,
    auto_min_target_examples=960,
    auto_max_batch_size=16,
)


@dataclass(frozen=True)
class BaseModelInfo:
    """A resolved base model.

    `path` is the local directory (for a hub id it is the id as a Path, and `name_or_path` is what to hand to
    `from_pretrained`: the directory as a string, or the hub id unchanged).
    """

    name: str
    path: Path
    name_or_path: str
    defaults: TrainingDefaults = field(default_factory=TrainingDefaults)
    context_length: int | None = None
    builtin: bool = False


class BaseModelRegistry:
    """Names -> base models. `names()` lists them; `resolve(name)` returns a `BaseModelInfo`.

    Built-in models are built into `settings.data_dir` on their first `resolve` (not on construction, so listing
    names stays cheap). Entries in `settings.base_models` may override a built-in name deliberately.
    """

    def __init__(self, settings: Settings):
        self._data_dir = Path(settings.data_dir)
        self._configured = dict(settings.base_models)

    def names(self) -> list[str]:
        return sorted({TINY_MODEL_NAME, *(f.model_name for f in FAMILIES.values()), *self._configured})

    def resolve(self, name: str) -> BaseModelInfo:
        if name in self._configured:
            return _configured_model(name, self._configured[name])
        if name == TINY_MODEL_NAME:
            path = ensure_tiny_model(self._data_dir)
            return BaseModelInfo(
                name=name,
                path=path,
                name_or_path=str(path.resolve()),
                defaults=TINY_DEFAULTS,
                context_length=TINY_CONTEXT_LENGTH,
                builtin=True,
            )
        family = family_of_model_name(name)
        if family is not None:
            path = ensure_family_model(self._data_dir, family.name)
            return BaseModelInfo(
                name=name,
                path=path,
                name_or_path=str(path.resolve()),
                defaults=TINY_DEFAULTS,  # random weights like tuneserve-tiny's, at the same size
                context_length=FAMILY_CONTEXT_LENGTH,
                builtin=True,
            )
        known = ", ".join(self.names())
        raise NotFound(
            f"The model '{name}' does not exist or is not a base model. Known base models: {known}",
            param="model",
            code="model_not_found",
        )


def _configured_model(name: str, location: str) -> BaseModelInfo:
    path = Path(location).expanduser()
    if path.is_dir():
        context = _context_length(path)
        defaults = PRETRAINED_DEFAULTS
        if context is not None and context < defaults.max_seq_length:
            defaults = replace(defaults, max_seq_length=context)
        return BaseModelInfo(
            name=name, path=path, name_or_path=str(path.resolve()), defaults=defaults, context_length=context
        )
    # A hub id: passed through unchanged; without network access it fails at load time, with a clear error there.
    return BaseModelInfo(name=name, path=Path(location), name_or_path=location, defaults=PRETRAINED_DEFAULTS)


def _context_length(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") or config.get("n_positions")
    return int(value) if isinstance(value, int) else None
