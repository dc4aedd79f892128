"""Fixtures for jobs: a worker context on the test database, and helpers to create jobs through the API."""

from __future__ import annotations

import time

import pytest

from app.tables import Job, JobEvent
from tests.datasets.samples import valid_chat_file
from worker.context import build_context

# Small and quick on the tiny model: 20 examples, batch 4 -> 5 steps an epoch.
QUICK = {"n_epochs": 2, "batch_size": 4}


@pytest.fixture
def settings(tmp_path, db_url):
    from app.config import Settings

    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        job_lease_seconds=5,
        job_heartbeat_seconds=0.2,
        max_job_attempts=3,
    )


@pytest.fixture
def ctx(settings):
    return build_context(settings)


@pytest.fixture
def training_file(client) -> str:
    r = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", valid_chat_file(20))})
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.fixture
def create_job(client, training_file):
    def create(**options) -> str:
        body = {"model": "tuneserve-tiny", "training_file": training_file, "hyperparameters": dict(QUICK), **options}
        r = client.post("/v1/fine_tuning/jobs", json=body)
        assert r.status_code == 200, r.text
        return r.json()["id"]

    return create


def wait_for(predicate, timeout: float = 60, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def job_row(sessionmaker, job_id: str) -> Job:
    from sqlalchemy import select

    with sessionmaker() as session:
        return session.scalar(select(Job).where(Job.id == job_id))


def event_messages(sessionmaker, job_id: str) -> list[str]:
    from sqlalchemy import select

    with sessionmaker() as session:
        return list(session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))
