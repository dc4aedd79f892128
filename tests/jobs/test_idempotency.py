"""Idempotency-Key edges through the HTTP API, on Postgres and SQLite: server errors release the key, abandoned
keys are taken over, expiry and purge, key length, keys on cancel/pause/resume, and concurrent first requests."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, inspect, select, update

from app.api import idempotency
from app.api.deps import get_dispatcher, get_registry
from app.errors import ServiceUnavailable
from app.jobs.reconcile import purge_expired_idempotency_keys, reconcile
from app.tables import IdempotencyKey, Job, Project

JOBS = "/v1/fine_tuning/jobs"
KEY_COLUMN = 255  # idempotency_keys.key is VARCHAR(255) (migration 0002)


def job_body(training_file: str, **extra) -> dict:
    return {"model": "tuneserve-tiny", "training_file": training_file, **extra}


def create(client, key: str, body: dict):
    return client.post(JOBS, json=body, headers={"Idempotency-Key": key})


def job_count(sessionmaker) -> int:
    with sessionmaker() as session:
        return session.scalar(select(func.count()).select_from(Job))


def stored_keys(sessionmaker) -> dict[str, IdempotencyKey]:
    with sessionmaker() as session:
        return {row.key: row for row in session.scalars(select(IdempotencyKey))}


def project_id(sessionmaker, name: str = "alpha") -> str:
    with sessionmaker() as session:
        return session.scalar(select(Project.id).where(Project.name == name))


def put_key(sessionmaker, key: str, *, created_at: float, request_hash="0" * 64, status_code=None, response=None):
    with sessionmaker() as session:
        session.add(
            IdempotencyKey(
                project_id=project_id(sessionmaker),
                key=key,
                request_hash=request_hash,
                status_code=status_code,
                response=response,
                created_at=created_at,
            )
        )
        session.commit()


def age_key(sessionmaker, key: str, seconds: float) -> None:
    with sessionmaker() as session:
        session.execute(
            update(IdempotencyKey).where(IdempotencyKey.key == key).values(created_at=time.time() - seconds)
        )
        session.commit()


class FailsOnce:
    """A base-model registry whose first lookup raises `error`: a failure in the middle of creating a job."""

    def __init__(self, registry, error: Exception):
        self._registry, self._error = registry, error

    def names(self) -> list[str]:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._registry.names()

    def __getattr__(self, name):
        return getattr(self._registry, name)


class BrokenDispatcher:
    """Every send fails, after the job and its answer were committed."""

    def send(self, job_id: str) -> bool:
        raise RuntimeError("broker on fire")


def test_a_failure_after_the_commit_keeps_the_stored_answer(client, training_file, sessionmaker):
    app = client.app
    app.dependency_overrides[get_dispatcher] = BrokenDispatcher
    try:
        raw = TestClient(app, raise_server_exceptions=False, headers=dict(client.headers))
        body = job_body(training_file)
        assert create(raw, "commit-then-fail", body).status_code == 500
        [stored] = stored_keys(sessionmaker).values()
        assert stored.status_code == 200 and job_count(sessionmaker) == 1  # the job and its answer are in
    finally:
        app.dependency_overrides.pop(get_dispatcher, None)
    retry = create(client, "commit-then-fail", body)
    assert retry.status_code == 200 and retry.json() == stored.response  # replayed, not made twice
    assert job_count(sessionmaker) == 1


@pytest.mark.parametrize(
    "error,status",
    [(RuntimeError("disk on fire"), 500), (ServiceUnavailable("try later", code="busy"), 503)],
    ids=["unexpected-500", "service-unavailable-503"],
)
def test_a_server_error_releases_the_key(client, training_file, sessionmaker, error, status):
    app = client.app
    failing = FailsOnce(app.state.registry, error)
    app.dependency_overrides[get_registry] = lambda: failing
    try:
        raw = TestClient(app, raise_server_exceptions=False, headers=dict(client.headers))
        body = job_body(training_file)
        first = create(raw, "retry-after-5xx", body)
        assert first.status_code == status, first.text
        assert first.json()["error"]["type"] == "server_error"
        assert stored_keys(sessionmaker) == {} and job_count(sessionmaker) == 0  # released, nothing made

        retry = create(raw, "retry-after-5xx", body)
        assert retry.status_code == 200, retry.text
        assert retry.json()["status"] == "queued"
        assert create(raw, "retry-after-5xx", body).json() == retry.json()  # now stored, and replayed
        assert job_count(sessionmaker) == 1
    finally:
        app.dependency_overrides.pop(get_registry, None)


@pytest.mark.parametrize(
    "age,taken_over",
    [(idempotency.IN_FLIGHT_TIMEOUT_SECONDS + 5, True), (idempotency.IN_FLIGHT_TIMEOUT_SECONDS - 5, False)],
    ids=["abandoned", "in-flight"],
)
def test_a_key_left_in_flight_is_taken_over_only_once_abandoned(client, training_file, sessionmaker, age, taken_over):
    body = job_body(training_file)
    # What a first request leaves behind when its process dies between claiming the key and answering.
    put_key(
        sessionmaker,
        "in-flight",
        created_at=time.time() - age,
        request_hash=idempotency.fingerprint("POST", JOBS, body),
    )
    r = create(client, "in-flight", body)
    if taken_over:
        assert r.status_code == 200, r.text
        assert job_count(sessionmaker) == 1
        row = stored_keys(sessionmaker)["in-flight"]
        assert row.status_code == 200 and row.response == r.json()
        assert create(client, "in-flight", body).json() == r.json()
    else:
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "idempotency_key_in_use"
        assert job_count(sessionmaker) == 0
        assert stored_keys(sessionmaker)["in-flight"].status_code is None


def test_an_expired_key_is_new_again(client, training_file, sessionmaker, settings):
    ttl = settings.idempotency_ttl_seconds
    first = create(client, "daily", job_body(training_file))
    assert first.status_code == 200, first.text

    other = job_body(training_file, suffix="next-day")
    age_key(sessionmaker, "daily", ttl - 60)  # not yet expired: still the first request's key
    r = create(client, "daily", other)
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_mismatch"

    age_key(sessionmaker, "daily", ttl + 1)
    second = create(client, "daily", other)
    assert second.status_code == 200, second.text
    assert second.json()["id"] != first.json()["id"] and second.json()["user_provided_suffix"] == "next-day"
    assert job_count(sessionmaker) == 2
    assert create(client, "daily", other).json() == second.json()  # the key now stores the new response


class NoBroker:
    def send(self, job_id: str) -> bool:
        return False


def test_the_reconciler_purges_expired_keys_and_keeps_fresh_ones(client, training_file, sessionmaker, settings):
    ttl = settings.idempotency_ttl_seconds
    now = time.time()
    put_key(sessionmaker, "expired-done", created_at=now - ttl - 10, status_code=200, response={"id": "x"})
    put_key(sessionmaker, "expired-in-flight", created_at=now - ttl - 3600)
    put_key(sessionmaker, "nearly-expired", created_at=now - ttl + 600, status_code=400, response={"error": {}})
    assert create(client, "fresh", job_body(training_file)).status_code == 200

    reconcile(sessionmaker, NoBroker(), settings)
    assert set(stored_keys(sessionmaker)) == {"nearly-expired", "fresh"}

    with sessionmaker() as session:  # a second pass finds nothing more to delete
        assert purge_expired_idempotency_keys(session, ttl) == 0
        session.commit()
    assert set(stored_keys(sessionmaker)) == {"nearly-expired", "fresh"}


def test_the_key_column_holds_the_longest_key_allowed(sessionmaker):
    columns = {c["name"]: c for c in inspect(sessionmaker.kw["bind"]).get_columns("idempotency_keys")}
    assert columns["key"]["type"].length == KEY_COLUMN
    assert IdempotencyKey.__table__.c.key.type.length == KEY_COLUMN
    assert idempotency.MAX_KEY_LENGTH == KEY_COLUMN  # every key the API accepts fits


@pytest.mark.parametrize("length", [0, KEY_COLUMN + 1, 4 * KEY_COLUMN])
def test_a_key_of_the_wrong_length_is_a_clear_4xx_that_creates_nothing(client, training_file, sessionmaker, length):
    r = create(client, "k" * length, job_body(training_file))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "Idempotency-Key" and str(KEY_COLUMN) in error["message"]
    assert job_count(sessionmaker) == 0 and stored_keys(sessionmaker) == {}


def test_a_key_of_the_longest_length_works(client, training_file, sessionmaker):
    key = "k" * (KEY_COLUMN - 1) + "z"
    first = create(client, key, job_body(training_file))
    assert first.status_code == 200, first.text
    assert create(client, key, job_body(training_file)).json() == first.json()
    assert job_count(sessionmaker) == 1 and set(stored_keys(sessionmaker)) == {key}


def test_keys_on_cancel_pause_and_resume_replay_the_first_answer(client, training_file, sessionmaker):
    job_id = client.post(JOBS, json=job_body(training_file)).json()["id"]
    other_id = client.post(JOBS, json=job_body(training_file)).json()["id"]
    base = f"{JOBS}/{job_id}"

    def act(action: str, key: str, target: str = job_id):
        return client.post(f"{JOBS}/{target}/{action}", headers={"Idempotency-Key": key})

    paused = act("pause", "pause-1")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    resumed = act("resume", "resume-1")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    # The job is queued again, but a retry of the pause gets the pause's answer and changes nothing.
    again = act("pause", "pause-1")
    assert again.status_code == 200 and again.json() == paused.json()
    assert client.get(base).json()["status"] == "queued"

    cancelled = act("cancel", "cancel-1")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    # Resuming a cancelled job is a 400, yet the retry of the earlier resume replays its 200.
    assert act("resume", "resume-2").status_code == 400
    assert act("resume", "resume-1").json() == resumed.json()
    assert act("cancel", "cancel-1").json() == cancelled.json()
    messages = [e["message"] for e in client.get(f"{base}/events", params={"limit": 100}).json()["data"]]
    assert [m for m in messages if m.startswith("Fine-tuning job ")] == [
        "Fine-tuning job cancelled",
        "Fine-tuning job resumed",
        "Fine-tuning job paused",
    ]

    # The same key on another job, another action, or a create is another request: 422, and nothing changes.
    for r in (
        act("cancel", "cancel-1", target=other_id),
        act("pause", "cancel-1"),
        create(client, "cancel-1", job_body(training_file)),
    ):
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "idempotency_key_mismatch"
    assert client.get(f"{JOBS}/{other_id}").json()["status"] == "queued"
    assert job_count(sessionmaker) == 2


def test_concurrent_creates_with_one_key_make_one_job(client, training_file, sessionmaker):
    threads, body = 8, job_body(training_file)
    barrier = threading.Barrier(threads)
    responses: list = [None] * threads

    def post(i: int) -> None:
        barrier.wait()
        responses[i] = create(client, "one-job-please", body)

    workers = [threading.Thread(target=post, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 409}, [r.text for r in responses]
    assert all(r.json()["error"]["code"] == "idempotency_key_in_use" for r in responses if r.status_code == 409)
    created = {r.json()["id"] for r in responses if r.status_code == 200}
    assert len(created) == 1, created
    assert job_count(sessionmaker) == 1
    assert create(client, "one-job-please", body).json()["id"] in created
