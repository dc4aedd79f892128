"""The training loop end to end on the tiny model: output, callbacks, determinism, resume, cancel, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from app.errors import InvalidRequest
from app.jobs.spec import resolve_spec
from app.ml.synthetic import intent_json_task
from tests.training.conftest import write_jsonl
from worker.training.callbacks import TrainingCallbacks
from worker.training.devices import DeviceGroup, StepLoss
from worker.training.errors import TrainingError
from worker.training.loop import RESULT_CSV_COLUMNS, build_lora_model, load_base_model, train
from worker.training.step import optimizer_step

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    examples, held_out = intent_json_task(16, 6, seed=11)
    valid = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in held_out]
    return write_jsonl(root / "train.jsonl", examples), write_jsonl(root / "valid.jsonl", valid)


def small_spec(tiny, **overrides):
    hp = {"n_epochs": 2, "batch_size": 4, "lora_dropout": 0.1, "eval_every": 3, "n_checkpoints": 2, **overrides}
    return resolve_spec(hp, 16, tiny.defaults, seed=3)


class Recorder(TrainingCallbacks):
    def __init__(self, stop_at: int | None = None, request: str = "cancel"):
        self.metrics, self.checkpoints, self.progress = [], [], []
        self.stop_at, self.request, self.polls = stop_at, request, 0

    def on_metrics(self, row):
        self.metrics.append(row)

    def on_checkpoint(self, step, checkpoint_dir, metrics):
        self.checkpoints.append((step, checkpoint_dir, metrics))

    def should_stop(self):
        self.polls += 1
        done = self.progress[-1][0] if self.progress else 0
        return self.request if self.stop_at is not None and done >= self.stop_at else None

    def on_progress(self, step, total_steps, eta_seconds):
        self.progress.append((step, total_steps, eta_seconds))


def adapter_tensors(adapter_dir):
    return load_file(adapter_dir / "adapter_model.safetensors")


def test_run_produces_a_loadable_adapter_metrics_and_checkpoints(tiny, files, tmp_path, monkeypatch):
    from peft import PeftModel
    from peft.utils import save_and_load
    from transformers import AutoModelForCausalLM

    def no_hub(*args, **kwargs):
        raise AssertionError("saving an adapter asked the Hub about its base model")

    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", no_hub)
    spec = small_spec(tiny)
    cb = Recorder()
    result = train(spec, files[0], files[1], tiny, tmp_path, cb)

    assert result.stopped is None and result.n_steps == result.total_steps == 8
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny.name  # portable: no path of the machine that trained it
    assert config["r"] == spec.lora_r and config["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny.name_or_path), result.adapter_dir)
    assert any("lora_B" in n for n, _ in model.named_parameters())

    # Metrics: every step, a validation sample every 3 steps, the full validation set at each checkpoint (4, 8).
    assert [r["step"] for r in result.metrics_rows] == list(range(1, 9)) and cb.metrics == result.metrics_rows
    assert [r["step"] for r in result.metrics_rows if r["valid_loss"] is not None] == [3, 4, 6, 8]
    assert [r["step"] for r in result.metrics_rows if r.get("full_valid_loss") is not None] == [4, 8]
    last = result.metrics_rows[-1]
    assert last["full_valid_loss"] == result.full_valid_loss == last["valid_loss"]
    assert 0 <= last["train_mean_token_accuracy"] <= 1 and last["train_loss"] > 0
    assert result.metrics_csv().splitlines()[0] == ",".join(RESULT_CSV_COLUMNS)
    assert len(result.metrics_csv().splitlines()) == 9

    # Checkpoints: two, evenly spaced, each a loadable adapter plus resume state; progress after every step.
    assert [s for s, _, _ in cb.checkpoints] == [4, 8]
    for _, path, metrics in cb.checkpoints:
        assert (path / "adapter_model.safetensors").is_file() and (path / "trainer_state.pt").is_file()
        assert metrics["step"] in (4, 8) and metrics["full_valid_loss"] == metrics["valid_loss"] > 0
    assert [p[0] for p in cb.progress] == list(range(1, 9)) and cb.progress[-1][2] == 0
    assert cb.polls >= 8  # polled before every step
    assert result.supervised_tokens < result.trained_tokens
    assert result.n_examples == 16 and result.n_dropped_too_long == 0
    # Every training row scored by the final adapter, worst first, by its line in the file.
    assert sorted(s.line for s in result.example_scores) == list(range(1, 17))
    losses = [s.loss for s in result.example_scores]
    assert losses == sorted(losses, reverse=True)


def test_training_changes_adapter_weights_and_never_base_weights(tiny, files):
    from transformers import AutoTokenizer

    from worker.training.data import load_dataset

    spec = small_spec(tiny, lora_dropout=0.0)
    tokenizer = AutoTokenizer.from_pretrained(tiny.name_or_path)
    data = load_dataset(files[0], tokenizer, spec.max_seq_length, "drop", param="training_file")
    model = build_lora_model(load_base_model(tiny.name_or_path, CPU, torch.float32), spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    for _ in range(3):
        optimizer_step(StepLoss(model), DeviceGroup(CPU), optimizer, scheduler, trainable, data.examples[:4], spec, 0)
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)


def test_same_seed_same_data_gives_identical_adapter_bytes(tiny, files, tmp_path):
    spec = small_spec(tiny, n_epochs=1)
    first = train(spec, files[0], None, tiny, tmp_path / "a")
    second = train(spec, files[0], None, tiny, tmp_path / "b")
    other_seed = resolve_spec({"n_epochs": 1, "batch_size": 4, "lora_dropout": 0.1}, 16, tiny.defaults, seed=4)
    other = train(other_seed, files[0], None, tiny, tmp_path / "c")
    data = (first.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert data == (second.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert data != (other.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert first.metrics_rows == second.metrics_rows


def test_pause_then_resume_equals_an_uninterrupted_run(tiny, files, tmp_path):
    spec = small_spec(tiny)  # dropout on: resume must restore the RNG too
    straight = train(spec, files[0], files[1], tiny, tmp_path / "straight")

    paused = train(spec, files[0], files[1], tiny, tmp_path / "run", Recorder(stop_at=3, request="pause"))
    assert paused.stopped == "pause" and paused.n_steps == 3 and paused.adapter_dir is None
    assert paused.last_checkpoint.name == "checkpoint-000003"
    resumed = train(spec, files[0], files[1], tiny, tmp_path / "run", resume_from=paused.last_checkpoint)

    assert resumed.stopped is None and resumed.n_steps == 8
    # Identical bytes, not merely close: the same optimizer, scheduler and RNG state continue the same float
    # operations in the same order (CPU, fp32).
    adapter_file = "adapter_model.safetensors"
    assert (resumed.adapter_dir / adapter_file).read_bytes() == (straight.adapter_dir / adapter_file).read_bytes()
    assert [r["step"] for r in resumed.metrics_rows] == list(range(1, 9))
    assert resumed.metrics_rows == straight.metrics_rows
    assert resumed.trained_tokens == straight.trained_tokens


def test_a_pause_writes_no_checkpoint_where_one_already_is(tiny, files, tmp_path):
    spec = small_spec(tiny)  # checkpoints at steps 4 and 8
    at_checkpoint = Recorder(stop_at=4, request="pause")
    paused = train(spec, files[0], None, tiny, tmp_path / "run", at_checkpoint)
    assert paused.n_steps == 4 and [s for s, _, _ in at_checkpoint.checkpoints] == [4]  # the scheduled one serves
    assert paused.last_checkpoint == at_checkpoint.checkpoints[0][1]

    right_away = Recorder(stop_at=0, request="pause")  # paused again before its first step
    again = train(spec, files[0], None, tiny, tmp_path / "run", right_away, resume_from=paused.last_checkpoint)
    assert again.n_steps == 4 and right_away.checkpoints == [] and again.last_checkpoint == paused.last_checkpoint


def test_cancel_stops_before_the_next_step_and_leaves_no_adapter(tiny, files, tmp_path):
    cb = Recorder(stop_at=2, request="cancel")
    result = train(small_spec(tiny), files[0], None, tiny, tmp_path, cb)
    assert result.stopped == "cancel" and result.n_steps == 2 and result.adapter_dir is None
    assert [p[0] for p in cb.progress] == [1, 2]
    assert not (tmp_path / "adapter").exists()


def test_resume_refuses_a_checkpoint_from_a_different_spec(tiny, files, tmp_path):
    paused = train(small_spec(tiny), files[0], None, tiny, tmp_path, Recorder(stop_at=1, request="pause"))
    with pytest.raises(TrainingError) as info:
        train(small_spec(tiny, batch_size=2), files[0], None, tiny, tmp_path, resume_from=paused.last_checkpoint)
    assert info.value.code == "checkpoint_mismatch"


def test_no_example_fitting_max_seq_length_is_a_training_error_with_counts(tiny, files, tmp_path):
    with pytest.raises(TrainingError) as info:
        train(small_spec(tiny, max_seq_length=32), files[0], None, tiny, tmp_path)
    assert info.value.code == "no_trainable_examples" and "16 longer than max_seq_length 32" in info.value.message


def test_truncation_policy_keeps_examples_and_reports_the_count(tiny, files, tmp_path):
    spec = small_spec(tiny, max_seq_length=48, long_example_policy="truncate_left", n_epochs=1, n_checkpoints=0)
    result = train(spec, files[0], None, tiny, tmp_path)
    assert result.n_truncated > 0 and result.n_examples == 16 and result.n_dropped_too_long == 0
    assert result.adapter_dir is not None


def test_preference_data_trains_only_under_dpo(tiny, tmp_path):
    dpo = {
        "input": {"messages": [{"role": "user", "content": "hi"}]},
        "preferred_output": [{"role": "assistant", "content": "hello"}],
        "non_preferred_output": [{"role": "assistant", "content": "go away"}],
    }
    path = write_jsonl(tmp_path / "dpo.jsonl", [dpo] * 10)
    with pytest.raises(InvalidRequest) as info:
        train(small_spec(tiny), path, None, tiny, tmp_path)
    assert info.value.param == "training_file" and info.value.code == "invalid_file_format"


def test_nan_loss_is_a_training_error(tiny, files):
    from transformers import AutoTokenizer

    from worker.training.data import load_dataset

    spec = small_spec(tiny)
    tokenizer = AutoTokenizer.from_pretrained(tiny.name_or_path)
    data = load_dataset(files[0], tokenizer, spec.max_seq_length, "drop", param="training_file")
    model = build_lora_model(load_base_model(tiny.name_or_path, CPU, torch.float32), spec)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    with pytest.raises(TrainingError) as info:
        optimizer_step(StepLoss(model), DeviceGroup(CPU), optimizer, scheduler, trainable, data.examples[:4], spec, 0)
    assert info.value.code == "nan_loss"
