"""Early stopping on validation loss (off unless a job asks): training ends once `patience` evaluations in a row
have not lowered the best validation loss by more than `min_delta`, and the model published is the best one.

Its state (the best loss, its step, the count since, and the best adapter weights) travels in every checkpoint, so
a resumed run replays the same evaluations to the same decision."""

from __future__ import annotations

import math
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict


class EarlyStopping:
    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best_loss = math.inf
        self.best_step = 0
        self.evaluations_since_best = 0
        self._best_weights: dict[str, torch.Tensor] | None = None

    def observe(self, step: int, valid_loss: float, model: PeftModel) -> bool:
        """Record the full validation loss at `step`; True when it is the new best (kept)."""
        if valid_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.evaluations_since_best = valid_loss, step, 0
            # save_embedding_layers=False: as save_adapter, never ask the Hub whether embeddings were resized.
            weights = get_peft_model_state_dict(model, save_embedding_layers=False)
            self._best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
            return True
        self.evaluations_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.evaluations_since_best >= self.patience

    def restore_best(self, model: PeftModel) -> None:
        """Put the best weights seen back into `model` (no-op before the first evaluation)."""
        if self._best_weights is not None:
            device = next(p.device for p in model.parameters())
            set_peft_model_state_dict(model, {k: v.to(device) for k, v in self._best_weights.items()})

    def reason(self, step: int) -> str:
        if self.should_stop:
            return (
                f"Early stopping at step {step}: the validation loss has not improved by more than "
                f"{self.min_delta:g} in {self.patience} evaluation(s) since step {self.best_step}"
            )
        return f"Training finished at step {step}; the lowest validation loss was at step {self.best_step}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_loss": self.best_loss,
            "best_step": self.best_step,
            "evaluations_since_best": self.evaluations_since_best,
            "best_weights": self._best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss, self.best_step = state["best_loss"], state["best_step"]
        self.evaluations_since_best, self._best_weights = state["evaluations_since_best"], state["best_weights"]
