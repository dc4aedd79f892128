"""How the training loop talks to its caller: metrics, checkpoints, progress, and the stop check.

The loop knows nothing of jobs, databases or queues; the jobs layer subclasses `TrainingCallbacks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

StopRequest = Literal["cancel", "pause"] | None


class TrainingCallbacks:
    """No-op defaults; override what you need.

    - `on_metrics(row)`: a metrics row (keys `step`, `train_loss`, `train_mean_token_accuracy`, `grad_norm` (before
      clipping; a diagnostic the job's events leave out), and with a
      validation set `valid_loss`, `valid_mean_token_accuracy`; the last row also `full_valid_loss`,
      `full_valid_mean_token_accuracy`). A DPO run's rows say `reward_accuracy` for `mean_token_accuracy` and add
      `reward_margin`, `rewards_chosen` and `rewards_rejected`.
    - `on_checkpoint(step, checkpoint_dir, metrics)`: a complete, resumable checkpoint was written (atomically).
    - `should_stop()`: polled before every optimizer step; "cancel" returns without output, "pause" writes a
      checkpoint first and returns.
    - `on_progress(step, total_steps, eta_seconds)`: after every optimizer step.
    """

    def on_metrics(self, row: dict) -> None:
        pass

    def on_checkpoint(self, step: int, checkpoint_dir: Path, metrics: dict) -> None:
        pass

    def should_stop(self) -> StopRequest:
        return None

    def on_progress(self, step: int, total_steps: int, eta_seconds: float | None) -> None:
        pass
