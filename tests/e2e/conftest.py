"""Fixtures for end-to-end tests: a tuneserve stack (database, broker, API, workers) run as real processes."""

from __future__ import annotations

import io
import time

import openai
import pytest
from sqlalchemy import func, select

from app import migrate
from app.db import make_engine, make_sessionmaker
from tests.conftest import make_key
from tests.datasets.samples import chat_example, jsonl, valid_chat_file
from tests.e2e.server import LiveServer, WorkerProcess, tuneserve_env

TERMINAL = {"succeeded", "failed", "cancelled"}
# Short leases and quick reconciling so fault tests finish in seconds, not minutes.
FAST_RECOVERY = {
    "TUNESERVE_JOB_LEASE_SECONDS": "3",
    "TUNESERVE_JOB_HEARTBEAT_SECONDS": "0.3",
    "TUNESERVE_RECONCILE_INTERVAL_SECONDS": "0.5",
    "TUNESERVE_JOB_REDISPATCH_SECONDS": "2",
}


class Stack:
    def __init__(self, tmp_path, db_url: str, broker_url: str):
        self.tmp = tmp_path
        self.env = tuneserve_env(tmp_path / "data", db_url, TUNESERVE_BROKER_URL=broker_url, **FAST_RECOVERY)
        self.sessionmaker = make_sessionmaker(make_engine(db_url))
        self.workers = 0

    def worker(self) -> WorkerProcess:
        self.workers += 1
        return WorkerProcess(self.env, self.tmp / f"worker-{self.workers}.log")

    def sdk(self, server: LiveServer) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{server.url}/v1", api_key=make_key(self.sessionmaker, "alpha"), max_retries=0)

    def count(self, model, **where) -> int:
        with self.sessionmaker() as session:
            query = select(func.count()).select_from(model)
            for key, value in where.items():
                query = query.where(getattr(model, key) == value)
            return session.scalar(query)


@pytest.fixture
def pg_stack(tmp_path, postgres_url, redis_url):
    yield Stack(tmp_path, postgres_url, redis_url)
    engine = make_engine(postgres_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE projects RESTART IDENTITY CASCADE")
    engine.dispose()


@pytest.fixture
def sqlite_stack(tmp_path):
    url = f"sqlite:///{tmp_path / 'tuneserve.db'}"
    migrate.upgrade(url)
    return Stack(tmp_path, url, f"sqla+sqlite:///{tmp_path / 'broker.db'}")


def wait_until(predicate, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_terminal(sdk: openai.OpenAI, job_id: str, timeout: float = 180):
    return wait_until(
        lambda: (job := sdk.fine_tuning.jobs.retrieve(job_id)).status in TERMINAL and job, timeout, "a finished job"
    )


def upload(sdk: openai.OpenAI, data: bytes, name: str = "train.jsonl") -> str:
    return sdk.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune").id


def start_job(
    sdk: openai.OpenAI,
    n_examples: int = 20,
    *,
    validation_examples: int = 0,
    seed: int | None = None,
    **hyperparameters,
):
    """A job on `n_examples` chat examples (and a validation file of other examples, if asked for)."""
    validation = None
    if validation_examples:
        validation = upload(sdk, jsonl(chat_example(1000 + i) for i in range(validation_examples)), "valid.jsonl")
    extra = {k: hyperparameters.pop(k) for k in ("n_checkpoints",) if k in hyperparameters}
    return sdk.fine_tuning.jobs.create(
        model="tuneserve-tiny",
        training_file=upload(sdk, valid_chat_file(n_examples)),
        validation_file=validation if validation else openai.NOT_GIVEN,
        seed=seed if seed is not None else openai.NOT_GIVEN,
        suffix="e2e",
        hyperparameters=hyperparameters or {"n_epochs": 2, "batch_size": 4},
        extra_body=extra,
    )


def event_messages(sdk: openai.OpenAI, job_id: str) -> list[str]:
    """The job's event messages, oldest first."""
    return [e.message for e in reversed(list(sdk.fine_tuning.jobs.list_events(job_id, limit=100)))]


def published_models(stack: Stack, job_id: str) -> int:
    from app.tables import FineTunedModel

    return stack.count(FineTunedModel, job_id=job_id, step_number=None)
