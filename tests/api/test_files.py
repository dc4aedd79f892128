"""The Files API through the ASGI app, on Postgres and SQLite."""

from __future__ import annotations

from sqlalchemy import func, select

from app.tables import File
from tests.datasets.samples import jsonl, prompt_completion_example, valid_chat_file


def upload(client, body: bytes, purpose: str | None = "fine-tune", filename: str = "train.jsonl"):
    data = {"purpose": purpose} if purpose is not None else {}
    return client.post("/v1/files", data=data, files={"file": (filename, body, "application/jsonl")})


def stored_nothing(settings, sessionmaker) -> bool:
    with sessionmaker() as session:
        rows = session.scalar(select(func.count()).select_from(File))
    blobs = list((settings.storage_dir / "files").glob("*")) if (settings.storage_dir / "files").exists() else []
    temps = list((settings.storage_dir / ".tmp").glob("*"))
    return rows == 0 and not blobs and not temps


def test_upload_retrieve_content_delete(client, settings, sessionmaker):
    body = valid_chat_file(12)
    r = upload(client, body)
    assert r.status_code == 200, r.text
    obj = r.json()
    assert obj["id"].startswith("file-")
    assert obj == {
        "id": obj["id"],
        "object": "file",
        "bytes": len(body),
        "created_at": obj["created_at"],
        "filename": "train.jsonl",
        "purpose": "fine-tune",
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }
    with sessionmaker() as session:
        row = session.scalar(select(File).where(File.id == obj["id"]))
        assert (row.format, row.n_examples) == ("chat", 12)

    assert client.get(f"/v1/files/{obj['id']}").json() == obj
    content = client.get(f"/v1/files/{obj['id']}/content")
    assert content.status_code == 200 and content.content == body

    deleted = client.delete(f"/v1/files/{obj['id']}")
    assert deleted.json() == {"id": obj["id"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{obj['id']}").status_code == 404
    assert stored_nothing(settings, sessionmaker)


def test_prompt_completion_file_records_format(client, sessionmaker):
    r = upload(client, jsonl(prompt_completion_example(i) for i in range(10)))
    assert r.status_code == 200, r.text
    with sessionmaker() as session:
        assert session.scalar(select(File.format)) == "prompt_completion"


def test_invalid_training_file_is_400_and_stores_nothing(client, settings, sessionmaker):
    body = valid_chat_file(10) + b'{"messages": []}\n{oops\n'
    r = upload(client, body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "file" and error["code"] == "invalid_file"
    assert error["type"] == "invalid_request_error"
    assert "missing_messages_list: 1 (line 11)" in error["message"]
    assert "invalid_json: 1 (line 12)" in error["message"]
    assert stored_nothing(settings, sessionmaker)


def test_too_few_examples_is_invalid_n_examples(client, settings, sessionmaker):
    r = upload(client, valid_chat_file(3))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_n_examples"
    assert stored_nothing(settings, sessionmaker)


def test_other_purposes_are_stored_unvalidated(client, sessionmaker):
    r = upload(client, b"%PDF-1.4 not jsonl at all", purpose="assistants", filename="doc.pdf")
    assert r.status_code == 200, r.text
    assert r.json()["purpose"] == "assistants"
    with sessionmaker() as session:
        assert session.scalar(select(File.n_examples)) is None


def test_purpose_errors(client, settings, sessionmaker):
    r = upload(client, valid_chat_file(), purpose=None)
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = upload(client, valid_chat_file(), purpose="fine-tune-results")
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    assert stored_nothing(settings, sessionmaker)


def test_missing_file_part_and_non_multipart(client):
    r = client.post("/v1/files", data={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = client.post("/v1/files", json={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


def test_two_files_in_one_upload_is_rejected(client, settings, sessionmaker):
    r = client.post(
        "/v1/files",
        data={"purpose": "fine-tune"},
        files=[("file", ("a.jsonl", valid_chat_file())), ("file", ("b.jsonl", valid_chat_file()))],
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert stored_nothing(settings, sessionmaker)


def test_hostile_filenames_are_metadata_only(client, settings):
    names = ["../../etc/passwd", "a/b\\c.jsonl", "nul\x00byte.jsonl", "x" * 10_000, "ünïcödé ✓.jsonl"]
    for name in names:
        r = upload(client, valid_chat_file(), filename=name)
        assert r.status_code == 200, (name, r.text)
        assert len(r.json()["filename"]) <= 255
        assert "\x00" not in r.json()["filename"]
    stored = sorted(p.name for p in (settings.storage_dir / "files").iterdir())
    assert len(stored) == len(names) and all(n.startswith("file-") for n in stored)
    assert not (settings.data_dir.parent / "etc").exists()


def test_non_utf8_filename_is_harmless(client):
    boundary = "XyZ"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="'
        ).encode()
        + b"caf\xe9\xff.jsonl"
        + b'"\r\n\r\n'
        + valid_chat_file()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    r = client.post("/v1/files", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200, r.text
    assert r.json()["filename"].startswith("caf")


def test_list_pagination_order_and_purpose(client):
    ids = [upload(client, valid_chat_file()).json()["id"] for _ in range(5)]
    other = upload(client, b"data", purpose="batch").json()["id"]

    everything = client.get("/v1/files").json()
    assert [f["id"] for f in everything["data"]] == [other, *reversed(ids)]
    assert everything["has_more"] is False

    page = client.get("/v1/files", params={"purpose": "fine-tune", "limit": 2}).json()
    assert [f["id"] for f in page["data"]] == [ids[4], ids[3]]
    assert page["has_more"] is True and page["first_id"] == ids[4] and page["last_id"] == ids[3]
    page = client.get("/v1/files", params={"purpose": "fine-tune", "limit": 2, "after": ids[3]}).json()
    assert [f["id"] for f in page["data"]] == [ids[2], ids[1]]
    page = client.get("/v1/files", params={"purpose": "fine-tune", "limit": 2, "after": ids[1]}).json()
    assert [f["id"] for f in page["data"]] == [ids[0]] and page["has_more"] is False

    asc = client.get("/v1/files", params={"order": "asc", "purpose": "fine-tune"}).json()
    assert [f["id"] for f in asc["data"]] == ids
    # In ascending order `after` walks forward.
    page = client.get("/v1/files", params={"order": "asc", "purpose": "fine-tune", "limit": 2, "after": ids[1]}).json()
    assert [f["id"] for f in page["data"]] == [ids[2], ids[3]] and page["has_more"] is True
    empty = client.get("/v1/files", params={"order": "asc", "purpose": "fine-tune", "after": ids[4]}).json()
    assert empty == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


def test_list_parameter_validation(client):
    for params, param in [({"limit": 0}, "limit"), ({"limit": 10001}, "limit"), ({"order": "up"}, "order")]:
        r = client.get("/v1/files", params=params)
        assert r.status_code == 400, params
        assert r.json()["error"]["param"] == param


def test_other_projects_files_are_404(app_client, alpha_key, beta_key):
    alpha = {"Authorization": f"Bearer {alpha_key}"}
    beta = {"Authorization": f"Bearer {beta_key}"}
    file_id = app_client.post(
        "/v1/files",
        headers=alpha,
        data={"purpose": "fine-tune"},
        files={"file": ("t.jsonl", valid_chat_file())},
    ).json()["id"]

    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files?after={file_id}"),
    ]:
        r = app_client.request(method, path, headers=beta)
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["message"] == f"No such File object: {file_id}"
    assert app_client.get("/v1/files", headers=beta).json()["data"] == []
    assert app_client.get(f"/v1/files/{file_id}", headers=alpha).status_code == 200


def test_upload_cap_with_content_length(client, settings, sessionmaker):
    body = valid_chat_file(10) * (settings.max_upload_bytes // len(valid_chat_file(10)) + 2)
    assert len(body) > settings.max_upload_bytes
    r = upload(client, body)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "file_too_large"
    assert stored_nothing(settings, sessionmaker)


def test_upload_cap_chunked_without_content_length(client, settings, sessionmaker):
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    ).encode()
    line = valid_chat_file(1)
    sent = {"bytes": 0}

    def body():
        yield head
        while sent["bytes"] < settings.max_upload_bytes * 3:
            chunk = line * 500
            sent["bytes"] += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/v1/files", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text
    assert stored_nothing(settings, sessionmaker)


def test_file_exactly_at_cap_is_accepted(client, settings):
    head = valid_chat_file(10)
    template = b'{"prompt": "%s", "completion": "c"}\n'
    padding = settings.max_upload_bytes - len(head) - len(template % b"")
    body = head + template % (b"p" * padding)
    assert len(body) == settings.max_upload_bytes
    r = upload(client, body)
    assert r.status_code == 400  # mixed formats: the cap let it through to validation
    assert "mixed_formats" in r.json()["error"]["message"]
    body = head + b'{"messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "a"}]}\n'
    body = body.replace(b"%s", b"p" * (settings.max_upload_bytes - len(body) + 2))
    assert len(body) == settings.max_upload_bytes
    r = upload(client, body)
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] == settings.max_upload_bytes


def test_start_up_removes_what_interrupted_uploads_left_behind(settings):
    """A writer killed mid-upload leaves its temporary file; the next start removes it (and only stale ones:
    another API process sharing the storage may be writing a fresh one)."""
    import os
    import time

    from fastapi.testclient import TestClient

    from app.main import STALE_TEMP_SECONDS, create_app

    tmp = settings.storage_dir / ".tmp"
    tmp.mkdir(parents=True)
    stale, fresh, stale_dir = tmp / "abc", tmp / "def", tmp / "ghi"
    stale.write_bytes(b"half an upload")
    fresh.write_bytes(b"being written")
    stale_dir.mkdir()
    (stale_dir / "part").write_bytes(b"x")
    old = time.time() - STALE_TEMP_SECONDS - 60
    for path in (stale, stale_dir):
        os.utime(path, (old, old))
    with TestClient(create_app(settings)):
        assert sorted(p.name for p in tmp.iterdir()) == ["def"]
