"""Efficacy per family, end to end: for every built-in family model (`tiny-llama3`, `tiny-qwen2`, ...), a job
fine-tuned through the real API (openai SDK, uvicorn, Postgres, Redis, the Celery worker) on the intent -> JSON
task answers held-out phrasings with exactly the expected JSON, and the base model never does.

The check `tuneserve-tiny` has (tests/jobs/test_evaluation_report.py: all-"auto" hyperparameters, 160 examples), run
through the service for each family's architecture, tokenizer and chat template. It fails when training and
inference disagree on the text around the answer (mask, generation prompt, end-of-turn), when the adapter does
not reach the served model, or when a family's model does not learn. One server and one worker serve every
family; the jobs are queued together and run back to back.
"""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import dataclass, field

import openai
import pytest
from sqlalchemy import text

from app.db import make_engine
from app.ml.families import FAMILIES
from app.ml.synthetic import INTENTS, intent_json_task
from tests.e2e.conftest import Stack, wait_terminal
from tests.e2e.server import LiveServer

pytestmark = pytest.mark.slow

N_TRAIN = 160  # with "auto" epochs and batch size: 6 epochs of 8-example steps, as the tiny model's check
N_HELD_OUT = 24
# The format (a JSON object of an intent and its priority, as trained) and the right intent on nearly every
# held-out phrasing (chance is 1 in 6); the base models on none.
MIN_FORMAT = 0.9
MIN_EXACT_MATCH = 0.8
MAX_TOKENS = 32  # an answer is 12-14 tokens in every family's tokenizer
SEED = 5
# Gemma 2's template raises on a system message: its examples have none.
NO_SYSTEM_ROLE = {"gemma2"}


def spaced(answer: str) -> str:
    """The answer as `json.dumps` writes it by default. The SentencePiece-style family tokenizers were trained on a
    corpus holding each compact answer verbatim, so each compact answer is a single token there; with spaces it is
    12-14 tokens in every family, and the format has to be learned token by token."""
    return json.dumps(json.loads(answer))


def task(family: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """(training examples, held-out [(question, expected answer)]) for `family`: the same phrasings for all."""
    examples, held_out = intent_json_task(
        N_TRAIN, N_HELD_OUT, seed=SEED, system_share=0.0 if family in NO_SYSTEM_ROLE else 0.5
    )
    for example in examples:
        answer = example["messages"][-1]
        answer["content"] = spaced(answer["content"])
    return examples, [(question, spaced(answer)) for question, answer in held_out]


@dataclass
class FamilyRun:
    model: str  # the base model, tiny-<family>
    held_out: list[tuple[str, str]]
    job_status: str = ""
    job_error: object = None
    tuned_model: str | None = None
    tuned: list[str] = field(default_factory=list)
    base: list[str] = field(default_factory=list)

    @property
    def expected(self) -> list[str]:
        return [answer for _, answer in self.held_out]

    def exact(self, answers: list[str]) -> float:
        return sum(a == e for a, e in zip(answers, self.expected, strict=True)) / len(self.expected)

    def summary(self) -> str:
        return (
            f"{self.model}: tuned {self.exact(self.tuned):.2f} exact, {in_format(self.tuned):.2f} in format; "
            f"base {self.exact(self.base):.2f} exact, {in_format(self.base):.2f} in format"
        )


def in_format(answers: list[str]) -> float:
    """Share of answers that are the trained format: `{"intent": <a known intent>, "priority": <low|medium|high>}`
    with nothing around it."""

    def fits(answer: str) -> bool:
        try:
            value = json.loads(answer)
        except ValueError:
            return False
        return (
            isinstance(value, dict)
            and list(value) == ["intent", "priority"]
            and value["intent"] in INTENTS
            and value["priority"] in ("low", "medium", "high")
            and answer == spaced(answer)
        )

    return sum(map(fits, answers)) / len(answers) if answers else 0.0


def submit(sdk: openai.OpenAI, family: str) -> str:
    examples, _ = task(family)
    data = b"".join(json.dumps(e).encode() + b"\n" for e in examples)
    file = sdk.files.create(file=(f"{family}.jsonl", io.BytesIO(data)), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model=FAMILIES[family].model_name,
        training_file=file.id,
        suffix=family,
        seed=SEED,
        hyperparameters={"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
    )
    return job.id


async def greedy_answers(client: openai.AsyncOpenAI, requests: list[tuple[str, str]]) -> list[str]:
    """Chat completions for [(model, question)], all in flight at once so the engine batches them. A request the
    server fails answers with its error, so the family it belongs to fails and the others are still judged."""

    async def ask(model: str, question: str) -> str:
        try:
            reply = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS, temperature=0
            )
        except openai.APIError as exc:
            return f"<{type(exc).__name__}: {exc}>"
        return reply.choices[0].message.content or ""

    return list(await asyncio.gather(*(ask(m, q) for m, q in requests)))


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, postgres_url, redis_url) -> dict[str, FamilyRun]:
    tmp = tmp_path_factory.mktemp("families")
    stack = Stack(tmp, postgres_url, redis_url)
    runs = {family: FamilyRun(spec.model_name, task(family)[1]) for family, spec in FAMILIES.items()}
    try:
        with LiveServer(stack.env, tmp / "api.log") as server:
            sdk = stack.sdk(server)
            with stack.worker():
                jobs = {family: submit(sdk, family) for family in runs}
                for family, job_id in jobs.items():
                    done = wait_terminal(sdk, job_id, timeout=900)
                    runs[family].job_status, runs[family].job_error = done.status, done.error
                    runs[family].tuned_model = done.fine_tuned_model
            requests = [
                (model, question)
                for run in runs.values()
                for model in (run.model, run.tuned_model)
                if model is not None
                for question, _ in run.held_out
            ]
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=sdk.api_key, max_retries=0, timeout=300)
            answers = dict(zip(requests, asyncio.run(greedy_answers(client, requests)), strict=True))
        for run in runs.values():
            run.base = [answers[(run.model, q)] for q, _ in run.held_out]
            if run.tuned_model is not None:
                run.tuned = [answers[(run.tuned_model, q)] for q, _ in run.held_out]
            print(run.summary())
        yield runs
    finally:
        engine = make_engine(postgres_url)
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE projects RESTART IDENTITY CASCADE"))
        engine.dispose()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_model_fine_tuned_through_the_api_answers_in_the_trained_format(family_runs, family):
    run = family_runs[family]
    assert run.job_status == "succeeded", run.job_error
    assert run.exact(run.base) == 0.0 and in_format(run.base) == 0.0, run.base
    pairs = [(a, e) for a, e in zip(run.tuned, run.expected, strict=True) if a != e]
    assert in_format(run.tuned) >= MIN_FORMAT, f"{run.summary()}; wrong: {pairs}"
    assert run.exact(run.tuned) >= MIN_EXACT_MATCH, f"{run.summary()}; wrong: {pairs}"
