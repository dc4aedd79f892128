"""The official openai SDK against tuneserve served by uvicorn in a subprocess."""

from __future__ import annotations

import io
import socket

import openai
import pytest

from tests.conftest import make_key
from tests.datasets.samples import valid_chat_file
from tests.e2e.server import LiveServer, tuneserve_env


@pytest.fixture
def server(tmp_path, db_url, settings):
    env = tuneserve_env(settings.data_dir, db_url, TUNESERVE_MAX_UPLOAD_BYTES=str(settings.max_upload_bytes))
    with LiveServer(env, tmp_path / "server.log") as live:
        yield live


@pytest.fixture
def sdk(server, sessionmaker) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=make_key(sessionmaker, "alpha"), max_retries=0)


def test_files_round_trip_with_the_sdk(sdk):
    body = valid_chat_file(12)
    created = sdk.files.create(file=("train.jsonl", io.BytesIO(body)), purpose="fine-tune")
    assert created.id.startswith("file-") and created.status == "processed" and created.bytes == len(body)
    assert sdk.files.wait_for_processing(created.id).status == "processed"

    assert sdk.files.retrieve(created.id) == created
    assert sdk.files.content(created.id).read() == body

    more = [sdk.files.create(file=(f"t{i}.jsonl", body), purpose="fine-tune").id for i in range(4)]
    # The SDK's auto-pager follows `after` until has_more is false.
    listed = [f.id for f in sdk.files.list(limit=2)]
    assert listed == [*reversed(more), created.id]

    deleted = sdk.files.delete(created.id)
    assert deleted.deleted is True and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(created.id)


def test_sdk_errors_are_typed(sdk, server):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.files.create(file=("bad.jsonl", b"[]\n" * 12), purpose="fine-tune")
    assert info.value.body["param"] == "file"
    assert "data_type: 12 (lines 1, 2, 3, 4, 5, ...)" in info.value.body["message"]
    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="ts-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.files.list()


def test_chunked_upload_over_cap_is_cut_off_early(server, settings, sessionmaker):
    """A chunked body without Content-Length: the server answers 413 as soon as the cap is passed,
    without waiting for (or storing) the rest."""
    key = make_key(sessionmaker, "alpha")
    boundary = "cap-test"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    ).encode()
    limit = settings.max_upload_bytes * 20
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            (
                f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        chunk = head + valid_chat_file(200)
        sock.settimeout(0.05)
        response = b""
        while sent < limit:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            chunk = valid_chat_file(200)
            try:
                response = sock.recv(65536)
            except TimeoutError:
                continue
            if response:
                break
        sock.settimeout(10)
        while b"\r\n\r\n" not in response:
            data = sock.recv(65536)
            if not data:
                break
            response += data
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < limit
    assert not list((settings.storage_dir / ".tmp").iterdir())
