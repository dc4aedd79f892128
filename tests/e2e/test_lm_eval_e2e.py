"""lm-evaluation-harness as a real client: its `local-completions` model scores a multiple-choice task and runs a
generate-until task (both defined on local JSONL, no hub) against uvicorn serving a worker-trained adapter and its
base model. The tokenizer comes from the server (lm-eval finds /tokenizer_info and /tokenize on its own) for the
fine-tuned model, and from the base model's directory for the base. The adapter beats the base on its own task,
and lm-eval's loglikelihoods equal PEFT's over the same tokens."""

from __future__ import annotations

import io
import json
import tarfile

import httpx
import pytest
import torch

from app.config import Settings
from app.ml.registry import BaseModelRegistry
from app.ml.synthetic import INTENTS, intent_json_task
from tests.e2e.conftest import upload, wait_terminal
from tests.e2e.server import LiveServer

pytestmark = pytest.mark.slow

LABELS = sorted(INTENTS)
PROMPT = "Request: {text}\nIntent:"


def task_files(tmp_path) -> tuple[bytes, object]:
    """(training file of prompt/completion rows, the directory of the two lm-eval tasks over held-out requests)."""
    train, held_out = intent_json_task(160, 24, seed=5)
    rows = []
    for example in train:
        user, answer = example["messages"][-2]["content"], json.loads(example["messages"][-1]["content"])
        rows.append({"prompt": PROMPT.format(text=user), "completion": f" {answer['intent']}"})
    docs = tmp_path / "intents.jsonl"
    docs.write_text(
        "".join(
            json.dumps(
                {"text": text, "intent": json.loads(a)["intent"], "label": LABELS.index(json.loads(a)["intent"])}
            )
            + "\n"
            for text, a in held_out
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(docs)}},
        "test_split": "test",
        "doc_to_text": "Request: {{text}}\nIntent:",
    }
    multiple_choice = {**common, "task": "intent_choice", "output_type": "multiple_choice", "doc_to_choice": LABELS,
                       "doc_to_target": "label", "metric_list": [{"metric": "acc"}]}  # fmt: skip
    strip = [{"function": "remove_whitespace"}, {"function": "take_first"}]
    generate = {**common, "task": "intent_generate", "output_type": "generate_until", "doc_to_target": "{{intent}}",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 24, "temperature": 0, "do_sample": False},
                "filter_list": [{"name": "strip", "filter": strip}],
                "metric_list": [{"metric": "exact_match"}]}  # fmt: skip
    for spec in (multiple_choice, generate):
        (tasks / f"{spec['task']}.yaml").write_text(json.dumps(spec))  # JSON is YAML
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows), tasks


def evaluate(server: LiveServer, model: str, tasks, expected_backend: str, **model_args) -> dict:
    """Both tasks through lm-eval's `local-completions`, checking which tokenizer it ended up with."""
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    lm = LocalCompletionsAPI(
        model=model,
        base_url=f"{server.url}/v1/completions",
        num_concurrent=2,
        max_retries=1,
        batch_size=8,
        **model_args,
    )
    assert lm.tokenizer_backend == expected_backend
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=["intent_choice", "intent_generate"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )


def peft_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """The continuation's log-probability after the context, tokenized as lm-eval does (the pair as one text)."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n_context = len(tokenizer.encode(context, add_special_tokens=False))
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logprobs[j - 1, whole[j]].item() for j in range(n_context, len(whole)))


def test_lm_eval_scores_the_fine_tuned_model_above_its_base(pg_stack, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stack = pg_stack
    training, tasks = task_files(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with LiveServer(stack.env, stack.tmp / "api.log") as server:
        sdk = stack.sdk(server)
        with stack.worker():
            job = sdk.fine_tuning.jobs.create(
                model="tuneserve-tiny", training_file=upload(sdk, training), suffix="intents",
                hyperparameters={"n_epochs": 4, "batch_size": 8},
            )  # fmt: skip
            done = wait_terminal(sdk, job.id, timeout=300)
        assert done.status == "succeeded", done.error
        monkeypatch.setenv("OPENAI_API_KEY", sdk.api_key)  # lm-eval's completions calls send it
        base_dir = BaseModelRegistry(Settings(data_dir=stack.tmp / "data")).resolve("tuneserve-tiny").name_or_path
        # No tokenizer option: lm-eval finds the server's tokenizer endpoints itself.
        tuned = evaluate(server, done.fine_tuned_model, tasks, "remote")
        base = evaluate(
            server, "tuneserve-tiny", tasks, "huggingface", tokenizer_backend="huggingface", tokenizer=base_dir
        )
        adapter = tmp_path / "adapter"
        archive = httpx.get(f"{server.url}/v1/models/{done.fine_tuned_model}/adapter",
                            headers={"Authorization": f"Bearer {sdk.api_key}"}, timeout=30)  # fmt: skip
        with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
            tar.extractall(adapter, filter="data")

    accuracy = {name: r["results"]["intent_choice"]["acc,none"] for name, r in (("tuned", tuned), ("base", base))}
    exact = {
        name: r["results"]["intent_generate"]["exact_match,strip"] for name, r in (("tuned", tuned), ("base", base))
    }
    assert accuracy["tuned"] > accuracy["base"] and accuracy["tuned"] >= 0.8, accuracy
    assert exact["tuned"] > exact["base"] and exact["tuned"] >= 0.5, exact

    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    def load():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    adapter_dir = next(p.parent for p in adapter.rglob("adapter_config.json"))
    for results, model in ((base, load()), (tuned, PeftModel.from_pretrained(load(), adapter_dir).eval())):
        for sample in results["samples"]["intent_choice"][:8]:
            served = [resp[0][0] for resp in sample["resps"]]
            expected = [peft_loglikelihood(model, tokenizer, *arguments) for arguments in sample["arguments"]]
            assert served == pytest.approx(expected, abs=1e-3)
