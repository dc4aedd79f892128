"""GET /v1/fine_tuning/jobs/{id}/metrics: a job's metric events as columns, only what is new since a cursor."""

from __future__ import annotations

from app.db import session_scope
from app.jobs.events import add_event


def add_steps(sessionmaker, job_id: str, steps: range, *, valid_every: int = 0) -> None:
    with session_scope(sessionmaker) as session:
        for step in steps:
            data = {"step": step, "train_loss": 1 / step, "train_mean_token_accuracy": 0.5, "total_steps": 99}
            if valid_every and step % valid_every == 0:
                data["valid_loss"] = 2 / step
            add_event(session, job_id, f"Step {step}", type="metrics", data=data)
            add_event(session, job_id, f"not a metric {step}")  # other events are left out


def test_metrics_come_as_columns_and_then_only_what_is_new(client, create_job, sessionmaker):
    job_id = create_job()
    empty = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()
    assert empty == {"object": "fine_tuning.job.metrics", "data": {}, "last_id": None, "has_more": False}

    add_steps(sessionmaker, job_id, range(1, 7), valid_every=3)
    first = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()
    columns = first["data"]
    assert list(columns) == ["step", "train_loss", "train_mean_token_accuracy", "valid_loss"]  # only what it has
    assert (
        columns["step"] == [1, 2, 3, 4, 5, 6]
        and '"step":[1,2,3,' in client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").text
    )  # integers stay integers
    assert columns["train_loss"] == [1.0, 0.5, 0.333333, 0.25, 0.2, 0.166667]  # 6 significant digits
    assert columns["valid_loss"] == [None, None, 0.666667, None, None, 0.333333]

    add_steps(sessionmaker, job_id, range(7, 9))
    since = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", params={"after": first["last_id"]}).json()
    assert since["data"]["step"] == [7, 8] and "valid_loss" not in since["data"]
    nothing_new = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", params={"after": since["last_id"]}).json()
    assert nothing_new["data"] == {} and nothing_new["last_id"] == since["last_id"]

    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", params={"limit": 5}).json()
    assert page["data"]["step"] == [1, 2, 3, 4, 5] and page["has_more"] is True


def test_metrics_are_gzipped_for_clients_that_accept_it(client, create_job, sessionmaker):
    job_id = create_job()
    add_steps(sessionmaker, job_id, range(1, 400))
    r = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", headers={"Accept-Encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip" and r.json()["data"]["step"][-1] == 399
    raw = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in raw.headers and raw.json() == r.json()
    assert int(r.headers["content-length"]) < len(raw.content) / 2  # what goes over the wire


def test_metrics_of_a_missing_job_or_after_a_missing_event_are_404(client, create_job, sessionmaker):
    job_id = create_job()
    assert client.get("/v1/fine_tuning/jobs/ftjob-nope/metrics").status_code == 404
    r = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", params={"after": "ftevent-nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "after"
