"""A blob store that does not answer is StorageUnavailable, never a missing file or a bare botocore error: the
API answers 503 with Retry-After and changes nothing, and the worker re-drives the job instead of failing it."""

from __future__ import annotations

import boto3
import pytest
from botocore.config import Config
from fastapi.testclient import TestClient

from app.main import create_app
from app.storage import StorageUnavailable
from app.storage.cache import LocalCache
from app.storage.s3 import S3Storage
from tests.datasets.samples import valid_chat_file
from tests.e2e.server import free_port


@pytest.fixture
def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_every_operation_says_the_store_is_unavailable(dead_endpoint, tmp_path):
    client = boto3.client(
        "s3",
        endpoint_url=dead_endpoint,
        aws_access_key_id="x",
        aws_secret_access_key="x",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    storage = S3Storage(client, "bucket", "p", LocalCache(tmp_path, 10**6))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a").write_bytes(b"a")

    def commit():
        writer = storage.writer("files/x")
        writer.write(b"data")
        writer.commit()

    for operation in (
        commit,
        lambda: storage.exists("files/x"),
        lambda: storage.local_file("files/x"),
        lambda: list(storage.iter_chunks("files/x")),
        lambda: storage.put_dir("models/j/attempt-1", tmp_path / "dir"),
        lambda: storage.local_dir("models/j/attempt-1"),
        lambda: storage.delete("files/x"),
        lambda: storage.remove_stale_temp_files(0),
    ):
        with pytest.raises(StorageUnavailable):
            operation()


def test_an_upload_to_a_store_that_is_down_is_503_and_leaves_no_row(dead_endpoint, settings, alpha_key, monkeypatch):
    for name, value in {
        "AWS_ENDPOINT_URL": dead_endpoint,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    settings = settings.model_copy(update={"storage_url": "s3://bucket/p", "inference": "off"})
    with TestClient(create_app(settings)) as client:  # starts although its clean-up cannot reach the store
        client.headers["Authorization"] = f"Bearer {alpha_key}"
        r = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", valid_chat_file(12))})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "storage_unavailable" and r.headers["retry-after"] == "1"
        assert client.get("/v1/files").json()["data"] == []
