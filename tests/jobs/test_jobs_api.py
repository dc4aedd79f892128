"""The jobs API through the ASGI app (no worker): creation checks, objects, lists, state changes, isolation."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, update

from app.jobs.events import add_event
from app.tables import Job, JobCheckpoint, JobEvent
from tests.datasets.samples import (
    chat_example,
    jsonl,
    preference_example,
    prompt_completion_example,
    valid_chat_file,
)

JOB_KEYS = {
    "id", "object", "created_at", "model", "organization_id", "status", "fine_tuned_model", "finished_at",
    "trained_tokens", "estimated_finish", "training_file", "validation_file", "result_files", "seed",
    "hyperparameters", "method", "error", "integrations", "metadata", "user_provided_suffix",
}  # fmt: skip


def upload(client, body: bytes = None, purpose: str = "fine-tune") -> str:
    r = client.post("/v1/files", data={"purpose": purpose}, files={"file": ("t.jsonl", body or valid_chat_file(12))})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def create(client, headers=None, **body):
    body.setdefault("model", "tuneserve-tiny")
    return client.post("/v1/fine_tuning/jobs", json=body, headers=headers or {})


@pytest.fixture
def training_file(client) -> str:
    return upload(client)


def test_create_returns_a_complete_job_object(client, training_file):
    r = create(client, training_file=training_file, suffix="my-model", metadata={"team": "a"}, lora_r=4)
    assert r.status_code == 200, r.text
    job = r.json()
    assert set(job) >= JOB_KEYS
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job"
    assert job["status"] == "queued" and job["fine_tuned_model"] is None and job["error"] is None
    assert job["finished_at"] is None and job["trained_tokens"] is None and job["estimated_finish"] is None
    assert job["hyperparameters"] == {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto",
                                      "lora_r": 4}  # fmt: skip
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": job["hyperparameters"]}}
    assert job["lora_r"] == 4  # extra options are echoed
    assert job["metadata"] == {"team": "a"} and job["user_provided_suffix"] == "my-model"
    assert job["result_files"] == [] and job["validation_file"] is None and job["seed"] == 42
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json() == job

    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()
    messages = [e["message"] for e in events["data"]]
    assert messages[0] == "Files validated, moving job to queued state"  # newest first
    assert messages[-1] == f"Created fine-tuning job: {job['id']}"
    assert all(e["object"] == "fine_tuning.job.event" and e["type"] == "message" for e in events["data"])


def test_method_form_and_explicit_hyperparameters(client, training_file):
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}}
    job = create(client, training_file=training_file, method=method, seed=7).json()
    assert job["hyperparameters"]["n_epochs"] == 2 and job["hyperparameters"]["batch_size"] == 4
    assert job["seed"] == 7


@pytest.mark.parametrize(
    "body,param,code",
    [
        ({"training_file": "file-missing"}, "training_file", "file_not_found"),
        ({"model": "no-such-model"}, "model", "model_not_found"),
        ({"suffix": "bad suffix!"}, "suffix", None),
        ({"suffix": "x" * 65}, "suffix", None),
        ({"seed": -1}, "seed", None),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "invalid_hyperparameters"),
        ({"hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs", "invalid_hyperparameters"),
        ({"hyperparameters": {"batch_size": 257}}, "hyperparameters.batch_size", "invalid_hyperparameters"),
        ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier", None),
        ({"hyperparameters": {"bogus": 1}}, "hyperparameters.bogus", "invalid_hyperparameters"),
        ({"lora_r": 0}, "hyperparameters.lora_r", "invalid_hyperparameters"),
        ({"not_an_option": 1}, "not_an_option", "unknown_parameter"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", None),
        ({"metadata": {"k": "v" * 513}}, "metadata.k", None),
        ({"method": {"type": "reinforcement"}}, "method.type", "unsupported_method"),
        ({"method": {"type": "dpo"}}, "training_file", "invalid_file_format"),  # chat data, not preference pairs
        ({"hyperparameters": {"beta": 0.2}}, "hyperparameters.beta", "invalid_hyperparameters"),  # DPO's only
        ({"method": {"type": "nonsense"}}, "method.type", None),
        ({"model": None}, "model", None),
        ({"early_stopping": {"patience": 2}}, "early_stopping", None),  # no validation file to decide on
        ({"early_stopping": {"patience": 0}}, "early_stopping.patience", "invalid_hyperparameters"),
    ],
)
def test_creation_checks(client, training_file, body, param, code):
    body = {"training_file": training_file, **body}
    r = create(client, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    if code:
        assert error["code"] == code
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_file_checks(client, training_file):
    assert create(client, training_file=training_file, validation_file=training_file).json()["error"]["param"] == (
        "validation_file"
    )
    batch_file = upload(client, b"anything", purpose="batch")
    r = create(client, training_file=batch_file)
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file"
    preference = upload(client, jsonl(preference_example(i) for i in range(10)))
    r = create(client, training_file=preference)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file_format"
    r = create(client, training_file=training_file, validation_file=preference)
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_file"
    completion = upload(client, jsonl(prompt_completion_example(i) for i in range(10)))
    assert create(client, training_file=completion).status_code == 200


def test_a_dpo_job_takes_preference_files_and_dpo_hyperparameters(client, training_file):
    preference = upload(client, jsonl(preference_example(i) for i in range(10)))
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}}
    r = create(client, training_file=preference, method=dpo)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["method"]["type"] == "dpo" and job["method"]["dpo"]["hyperparameters"]["beta"] == 0.25
    assert job["hyperparameters"]["n_epochs"] == 2
    bad = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}
    r = create(client, training_file=preference, method=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "hyperparameters.beta"
    r = create(client, training_file=preference, validation_file=training_file, method={"type": "dpo"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_file"
    mixed = {"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 2}}}  # would be dropped silently
    r = create(client, training_file=preference, method=mixed)
    assert r.status_code == 400 and r.json()["error"]["param"] == "method"


def test_a_conversation_the_base_models_template_refuses_is_a_400_naming_the_line_and_role(client):
    """Gemma 2's template raises on system messages and Phi-3's leaves tool turns out; either would otherwise
    fail or silently mistrain deep in the job. The same files are fine for a model whose template renders them."""
    no_system = [{"messages": chat_example(i)["messages"][1:]} for i in range(10)]
    with_system = upload(client, jsonl([*no_system, chat_example(10)]))
    r = create(client, model="tiny-gemma2", training_file=with_system)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "training_file" and error["code"] == "unsupported_conversation"
    assert "Line 11" in error["message"] and "'system' messages" in error["message"]
    assert create(client, model="tiny-gemma2", training_file=upload(client, jsonl(no_system))).status_code == 200

    tool_turn = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "tool", "tool_call_id": "call00001", "content": "rain"},
            {"role": "assistant", "content": "It rains."},
        ]
    }
    tools_file = upload(client, jsonl([*no_system, tool_turn]))
    r = create(client, model="tiny-phi3", training_file=tools_file)
    error = r.json()["error"]
    assert r.status_code == 400 and "Line 11" in error["message"] and "'tool' messages" in error["message"]

    # Mistral's template refuses tool call ids that are not 9 characters long: one call id of another length, after
    # ten good ones, is found too (a check by roles alone would not).
    def tool_example(call_id: str) -> dict:
        call = {"id": call_id, "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        return {
            "messages": [
                {"role": "user", "content": "Look it up"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call_id, "content": "found"},
                {"role": "assistant", "content": "Found."},
            ]
        }

    ids_file = upload(client, jsonl([*(tool_example("abcdefghi") for _ in range(10)), tool_example("call_abc123")]))
    r = create(client, model="tiny-mistral", training_file=ids_file)
    assert r.status_code == 400 and "Line 11" in r.json()["error"]["message"], r.text
    r = create(client, model="tiny-phi3", training_file=with_system, validation_file=tools_file)
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_file"
    assert create(client, model="tiny-qwen2", training_file=tools_file).status_code == 200


def test_lora_options_the_base_model_cannot_train_or_serve_are_refused_at_creation(client, training_file):
    """Phi-3 fuses q/k/v into qkv_proj: a Llama-style target list names nothing there. A rank above what the
    engine serves would train and then never serve."""
    r = create(client, model="tiny-phi3", training_file=training_file, target_modules=["q_proj", "o_proj"])
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "hyperparameters.target_modules"
    assert "['q_proj']" in error["message"] and "qkv_proj" in error["message"]
    for model in ("tiny-phi3", "tiny-qwen2"):
        body = {"target_modules": ["o_proj", "down_proj"]}
        assert create(client, model=model, training_file=training_file, **body).status_code == 200
    r = create(client, training_file=training_file, lora_r=65)
    assert r.status_code == 400 and r.json()["error"]["param"] == "hyperparameters.lora_r"
    assert "64" in r.json()["error"]["message"]
    assert create(client, training_file=training_file, lora_r=64).status_code == 200


def test_early_stopping_is_a_resolved_hyperparameter(client, training_file):
    body = {"validation_file": upload(client), "early_stopping": {"patience": 3, "min_delta": 0.01}}
    job = create(client, training_file=training_file, **body).json()
    assert job["hyperparameters"]["early_stopping"] == {"patience": 3, "min_delta": 0.01}


def test_a_file_an_unfinished_job_needs_cannot_be_deleted(client, training_file):
    validation = upload(client)
    job = create(client, training_file=training_file, validation_file=validation).json()["id"]
    for file_id in (training_file, validation):
        r = client.delete(f"/v1/files/{file_id}")
        error = r.json()["error"]
        assert r.status_code == 409 and error["code"] == "file_in_use" and job in error["message"]
        assert client.get(f"/v1/files/{file_id}").status_code == 200
    assert client.post(f"/v1/fine_tuning/jobs/{job}/cancel").status_code == 200
    assert client.delete(f"/v1/files/{training_file}").json()["deleted"] is True
    assert client.get(f"/v1/fine_tuning/jobs/{job}").json()["training_file"] == training_file


def test_too_few_examples_fails_like_openai(client, training_file, sessionmaker):
    from app.tables import File

    with sessionmaker() as session:  # a file stored before the upload minimum existed
        session.execute(update(File).where(File.id == training_file).values(n_examples=3))
        session.commit()
    error = create(client, training_file=training_file).json()["error"]
    assert error == {
        "code": "invalid_n_examples",
        "param": "training_file",
        "message": "Training file has 3 example(s), but must have at least 10 examples",
        "type": "invalid_request_error",
    }


def test_list_pagination_and_metadata_filter(client, training_file):
    ids = [create(client, training_file=training_file, metadata={"i": str(i % 2)}).json()["id"] for i in range(5)]
    page = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == [ids[4], ids[3]] and page["has_more"] is True
    page = client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": ids[3]}).json()
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]]
    page = client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": ids[1]}).json()
    assert [j["id"] for j in page["data"]] == [ids[0]] and page["has_more"] is False
    odd = client.get("/v1/fine_tuning/jobs", params={"metadata[i]": "1"}).json()
    assert [j["id"] for j in odd["data"]] == [ids[3], ids[1]]


def test_events_pagination(client, training_file):
    job_id = create(client, training_file=training_file).json()["id"]
    first = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 2}).json()
    assert len(first["data"]) == 2 and first["has_more"] is True
    rest = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": first["data"][-1]["id"], "limit": 10}
    ).json()
    assert len(rest["data"]) == 1 and rest["has_more"] is False
    assert {e["id"] for e in first["data"]}.isdisjoint(e["id"] for e in rest["data"])
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()
    assert checkpoints == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


def walk(client, path: str, limit: int) -> tuple[list[str], list[dict]]:
    """Every id of a list, following `after` page by page; and the pages as returned."""
    ids, pages, after = [], [], None
    while True:
        params = {"limit": limit, **({"after": after} if after else {})}
        r = client.get(path, params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        pages.append(page)
        ids += [item["id"] for item in page["data"]]
        if not page["has_more"]:
            return ids, pages
        assert len(page["data"]) == limit and len(pages) < 50
        after = page["data"][-1]["id"]


def add_checkpoints(sessionmaker, job_id: str, steps: range, tag: str) -> list[str]:
    """Checkpoint rows as the worker writes them, oldest first. Their ids sort the other way round, so a list
    ordered or cut by id instead of by insertion shows."""
    ids = [f"ftckpt_{tag}{99 - step:02d}" for step in steps]
    with sessionmaker() as session:
        for checkpoint_id, step in zip(ids, steps, strict=True):
            session.add(
                JobCheckpoint(
                    id=checkpoint_id,
                    job_id=job_id,
                    step_number=step,
                    metrics={"step": step, "train_loss": 1.0 / step},
                    fine_tuned_model_checkpoint=f"ft:tuneserve-tiny:alpha::x:ckpt-step-{step}",
                    storage_key=f"checkpoints/{job_id}/{step}",
                    created_at=1_700_000_000,  # one second for all: the order cannot come from the time
                )
            )
            session.flush()
        session.commit()
    return ids


@pytest.mark.parametrize("limit", [1, 3, 4, 100])
def test_events_after_cursor_walks_every_event_once_newest_first(client, training_file, sessionmaker, limit):
    job_id = create(client, training_file=training_file).json()["id"]
    with sessionmaker() as session:
        for i in range(9):
            add_event(session, job_id, f"Step {i}/9: training loss=0.5")
            session.flush()
        session.commit()
        expected = list(
            session.scalars(select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc()))
        )
    assert len(expected) == 12
    ids, pages = walk(client, f"/v1/fine_tuning/jobs/{job_id}/events", limit)
    assert ids == expected
    assert [p["has_more"] for p in pages] == [True] * (len(pages) - 1) + [False]
    assert len(pages) == max(1, -(-len(expected) // limit))


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 10])
def test_checkpoints_after_cursor_walks_every_checkpoint_once_newest_first(client, training_file, sessionmaker, limit):
    job_id = create(client, training_file=training_file).json()["id"]
    other_job = create(client, training_file=training_file).json()["id"]
    ids = add_checkpoints(sessionmaker, job_id, range(1, 8), "a")
    add_checkpoints(sessionmaker, other_job, range(1, 4), "b")  # interleaved in the table, never listed here
    walked, pages = walk(client, f"/v1/fine_tuning/jobs/{job_id}/checkpoints", limit)
    assert walked == ids[::-1]
    for page in pages:
        assert page["object"] == "list"
        assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
        assert all(c["fine_tuning_job_id"] == job_id for c in page["data"])
    steps = [c["step_number"] for page in pages for c in page["data"]]
    assert steps == list(range(7, 0, -1))
    assert [p["has_more"] for p in pages] == [True] * (len(pages) - 1) + [False]


def test_a_bad_or_foreign_after_cursor_is_404_on_after(client, training_file, sessionmaker):
    job_id = create(client, training_file=training_file).json()["id"]
    other_job = create(client, training_file=training_file).json()["id"]
    own_checkpoint = add_checkpoints(sessionmaker, job_id, range(1, 3), "a")[0]
    foreign_checkpoint = add_checkpoints(sessionmaker, other_job, range(1, 3), "b")[0]
    own_event = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"][0]["id"]
    foreign_event = client.get(f"/v1/fine_tuning/jobs/{other_job}/events").json()["data"][0]["id"]
    events, checkpoints = f"/v1/fine_tuning/jobs/{job_id}/events", f"/v1/fine_tuning/jobs/{job_id}/checkpoints"
    for path, after in [
        (events, "ftevent-doesnotexist"),
        (events, foreign_event),  # another job's event
        (events, own_checkpoint),  # an id of the wrong kind
        (checkpoints, "ftckpt_doesnotexist"),
        (checkpoints, foreign_checkpoint),
        (checkpoints, own_event),
    ]:
        r = client.get(path, params={"after": after})
        assert r.status_code == 404, (path, after, r.text)
        assert r.json()["error"]["param"] == "after", (path, after)
    assert client.get(events, params={"after": own_event}).status_code == 200
    assert client.get(checkpoints, params={"after": own_checkpoint}).status_code == 200


def test_state_changes_and_illegal_transitions(client, training_file, sessionmaker):
    job_id = create(client, training_file=training_file).json()["id"]
    base = f"/v1/fine_tuning/jobs/{job_id}"
    assert client.post(f"{base}/resume").status_code == 400  # not paused
    assert client.post(f"{base}/pause").json()["status"] == "paused"
    assert client.post(f"{base}/pause").status_code == 400
    assert client.post(f"{base}/resume").json()["status"] == "queued"
    cancelled = client.post(f"{base}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    for action in ("cancel", "pause", "resume"):
        r = client.post(f"{base}/{action}")
        assert r.status_code == 400, action
        assert r.json()["error"]["code"] == "invalid_job_state"
    messages = [e["message"] for e in client.get(f"{base}/events").json()["data"]]
    assert messages[:3] == ["Fine-tuning job cancelled", "Fine-tuning job resumed", "Fine-tuning job paused"]


def test_a_running_job_reads_running_until_its_worker_has_paused(client, training_file, sessionmaker):
    """The status a client reads is true: pausing a running job asks its worker to checkpoint and let go, and
    only then does the job read as paused; a resume meanwhile withdraws the pause."""
    job_id = create(client, training_file=training_file).json()["id"]
    base = f"/v1/fine_tuning/jobs/{job_id}"
    with sessionmaker() as session:  # a worker has claimed it
        session.execute(update(Job).where(Job.id == job_id).values(status="running", attempt=1))
        session.commit()
    assert client.post(f"{base}/pause").json()["status"] == "running"
    assert client.post(f"{base}/pause").json()["status"] == "running"  # asked already: nothing more happens
    assert client.post(f"{base}/resume").json()["status"] == "running"  # withdrawn before the worker stopped
    with sessionmaker() as session:
        assert session.scalar(select(Job.pause_requested).where(Job.id == job_id)) is False
    messages = [e["message"] for e in client.get(f"{base}/events").json()["data"]]
    assert messages[:2] == [
        "Pause withdrawn; the job keeps running",
        "Pause requested; the job pauses after writing a checkpoint",
    ]


def test_idempotency_replay_and_mismatch(client, training_file, sessionmaker):
    headers = {"Idempotency-Key": "create-1"}
    first = create(client, headers, training_file=training_file)
    again = create(client, headers, training_file=training_file)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    other = create(client, headers, training_file=training_file, suffix="different")
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_mismatch"
    with sessionmaker() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1
    # A client error is replayed too, and does not create anything.
    bad = create(client, {"Idempotency-Key": "bad-1"}, training_file="file-nope")
    assert create(client, {"Idempotency-Key": "bad-1"}, training_file="file-nope").json() == bad.json()


def test_idempotency_keys_are_per_project(app_client, alpha_key, beta_key):
    for key in (alpha_key, beta_key):
        app_client.headers["Authorization"] = f"Bearer {key}"
        file_id = upload(app_client)
        r = create(app_client, {"Idempotency-Key": "same"}, training_file=file_id)
        assert r.status_code == 200, r.text


def test_other_projects_jobs_are_404(app_client, alpha_key, beta_key):
    app_client.headers["Authorization"] = f"Bearer {alpha_key}"
    file_id = upload(app_client)
    job_id = create(app_client, training_file=file_id).json()["id"]
    app_client.headers["Authorization"] = f"Bearer {beta_key}"
    for method, path in [
        ("GET", f"/v1/fine_tuning/jobs/{job_id}"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/pause"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/resume"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints"),
        ("GET", f"/v1/fine_tuning/jobs?after={job_id}"),
    ]:
        r = app_client.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
    assert app_client.get("/v1/fine_tuning/jobs").json()["data"] == []
    # Nor can another project train on alpha's file.
    r = create(app_client, training_file=file_id)
    assert r.status_code == 400 and r.json()["error"]["code"] == "file_not_found"
    # Nor validate on it: answered like a file that does not exist, on `validation_file`.
    own_file = upload(app_client)
    r = create(app_client, training_file=own_file, validation_file=file_id)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "file_not_found" and r.json()["error"]["param"] == "validation_file"
    assert app_client.get("/v1/fine_tuning/jobs").json()["data"] == []


@pytest.mark.parametrize("integrations", [[{"type": "wandb", "wandb": {"project": "p"}}], [{"type": "mlflow"}]])
def test_integrations_are_refused_rather_than_dropped(client, training_file, integrations):
    r = create(client, training_file=training_file, integrations=integrations)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "integrations" and error["code"] == "unsupported_parameter"
    assert integrations[0]["type"] in error["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


@pytest.mark.parametrize("integrations", [[], None])
def test_no_integrations_is_accepted(client, training_file, integrations):
    r = create(client, training_file=training_file, integrations=integrations)
    assert r.status_code == 200, r.text
    assert r.json()["integrations"] == []
