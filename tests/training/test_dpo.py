"""DPO through the training engine: its figures against a direct computation with the PEFT model, that it learns
the preferred format on prompts it never saw, and that a run killed with SIGKILL resumes to the same adapter."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from app.jobs.spec import resolve_spec
from app.ml.base_model import load_tokenizer
from app.ml.chat import IGNORE_INDEX
from app.ml.synthetic import intent_preference_task
from tests.training.conftest import write_jsonl
from worker.training.callbacks import TrainingCallbacks
from worker.training.checkpoint import save_adapter
from worker.training.data import TokenizedExample
from worker.training.devices import DeviceGroup
from worker.training.dpo import compute_references, evaluate_pairs
from worker.training.loop import build_lora_model, load_base_model, train
from worker.training.preference import load_preference_dataset

CPU = torch.device("cpu")
ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    pairs, held_out = intent_preference_task(48, 20, seed=3)
    return write_jsonl(tmp_path_factory.mktemp("dpo") / "train.jsonl", pairs), held_out


def dpo_spec(tiny, **overrides):
    hp = {"n_epochs": 1, "batch_size": 4, "lora_dropout": 0.1, "n_checkpoints": 3, **overrides}
    return resolve_spec(hp, 48, tiny.defaults, seed=5, method="dpo")


def direct_logp(model, example: TokenizedExample) -> float:
    """log p(answer | conversation) from one unpacked forward pass: the log-softmax at each supervised position."""
    logits = model(input_ids=torch.tensor([example.input_ids])).logits[0].float()
    targets = torch.tensor(example.targets)
    supervised = targets != IGNORE_INDEX
    return logits.log_softmax(-1)[supervised].gather(1, targets[supervised][:, None]).sum().item()


def test_only_the_answer_is_supervised_and_the_history_is_shared(tiny, tmp_path):
    history = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": "second"},
    ]
    example = {
        "input": {"messages": history},
        "preferred_output": [{"role": "assistant", "content": "good"}],
        "non_preferred_output": [{"role": "assistant", "content": "bad answer"}],
    }
    tokenizer = load_tokenizer(tiny.name_or_path)
    path = write_jsonl(tmp_path / "p.jsonl", [example] * 3)
    [pair, *_] = load_preference_dataset(path, tokenizer, 1024, "drop", param="training_file").examples
    assert pair.line == 1
    assert_answer_after_the_same_conversation(tokenizer, pair, "good", "bad answer")

    # Too long for max_seq_length: cut from the left by the same number of conversation tokens, or dropped.
    example["non_preferred_output"][0]["content"] = "a much longer answer " * 3
    path = write_jsonl(tmp_path / "long.jsonl", [example] * 3)
    longest = len(pair.chosen) + 12
    cut = load_preference_dataset(path, tokenizer, longest, "truncate_left", param="training_file")
    assert cut.n_truncated == 3 and len(cut.examples[0].rejected) == longest
    assert_answer_after_the_same_conversation(tokenizer, cut.examples[0], "good", "a much longer answer")
    dropped = load_preference_dataset(path, tokenizer, longest, "drop", param="training_file")
    assert dropped.examples == [] and dropped.n_dropped_too_long == 3


def assert_answer_after_the_same_conversation(tokenizer, pair, chosen: str, rejected: str) -> None:
    starts = []
    for sequence, answer in ((pair.chosen, chosen), (pair.rejected, rejected)):
        supervised = [t for t in sequence.targets if t != IGNORE_INDEX]
        assert tokenizer.decode(supervised).startswith(answer)
        assert "earlier" not in tokenizer.decode(supervised)
        starts.append(sequence.targets.index(supervised[0]) + 1)  # the answer's first position
    assert starts[0] == starts[1] and pair.chosen.input_ids[: starts[0]] == pair.rejected.input_ids[: starts[1]]


def test_dpo_figures_equal_a_direct_computation_with_the_peft_model(tiny, task):
    """References from the base (adapter disabled), then the loss and reward accuracy of a policy whose LoRA
    weights are random, computed packed (pairs side by side in rows) and directly, one sequence at a time."""
    spec = dpo_spec(tiny, lora_dropout=0.0)
    tokenizer = load_tokenizer(tiny.name_or_path)
    pairs = load_preference_dataset(task[0], tokenizer, 1024, "drop", param="training_file").examples[:12]
    model = build_lora_model(load_base_model(tiny.name_or_path, CPU, torch.float32), spec)
    group = DeviceGroup(CPU)
    compute_references(model, pairs, 1024, tokenizer.pad_token_id, group, 200, adapter_disabled=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.02)
    model.eval()
    losses, preferred = [], []
    with torch.no_grad():
        for pair in pairs:
            with model.disable_adapter():
                reference = (direct_logp(model, pair.chosen), direct_logp(model, pair.rejected))
            assert pair.reference == pytest.approx(reference, abs=1e-3)  # sums of ~50 float32 log-probs
            margin = spec.beta * (
                (direct_logp(model, pair.chosen) - reference[0]) - (direct_logp(model, pair.rejected) - reference[1])
            )
            losses.append(-math.log(1 / (1 + math.exp(-margin))))
            preferred.append(margin > 0)
    # 200 tokens per micro-batch: several rows of several pairs each.
    loss, accuracy = evaluate_pairs(model, pairs, spec.beta, 1024, tokenizer.pad_token_id, group, 200)
    assert loss == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    assert accuracy == sum(preferred) / len(preferred) and 0 < accuracy < 1


def test_dpo_learns_the_preferred_format_on_held_out_prompts(tiny, task, tmp_path):
    spec = dpo_spec(tiny)
    result = train(spec, task[0], None, tiny, tmp_path)
    first, last = result.metrics_rows[0], result.metrics_rows[-1]
    # The policy starts as the reference: every margin 0, the loss log 2.
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-5) and first["reward_margin"] == 0
    assert last["train_reward_accuracy"] > 0.9 and last["reward_margin"] > 1
    assert result.metrics_csv().splitlines()[0].split(",")[-3:] == [
        "reward_margin",
        "rewards_chosen",
        "rewards_rejected",
    ]
    assert sorted(s.line for s in result.example_scores) == list(range(1, 49))

    from peft import PeftModel

    tokenizer = load_tokenizer(tiny.name_or_path)
    base = load_base_model(tiny.name_or_path, CPU, torch.float32)
    model = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    heldout = tmp_path / "heldout.jsonl"
    write_jsonl(heldout, [
        {"input": {"messages": [{"role": "user", "content": q}]},
         "preferred_output": [{"role": "assistant", "content": a}],
         "non_preferred_output": [{"role": "assistant", "content": b}]}
        for q, a, b in task[1]
    ])  # fmt: skip
    pairs = load_preference_dataset(heldout, tokenizer, 1024, "drop", param="validation_file").examples
    with torch.no_grad():
        after = [direct_logp(model, p.chosen) > direct_logp(model, p.rejected) for p in pairs]
        with model.disable_adapter():
            before = [direct_logp(model, p.chosen) > direct_logp(model, p.rejected) for p in pairs]
    assert sum(after) / len(after) >= 0.9 > sum(before) / len(before)


def _train_and_die_at_checkpoint(spec, train_file, tiny, output_dir, init_adapter, kill_at):
    class Die(TrainingCallbacks):
        def on_checkpoint(self, step, checkpoint_dir, metrics):
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    train(spec, train_file, None, tiny, output_dir, Die(), init_adapter=init_adapter)


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_adapter(tiny, task, tmp_path):
    """From a fine-tuned adapter, as DPO after SFT starts: the reference is that adapter, not the checkpoint's
    weights, so a resumed run must take its references from the checkpoint."""
    spec = dpo_spec(tiny, lora_dropout=0.1)  # the resumed run must restore the RNG too
    start = tmp_path / "start"
    model = build_lora_model(load_base_model(tiny.name_or_path, CPU, torch.float32), spec)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.02)
    save_adapter(model, start)
    straight = train(spec, task[0], None, tiny, tmp_path / "straight", init_adapter=start)
    child = multiprocessing.get_context("spawn").Process(
        target=_train_and_die_at_checkpoint, args=(spec, task[0], tiny, tmp_path / "killed", start, 4)
    )
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    [checkpoint] = sorted((tmp_path / "killed" / "checkpoints").glob("checkpoint-*"))
    resumed = train(spec, task[0], None, tiny, tmp_path / "killed", resume_from=checkpoint, init_adapter=start)
    assert resumed.metrics_rows == straight.metrics_rows
    a, b = load_file(resumed.adapter_dir / ADAPTER), load_file(straight.adapter_dir / ADAPTER)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
