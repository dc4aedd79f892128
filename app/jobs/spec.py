"""The resolved training spec: OpenAI's hyperparameters ("auto" or a number) plus LoRA and engine options.

`resolve_spec` is pure: the same request, dataset size, base-model defaults and seed give the same spec.
Its `to_dict()` is what the job echoes as the resolved `hyperparameters`.

"auto" rules (also in docs/training.md):
- n_epochs: 3, raised so that examples x epochs reaches the base model's `auto_min_target_examples`
  (a small dataset still gets enough passes), lowered so it does not exceed 25,000; always within 1..50.
- batch_size: the largest power of two <= n_examples / 16, within 1..`auto_max_batch_size` of the base model.
- learning_rate_multiplier: 1, i.e. the base model's default learning rate.
- DPO's learning rate is a tenth of the supervised one at the same multiplier: its gradients are large while the
  chosen and rejected answers are still close (TRL's defaults differ 20-fold).
- lora_dropout for DPO: 0 (the policy is compared with its reference on the same answers), unless given.
- beta (DPO only): 0.1, the strength of the pull towards the reference model, as OpenAI and TRL default it.
- eval_every: the steps between validation-sample evaluations, so that they cost about 2.5% of training (a forward
  pass over VALID_SAMPLE examples, about half a step's cost per batch_size of them, every SAMPLE_EVERY_EXAMPLES
  examples trained; the full evaluations at checkpoints come on top), and at most about 20 in a job.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, overload

from app.errors import InvalidRequest

if TYPE_CHECKING:  # imported when needed at runtime: the registry brings in the tiny model's builder
    from app.ml.registry import TrainingDefaults

AUTO = "auto"
DEFAULT_SEED = 42
MAX_TARGET_EXAMPLES = 25_000
TARGET_EPOCHS = 3
LR_SCHEDULERS = ("linear", "cosine", "constant")
LONG_EXAMPLE_POLICIES = ("drop", "truncate_left")
METHODS = ("supervised", "dpo")
DEFAULT_BETA = 0.1
DPO_LEARNING_RATE_SCALE = 0.1
# Validation examples scored every `eval_every` steps (the full set is scored at every checkpoint).
VALID_SAMPLE = 32
# Examples trained per sample evaluation under "auto": a forward pass costs about half a step, so the samples cost
# about 2.5% of training; the whole set is also scored at each checkpoint (measured: the two together, at 3
# checkpoints and a validation set a fifth of the training set's size, about 9%).
SAMPLE_EVERY_EXAMPLES = 20 * VALID_SAMPLE
MAX_SAMPLE_EVALUATIONS = 20
# Spec fields that change what is measured during a run, never the weights it trains.
_MEASUREMENT_ONLY = frozenset({"eval_every", "metrics_every"})
# Aliases accepted in requests (the issue and users say `r`, `alpha`, `dropout`).
_ALIASES = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout"}


@dataclass(frozen=True)
class TrainingSpec:
    """Every number the loop needs, resolved. `batch_size` is examples per optimizer step; the step's
    examples are processed in micro-batches (`micro_batch_size` rows when packing, examples when padded;
    None = as many as fit in `micro_batch_tokens`; its None is a device default, see loop.py), with gradients
    accumulated and normalised by the step's supervised-token count, so the micro-batching never changes the
    result beyond float rounding."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: str | list[str]
    use_rslora: bool
    max_seq_length: int
    warmup_ratio: float
    weight_decay: float
    lr_scheduler: str
    max_grad_norm: float
    n_checkpoints: int
    eval_every: int
    metrics_every: int
    seed: int
    packing: bool = True
    long_example_policy: str = "drop"
    micro_batch_size: int | None = None
    micro_batch_tokens: int | None = None
    # {"patience": evaluations without improvement, "min_delta": the least that counts as one}, or None (off).
    early_stopping: dict[str, float] | None = None
    # "supervised" (next-token loss on the answers) or "dpo" (preference pairs; `beta` is then set).
    method: str = "supervised"
    beta: float | None = None
    auto: list[str] = field(default_factory=list)  # which of the OpenAI three were "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def continues(self, saved: Mapping[str, Any]) -> bool:
        """Whether a checkpoint written under `saved` (an earlier `to_dict()`, perhaps of an older version) trains
        on exactly as this spec would. Only when it is measured differs (`eval_every`, `metrics_every`), and a
        field added since that holds its default, do not count: a job in flight across an upgrade resumes."""
        current = self.to_dict()
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        return all(
            saved.get(name, defaults.get(name, MISSING)) == value
            for name, value in current.items()
            if name not in _MEASUREMENT_ONLY
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingSpec:
        return cls(**data)


def _defaults_dict(defaults: TrainingDefaults | Mapping[str, Any] | None) -> dict[str, Any]:
    if defaults is None:
        from app.ml.registry import TrainingDefaults

        return TrainingDefaults().to_dict()
    return dict(defaults) if isinstance(defaults, Mapping) else defaults.to_dict()


def _bad(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=f"hyperparameters.{name}", code="invalid_hyperparameters")


@overload
def _number(
    hp: Mapping[str, Any],
    name: str,
    default: float | None,
    *,
    kind: type[int],
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> int: ...


@overload
def _number(
    hp: Mapping[str, Any],
    name: str,
    default: float | None,
    *,
    kind: type[float] = float,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float: ...


def _number(
    hp: Mapping[str, Any],
    name: str,
    default: float | None,
    *,
    kind: type[float] = float,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    """The number `name` in `hp` (or `default`), as `kind` (int or float), within the bounds."""
    value = hp.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, f"{name} must be a number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise _bad(name, f"{name} must be an integer, got {value!r}")
    value = kind(value)
    if not math.isfinite(value):
        raise _bad(name, f"{name} must be finite")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise _bad(name, f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise _bad(name, f"{name} must be <= {hi}, got {value}")
    return value


def _flag(hp: Mapping[str, Any], name: str, default: bool) -> bool:
    value = hp.get(name, default)
    if not isinstance(value, bool):
        raise _bad(name, f"{name} must be true or false, got {value!r}")
    return value


def _choice(hp: Mapping[str, Any], name: str, default: str, choices: Collection[str]) -> str:
    value = hp.get(name, default)
    if value not in choices:
        raise _bad(name, f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def auto_n_epochs(n_examples: int, min_target_examples: int) -> int:
    epochs = TARGET_EPOCHS
    if n_examples * epochs < min_target_examples:
        epochs = math.ceil(min_target_examples / n_examples)
    elif n_examples * epochs > MAX_TARGET_EXAMPLES:
        epochs = MAX_TARGET_EXAMPLES // n_examples
    return max(1, min(50, epochs))


def auto_batch_size(n_examples: int, max_batch_size: int) -> int:
    target = n_examples / 16
    size = 2 ** math.floor(math.log2(target)) if target >= 1 else 1
    return max(1, min(max_batch_size, 256, size))


def auto_eval_every(total_steps: int, batch_size: int) -> int:
    by_cost = math.ceil(SAMPLE_EVERY_EXAMPLES / batch_size)
    return max(1, by_cost, math.ceil(total_steps / MAX_SAMPLE_EVALUATIONS))


def _early_stopping(value: Any) -> dict[str, float] | None:
    """`{"patience": N, "min_delta": x}` (min_delta defaults to 0), or None when off."""
    if value is None:
        return None
    usage = 'early_stopping must be {"patience": N, "min_delta": x}, N an integer >= 1, x a number >= 0.'
    if not isinstance(value, dict) or not value.keys() <= {"patience", "min_delta"} or "patience" not in value:
        raise InvalidRequest(usage, param="early_stopping", code="invalid_hyperparameters")
    patience, min_delta = value["patience"], value.get("min_delta", 0.0)
    for name, number in (("patience", patience), ("min_delta", min_delta)):
        if isinstance(number, bool) or not isinstance(number, int | float) or not 0 <= number < math.inf:
            raise InvalidRequest(usage, param=f"early_stopping.{name}", code="invalid_hyperparameters")
    if not float(patience).is_integer() or not 1 <= patience <= 1000:
        raise InvalidRequest(usage, param="early_stopping.patience", code="invalid_hyperparameters")
    return {"patience": int(patience), "min_delta": float(min_delta)}


def _beta(hp: Mapping[str, Any]) -> float:
    if hp.get("beta", AUTO) == AUTO:
        return DEFAULT_BETA
    return _number(hp, "beta", None, lo=0, hi=100, lo_open=True)


def resolve_spec(
    hyperparameters: Mapping[str, Any] | None,
    n_train_examples: int,
    defaults: TrainingDefaults | Mapping[str, Any] | None = None,
    seed: int | None = None,
    method: str = "supervised",
) -> TrainingSpec:
    """Resolve a request's hyperparameters against a dataset size and a base model's `TrainingDefaults`, for a
    method of METHODS (`beta` is a hyperparameter of "dpo" only).

    Raises `InvalidRequest(param="hyperparameters.<name>")` for unknown names or out-of-range values.
    """
    hp = {_ALIASES.get(k, k): v for k, v in (hyperparameters or {}).items()}
    d = _defaults_dict(defaults)
    if method not in METHODS:
        raise InvalidRequest(f"unknown method {method!r}", param="method.type", code="unsupported_method")
    excluded = {"learning_rate", "auto", "method"} | ({"beta"} if method != "dpo" else set())
    known = {f for f in TrainingSpec.__dataclass_fields__ if f not in excluded}
    for name in hp:
        if name not in known:
            raise _bad(name, f"unknown hyperparameter {name!r}; known: {', '.join(sorted(known))}")
    if n_train_examples < 1:
        raise InvalidRequest("the training file has no examples", param="training_file", code="invalid_n_examples")

    auto = [k for k in ("n_epochs", "batch_size", "learning_rate_multiplier") if hp.get(k, AUTO) == AUTO]
    n_epochs = (
        auto_n_epochs(n_train_examples, d["auto_min_target_examples"])
        if "n_epochs" in auto
        else _number(hp, "n_epochs", None, kind=int, lo=1, hi=50)
    )
    batch_size = (
        auto_batch_size(n_train_examples, d["auto_max_batch_size"])
        if "batch_size" in auto
        else _number(hp, "batch_size", None, kind=int, lo=1, hi=256)
    )
    multiplier = (
        1.0
        if "learning_rate_multiplier" in auto
        else _number(hp, "learning_rate_multiplier", None, lo=0, hi=1000, lo_open=True)
    )

    target_modules = hp.get("target_modules", "all-linear")
    if target_modules != "all-linear" and (
        not isinstance(target_modules, list)
        or not target_modules
        or not all(isinstance(m, str) and m for m in target_modules)
    ):
        raise _bad("target_modules", 'target_modules must be "all-linear" or a non-empty list of module names')

    micro = hp.get("micro_batch_size")
    if micro is not None:
        micro = _number(hp, "micro_batch_size", None, kind=int, lo=1, hi=4096)
    if seed is None:
        seed = DEFAULT_SEED
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**31 - 1:
        raise InvalidRequest("seed must be an integer in 0..2147483647", param="seed")

    return TrainingSpec(
        n_epochs=n_epochs,
        batch_size=batch_size,
        learning_rate_multiplier=multiplier,
        learning_rate=d["learning_rate"] * multiplier * (DPO_LEARNING_RATE_SCALE if method == "dpo" else 1.0),
        lora_r=_number(hp, "lora_r", d["lora_r"], kind=int, lo=1, hi=1024),
        lora_alpha=_number(hp, "lora_alpha", d["lora_alpha"], lo=0, hi=4096, lo_open=True),
        # DPO compares the policy with its reference on the same answers: dropout would add noise to every margin
        # (TRL turns it off for DPO too), so it is off unless asked for.
        lora_dropout=_number(hp, "lora_dropout", 0.0 if method == "dpo" else d["lora_dropout"], lo=0, hi=0.9),
        target_modules=target_modules,
        use_rslora=_flag(hp, "use_rslora", False),
        max_seq_length=_number(hp, "max_seq_length", d["max_seq_length"], kind=int, lo=16, hi=262_144),
        warmup_ratio=_number(hp, "warmup_ratio", d["warmup_ratio"], lo=0, hi=1),
        weight_decay=_number(hp, "weight_decay", d["weight_decay"], lo=0, hi=10),
        lr_scheduler=_choice(hp, "lr_scheduler", d["lr_scheduler"], LR_SCHEDULERS),
        max_grad_norm=_number(hp, "max_grad_norm", d["max_grad_norm"], lo=0, hi=1e6, lo_open=True),
        n_checkpoints=_number(hp, "n_checkpoints", 3, kind=int, lo=0, hi=100),
        eval_every=(
            auto_eval_every(n_epochs * math.ceil(n_train_examples / batch_size), batch_size)
            if hp.get("eval_every", AUTO) == AUTO
            else _number(hp, "eval_every", None, kind=int, lo=1, hi=10**9)
        ),
        metrics_every=_number(hp, "metrics_every", 1, kind=int, lo=1, hi=10**9),
        seed=seed,
        packing=_flag(hp, "packing", True),
        long_example_policy=_choice(hp, "long_example_policy", "drop", LONG_EXAMPLE_POLICIES),
        micro_batch_size=micro,
        micro_batch_tokens=(
            None
            if hp.get("micro_batch_tokens") is None
            else _number(hp, "micro_batch_tokens", None, kind=int, lo=16, hi=10**8)
        ),
        early_stopping=_early_stopping(hp.get("early_stopping")),
        method=method,
        beta=_beta(hp) if method == "dpo" else None,
        auto=auto,
    )
