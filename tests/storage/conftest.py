from __future__ import annotations

import uuid

import pytest

from app.storage import LocalStorage
from app.storage.cache import LocalCache
from app.storage.s3 import S3Storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    """Each backend, fresh: the data directory, and a prefix of its own in the S3 server's bucket."""
    if request.param == "local":
        return LocalStorage(tmp_path / "storage")
    server = request.getfixturevalue("s3_server")
    cache = LocalCache(tmp_path / "cache", max_bytes=1024**3)
    return S3Storage(server.client(), server.BUCKET, f"contract-{uuid.uuid4().hex[:8]}", cache)
