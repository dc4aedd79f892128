"""The training engine: (spec, JSONL files, base model, output dir, callbacks) -> a PEFT LoRA adapter.

A plain loop rather than transformers' `Trainer`: the step here is defined by examples (OpenAI's batch_size),
packed into rows per step, with gradients normalised by the step's supervised-token count across all its
micro-batches and the LM head run only on supervised positions. Trainer would need a custom data collator,
compute_loss, sampler and checkpoint/resume hooks to do the same, and its per-step overhead is measurable on
a small model. See docs/training.md.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedModel

from app.jobs.spec import VALID_SAMPLE, TrainingSpec
from app.ml.base_model import load_causal_lm, load_tokenizer
from app.ml.device import pick_device, weight_dtype
from app.ml.registry import BaseModelInfo
from worker.training.attention import PACKED_FLASH_ATTENTION, SEGMENT_ATTENTION, flash_attention_available
from worker.training.callbacks import StopRequest, TrainingCallbacks
from worker.training.checkpoint import (
    load_adapter_weights,
    load_checkpoint,
    save_adapter,
    save_checkpoint,
    write_atomically,
)
from worker.training.data import TokenizedDataset
from worker.training.devices import DeviceGroup
from worker.training.dpo import PairScore
from worker.training.early_stopping import EarlyStopping
from worker.training.errors import TrainingError
from worker.training.evaluation import ExampleScore
from worker.training.objective import objective_for
from worker.training.packing import plan_epoch


def _csv_columns(accuracy: str, *extra: str) -> tuple[str, ...]:
    """OpenAI's columns (train_accuracy included), then the metric rows' own names for the same figures (`accuracy`:
    the objective's accuracy_name) and the objective's `extra` figures."""
    return (
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        f"valid_{accuracy}",
        f"train_{accuracy}",
        "full_valid_loss",
        f"full_valid_{accuracy}",
        *extra,
    )


RESULT_CSV_COLUMNS = _csv_columns("mean_token_accuracy")
# DPO's: its loss, the share of pairs preferred, and the rewards (worker/training/dpo.py).
DPO_CSV_COLUMNS = _csv_columns("reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected")


@dataclass
class TrainingResult:
    """What a run produced. `adapter_dir` is None unless the run finished (`stopped` is None)."""

    adapter_dir: Path | None
    metrics_rows: list[dict[str, Any]]
    trained_tokens: int  # tokens processed (prompt and answer, every epoch), padding excluded
    supervised_tokens: int  # tokens the loss was computed on
    n_steps: int  # optimizer steps completed
    total_steps: int
    stopped: StopRequest  # None, "cancel" or "pause"
    spec: dict[str, Any]
    n_examples: int
    n_dropped_too_long: int
    n_truncated: int
    n_dropped_no_supervised: int
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)
    last_checkpoint: Path | None = None
    full_valid_loss: float | None = None
    full_valid_accuracy: float | None = None  # token accuracy (DPO: reward accuracy)
    # This run alone (a resumed run leaves out what its checkpoint had): tokens trained, and the wall seconds its
    # optimizer steps took (evaluation and checkpoints excluded; on CUDA the last step is waited for).
    run_tokens: int = 0
    train_seconds: float = 0.0
    # With early stopping: what it decided, in a sentence, and the step whose weights are the adapter.
    early_stopping: str | None = None
    best_step: int | None = None
    # Every training example (DPO: pair) scored by the final adapter, worst first (main rank only).
    example_scores: Sequence[ExampleScore | PairScore] = field(default_factory=list)

    def metrics_csv(self) -> str:
        """The result file: one row per metrics row, RESULT_CSV_COLUMNS (DPO_CSV_COLUMNS for a DPO job)."""
        columns = DPO_CSV_COLUMNS if self.spec.get("method") == "dpo" else RESULT_CSV_COLUMNS
        lines = [",".join(columns)]
        for row in self.metrics_rows:
            lines.append(",".join("" if row.get(c) is None else f"{row[c]:.6g}" for c in columns))
        return "\n".join(lines) + "\n"


def default_attention(device: torch.device) -> str:
    """Per-example attention on CPU (measured faster: no T x T mask, causal halves skipped); on CUDA
    FlashAttention's varlen kernel over the packed examples where `flash_attn` is installed, else the standard
    SDPA path, where transformers builds the block-diagonal mask from the position ids."""
    if device.type == "cpu":
        return SEGMENT_ATTENTION
    return PACKED_FLASH_ATTENTION if flash_attention_available() else "sdpa"


def load_base_model(
    name_or_path: str, device: torch.device, dtype: torch.dtype, attn_implementation: str | None = None
) -> PreTrainedModel:
    try:
        model = load_causal_lm(
            name_or_path,
            device=device,
            dtype=dtype,
            attn_implementation=attn_implementation or default_attention(device),
        )
    except (OSError, ValueError) as exc:
        raise TrainingError("base_model_unavailable", f"cannot load base model {name_or_path}: {exc}") from None
    model.config.use_cache = False  # a cache object would disable packed-sequence masking
    return model


def build_lora_model(model: PreTrainedModel, spec: TrainingSpec) -> PeftModel:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.lora_r,
        # peft annotates lora_alpha as int but only ever divides by it (scaling = alpha / r, or / sqrt(r)), and
        # a request may ask for a fractional alpha.
        lora_alpha=spec.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=spec.lora_dropout,
        target_modules=spec.target_modules,
        use_rslora=spec.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # LoRA A matrices are initialised randomly: seed right before, so the same seed gives the same start.
    torch.manual_seed(spec.seed)
    return get_peft_model(model, config)


def lr_lambda(spec: TrainingSpec, total_steps: int) -> Callable[[int], float]:
    warmup = math.ceil(spec.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if spec.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if spec.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _checkpoint_steps(spec: TrainingSpec, total_steps: int) -> set[int]:
    n = min(spec.n_checkpoints, total_steps)
    return {round(total_steps * k / n) for k in range(1, n + 1)} if n else set()


def train(
    spec: TrainingSpec | dict[str, Any],
    train_path: Path,
    validation_path: Path | None,
    base_model: BaseModelInfo | str | Path,
    output_dir: Path,
    callbacks: TrainingCallbacks | None = None,
    resume_from: Path | None = None,
    init_adapter: Path | None = None,
    devices: DeviceGroup | None = None,
) -> TrainingResult:
    """Train a LoRA adapter and return a `TrainingResult`.

    `base_model` is an `app.ml.registry.BaseModelInfo` or a local model directory / hub id. Checkpoints go to
    `output_dir/checkpoints/checkpoint-NNNNNN`, the final adapter to `output_dir/adapter`. With `resume_from`
    (a checkpoint dir of a run with the same spec and data) training continues exactly where it stopped.
    With `init_adapter` (a saved adapter of the same LoRA shape) training starts from its weights instead of
    a fresh LoRA initialisation: continuing to fine-tune a fine-tuned model.
    With `devices` (a `worker.training.devices.DistributedGroup`; see worker/training/ranks.py) this process is
    one rank of a data-parallel group: every rank runs this with the same arguments, each trains on its share of
    every step, and only rank 0 writes checkpoints and the adapter and calls `callbacks` with anything to write.
    Raises `TrainingError` for conditions the user can fix (no example fits, NaN loss, ...).
    """
    spec = TrainingSpec.from_dict(spec) if isinstance(spec, dict) else spec
    callbacks = callbacks or TrainingCallbacks()
    output_dir = Path(output_dir)
    if isinstance(base_model, BaseModelInfo):
        name_or_path, context_length = base_model.name_or_path, base_model.context_length
        # Adapters name their base by its registry name, not this machine's path to it: they are served by
        # other machines, whose data directories differ.
        recorded_base = base_model.name
    else:
        name_or_path, context_length = str(base_model), None
        recorded_base = name_or_path
    if context_length and spec.max_seq_length > context_length:
        raise TrainingError(
            "max_seq_length_too_long",
            f"max_seq_length {spec.max_seq_length} exceeds the base model's context length {context_length}",
            param="hyperparameters.max_seq_length",
        )
    group = devices or DeviceGroup(pick_device()[0])
    device, dtype = group.device, weight_dtype(group.device)
    tokenizer = load_tokenizer(name_or_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    objective = objective_for(spec, tokenizer, group, pad_id)
    accuracy = objective.accuracy_name

    train_data: TokenizedDataset[Any] = objective.load(train_path, "training_file")
    _require_examples(train_data, spec)
    valid_examples: list[Any] = []
    if validation_path is not None:
        valid_examples = objective.load(validation_path, "validation_file").examples

    _seed_everything(spec.seed)
    model = build_lora_model(load_base_model(name_or_path, device, dtype), spec)
    model.peft_config["default"].base_model_name_or_path = recorded_base
    if init_adapter is not None:
        load_adapter_weights(model, init_adapter)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    n_examples = len(train_data.examples)
    steps_per_epoch = math.ceil(n_examples / spec.batch_size)
    total_steps = spec.n_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))

    rows: list[dict[str, Any]] = []
    state: dict[str, Any] = {}  # of the checkpoint resumed from
    checkpoints: list[tuple[int, Path]] = []
    trained_tokens = supervised_tokens = 0
    start_step = 0
    if resume_from is not None:
        state = load_checkpoint(Path(resume_from), model, optimizer, scheduler)
        if not spec.continues(state["spec"]) or state["n_examples"] != n_examples:
            raise TrainingError("checkpoint_mismatch", "the checkpoint was written for a different spec or dataset")
        start_step = state["step"]
        rows, trained_tokens, supervised_tokens = state["rows"], state["trained_tokens"], state["supervised_tokens"]
    saved = state.get("objective")
    objective.prepare(model, train_data.examples + valid_examples, saved, from_adapter=init_adapter is not None)
    if group.rank:
        # Rank 0 draws LoRA dropout from the seed (or the checkpoint's RNG state); the others draw their own.
        torch.manual_seed(int(np.random.SeedSequence([spec.seed, group.rank, start_step]).generate_state(1)[0]))
    early = None
    if valid_examples and spec.early_stopping:
        early = EarlyStopping(int(spec.early_stopping["patience"]), spec.early_stopping["min_delta"])
        if state.get("early_stopping") is not None:
            early.load_state_dict(state["early_stopping"])
    step_forward = objective.wrap(model)  # DDP-wrapped in a group of ranks
    resumed_tokens, train_seconds = trained_tokens, 0.0

    def result(
        stopped: StopRequest, adapter_dir: Path | None, step: int, last_ckpt: Path | None = None
    ) -> TrainingResult:
        final = rows[-1] if rows and stopped is None else {}
        return TrainingResult(
            adapter_dir=adapter_dir,
            metrics_rows=rows,
            trained_tokens=trained_tokens,
            supervised_tokens=supervised_tokens,
            n_steps=step,
            total_steps=total_steps,
            stopped=stopped,
            spec=spec.to_dict(),
            n_examples=n_examples,
            n_dropped_too_long=train_data.n_dropped_too_long,
            n_truncated=train_data.n_truncated,
            n_dropped_no_supervised=train_data.n_dropped_no_supervised,
            checkpoints=checkpoints,
            last_checkpoint=last_ckpt or (checkpoints[-1][1] if checkpoints else None),
            full_valid_loss=final.get("full_valid_loss"),
            full_valid_accuracy=final.get(f"full_valid_{accuracy}"),
            run_tokens=trained_tokens - resumed_tokens,
            train_seconds=train_seconds,
        )

    def checkpoint(step: int) -> Path | None:
        if not group.is_main:
            return None
        progress = {
            "rows": rows,
            "trained_tokens": trained_tokens,
            "supervised_tokens": supervised_tokens,
            "spec": spec.to_dict(),
            "n_examples": n_examples,
            "early_stopping": early.state_dict() if early is not None else None,
            "objective": objective.state(train_data.examples + valid_examples),
        }
        path = save_checkpoint(output_dir / "checkpoints", step, model, optimizer, scheduler, progress)
        checkpoints.append((step, path))
        callbacks.on_checkpoint(step, path, dict(rows[-1]) if rows else {"step": step})
        return path

    def pause_checkpoint(step: int) -> Path | None:
        """A pause needs a checkpoint at `step`; it writes one only if this run has none there yet."""
        if checkpoints and checkpoints[-1][0] == step:
            return checkpoints[-1][1]
        if resume_from is not None and step == start_step:
            return Path(resume_from)
        return checkpoint(step)

    checkpoint_steps = _checkpoint_steps(spec, total_steps)
    plans: dict[int, list[list[int]]] = {}
    started = time.monotonic()
    last_step = start_step
    for step in range(start_step, total_steps):
        if early is not None and early.should_stop:  # also when resuming from the checkpoint where it stopped
            break
        stop = group.agree(callbacks.should_stop())
        if stop == "cancel":
            return result("cancel", None, step)
        if stop == "pause":
            return result("pause", None, step, last_ckpt=pause_checkpoint(step))

        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in plans:
            plans = {epoch: plan_epoch(n_examples, spec.batch_size, spec.seed, epoch)}
        batch = [train_data.examples[i] for i in plans[epoch][index]]
        step_no = step + 1
        is_last = step_no == total_steps
        step_started = time.perf_counter()
        figures = objective.step(step_forward, optimizer, scheduler, trainable, batch)
        if is_last and device.type == "cuda":
            torch.cuda.synchronize(device)  # each step waits for the one before it; the last is waited for here
        train_seconds += time.perf_counter() - step_started
        trained_tokens += figures.n_tokens
        supervised_tokens += figures.n_supervised

        row: dict[str, Any] = {
            "step": step_no,
            "train_loss": figures.loss,
            f"train_{accuracy}": figures.accuracy,
            "train_accuracy": figures.accuracy,
            "grad_norm": figures.grad_norm,
            **figures.extra,
            "valid_loss": None,
            f"valid_{accuracy}": None,
        }
        improved = False
        # The whole validation set at every checkpoint, at the end, and (early stopping decides on it) at every
        # evaluation; a sample of it at the other evaluations.
        evaluating = step_no % spec.eval_every == 0
        if valid_examples and (is_last or step_no in checkpoint_steps or (early and evaluating)):
            full_loss, full_acc = objective.evaluate(model, valid_examples)
            row.update({"valid_loss": full_loss, f"valid_{accuracy}": full_acc})
            row.update({"full_valid_loss": full_loss, f"full_valid_{accuracy}": full_acc})
            improved = early is not None and early.observe(step_no, full_loss, model)
        elif valid_examples and evaluating:
            v_loss, v_acc = objective.evaluate(model, valid_examples[:VALID_SAMPLE])
            row.update({"valid_loss": v_loss, f"valid_{accuracy}": v_acc})
        stopping = early is not None and early.should_stop
        if step_no % spec.metrics_every == 0 or is_last or stopping or row["valid_loss"] is not None:
            rows.append(row)
            callbacks.on_metrics(dict(row))

        done = step_no - start_step
        eta = (time.monotonic() - started) / done * (total_steps - step_no)
        callbacks.on_progress(step_no, total_steps, eta)
        if step_no in checkpoint_steps or improved:  # the best so far is always a checkpoint, a servable model
            checkpoint(step_no)
        last_step = step_no

    if early is not None:
        early.restore_best(model)
    if not group.is_main:
        return result(None, None, last_step)
    adapter_dir = write_atomically(output_dir / "adapter", lambda tmp: save_adapter(model, tmp))
    finished = result(None, adapter_dir, last_step)
    if early is not None:
        finished.early_stopping, finished.best_step = early.reason(last_step), early.best_step
        finished.full_valid_loss = early.best_loss
        finished.full_valid_accuracy = _row_at(rows, early.best_step).get(f"full_valid_{accuracy}")
    finished.example_scores = objective.score(model, train_data.examples)
    return finished


def _row_at(rows: list[dict[str, Any]], step: int) -> dict[str, Any]:
    return next((row for row in rows if row["step"] == step), {})


def _require_examples(data: TokenizedDataset, spec: TrainingSpec) -> None:
    if data.examples:
        return
    counts = data.counts()
    raise TrainingError(
        "no_trainable_examples",
        f"no training example can be used: {counts['n_dropped_too_long']} longer than max_seq_length "
        f"{spec.max_seq_length} (policy {spec.long_example_policy!r}), "
        f"{counts['n_dropped_no_supervised']} with no supervised token, of {counts['n_examples_read']} read",
        param="training_file",
    )
