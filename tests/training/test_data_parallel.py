"""Data-parallel training on CPU: two gloo ranks (this process and a helper process) against one device.

Equality is to a tolerance, not bit-exact: the two ranks' gradients are summed in another order than one
device's micro-batches, a difference of about 1e-7 relative per step that Adam carries on. A mistake in how the
step is split (a rank normalising by its own tokens, a rank's examples counted twice, no all-reduce) moves the
weights by about the size of an update, 1e-3, and the losses at the second step already.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from app.jobs.spec import resolve_spec
from app.ml.synthetic import intent_json_task, intent_preference_task
from tests.training.conftest import write_jsonl
from worker.training.callbacks import TrainingCallbacks
from worker.training.devices import balanced_shares
from worker.training.ranks import EXIT_OUT_OF_MEMORY, RankLost, _helper_failure, train_on_devices

pytestmark = pytest.mark.slow

N_TRAIN = 17  # with batch 8: steps of 8, 8 and 1 example; the last leaves one rank with nothing to train
WEIGHT_ATOL = 5e-5  # the largest LoRA weight is about 0.07 after these steps
LOSS_RTOL = 1e-5


def chats(examples):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in examples]


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    train, held_out = intent_json_task(N_TRAIN, 12, seed=5)
    spec = resolve_spec(
        {"n_epochs": 3, "batch_size": 8, "lora_dropout": 0.0, "n_checkpoints": 3, "eval_every": 2},
        N_TRAIN,
        tiny.defaults,
        seed=9,
    )
    return spec, write_jsonl(root / "train.jsonl", train), write_jsonl(root / "valid.jsonl", chats(held_out))


class Recorder(TrainingCallbacks):
    def __init__(self, kill_helper_after: int | None = None, pause_after: int | None = None):
        self.checkpoints: list[int] = []
        self.metrics: list[dict] = []
        self.kill_helper_after, self.pause_after = kill_helper_after, pause_after
        self.done = 0

    def should_stop(self):
        return "pause" if self.pause_after is not None and self.done >= self.pause_after else None

    def on_metrics(self, row):
        self.metrics.append(row)

    def on_checkpoint(self, step, checkpoint_dir, metrics):
        self.checkpoints.append(step)

    def on_progress(self, step, total_steps, eta_seconds):
        self.done = step
        if step == self.kill_helper_after:
            for pid in helper_pids():
                os.kill(pid, signal.SIGKILL)


def helper_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "worker.training.ranks"], capture_output=True)
    return [int(pid) for pid in found.stdout.split()]


def weights(adapter_dir):
    return load_file(adapter_dir / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tiny, task, tmp_path_factory):
    spec, train_path, valid_path = task
    out = {}
    for n in (1, 2):
        directory = tmp_path_factory.mktemp(f"devices-{n}")
        recorder = Recorder()
        result = train_on_devices(n, spec, train_path, valid_path, tiny, directory, recorder)
        out[n] = (result, recorder, directory)
    return out


def test_two_ranks_train_the_adapter_of_one_device_with_the_same_global_batch(runs):
    (one, _, _), (two, recorder, directory) = runs[1], runs[2]
    assert two.n_steps == one.n_steps == 9 and two.stopped is None
    assert two.trained_tokens == one.trained_tokens and two.supervised_tokens == one.supervised_tokens
    # Losses and accuracies of every step, validation on the sample and the full set: the same figures.
    assert [r["step"] for r in two.metrics_rows] == [r["step"] for r in one.metrics_rows]
    for a, b in zip(two.metrics_rows, one.metrics_rows, strict=True):
        for key, value in b.items():
            if value is not None:
                assert a[key] == pytest.approx(value, rel=LOSS_RTOL), (a["step"], key)
    assert two.full_valid_loss == pytest.approx(one.full_valid_loss, rel=LOSS_RTOL)
    # The gradient itself, not only its direction (Adam would hide a gradient off by a constant factor).
    assert all(r["grad_norm"] > 0 for r in two.metrics_rows)

    first, second = weights(one.adapter_dir), weights(two.adapter_dir)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=WEIGHT_ATOL, rtol=0)
    assert max(t.abs().max().item() for t in first.values()) > 100 * WEIGHT_ATOL  # the tolerance is not vacuous

    # Checkpoints are written once, by rank 0; the helper wrote nothing (not even its output directory).
    assert recorder.checkpoints == [3, 6, 9] and [s for s, _ in two.checkpoints] == [3, 6, 9]
    assert sorted(p.name for p in directory.iterdir()) == ["adapter", "checkpoints"]
    assert helper_pids() == []


def test_a_killed_rank_stops_the_group_and_the_run_resumes_from_its_checkpoint(tiny, task, runs, tmp_path):
    spec, train_path, valid_path = task
    with pytest.raises(RankLost, match="rank 1 of 2 exited with signal 9"):
        train_on_devices(2, spec, train_path, valid_path, tiny, tmp_path, Recorder(kill_helper_after=4))
    assert helper_pids() == []
    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["checkpoint-000003"]

    resumed = train_on_devices(2, spec, train_path, valid_path, tiny, tmp_path / "again", resume_from=checkpoints[-1])
    uninterrupted = runs[2][0]
    assert [r["step"] for r in resumed.metrics_rows] == [r["step"] for r in uninterrupted.metrics_rows]
    for name, tensor in weights(uninterrupted.adapter_dir).items():
        torch.testing.assert_close(weights(resumed.adapter_dir)[name], tensor, atol=WEIGHT_ATOL, rtol=0)


def test_a_pause_stops_every_rank_at_the_same_step_with_one_checkpoint(tiny, task, tmp_path, caplog):
    spec, train_path, valid_path = task
    recorder = Recorder(pause_after=4)
    result = train_on_devices(2, spec, train_path, valid_path, tiny, tmp_path, recorder)
    assert result.stopped == "pause" and result.n_steps == 4
    assert recorder.checkpoints == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-000003", "checkpoint-000004"]
    assert helper_pids() == [] and "did not finish" not in caplog.text  # the helper stopped at the same step


class Ended:
    def __init__(self, code):
        self.code = code

    def poll(self):
        return self.code


def test_how_a_helper_ended_decides_what_the_job_is_told():
    assert _helper_failure({1: Ended(0)}, 2) is None
    lost = _helper_failure({1: Ended(0), 2: Ended(-9)}, 3)
    assert isinstance(lost, RankLost) and str(lost) == "data-parallel rank 2 of 3 exited with signal 9"
    assert isinstance(_helper_failure({1: Ended(1)}, 2), RankLost)
    # Out of memory on a helper fails the job as out of memory (as on one device), not as a lost worker.
    assert isinstance(_helper_failure({1: Ended(EXIT_OUT_OF_MEMORY)}, 2), torch.OutOfMemoryError)


def test_shares_are_disjoint_complete_deterministic_and_balanced():
    lengths = [50, 10, 40, 30, 30, 20, 5, 5]
    shares = balanced_shares(lengths, 2)
    assert sorted(i for share in shares for i in share) == list(range(len(lengths)))
    assert shares == balanced_shares(lengths, 2)
    totals = [sum(lengths[i] for i in share) for share in shares]
    assert max(totals) - min(totals) <= max(lengths) // 5
    assert balanced_shares([7], 3) == [[0], [], []]


def test_dpo_on_two_ranks_trains_the_adapter_of_one_device(tiny, tmp_path):
    """Pairs are dealt to ranks whole; the reference log-probabilities each rank scores for its slice are summed
    into every rank's; the step's mean loss over pairs is the same however they are split."""
    pairs, _ = intent_preference_task(N_TRAIN, 0, seed=5)  # the last step's one pair leaves a rank without
    train_path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    hp = {"n_epochs": 1, "batch_size": 8, "lora_dropout": 0.0, "n_checkpoints": 1}
    spec = resolve_spec(hp, N_TRAIN, tiny.defaults, seed=9, method="dpo")
    results = [train_on_devices(n, spec, train_path, None, tiny, tmp_path / f"dpo-{n}", Recorder()) for n in (1, 2)]
    one, two = results
    assert two.n_steps == one.n_steps == 3
    for a, b in zip(two.metrics_rows, one.metrics_rows, strict=True):
        for key, value in b.items():
            if value is not None:
                assert a[key] == pytest.approx(value, rel=LOSS_RTOL, abs=1e-6), (a["step"], key)
    first, second = weights(one.adapter_dir), weights(two.adapter_dir)
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=WEIGHT_ATOL, rtol=0)
    assert helper_pids() == []
