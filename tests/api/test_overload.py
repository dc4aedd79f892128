"""When every database connection is in use the API says so: 503 `database_busy` with Retry-After, and /readyz
tells that overload from a database it cannot reach. It used to answer 500 and call the database unreachable."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app


@pytest.fixture
def settings(tmp_path, db_url):
    return Settings(
        data_dir=tmp_path / "data", database_url=db_url, db_pool_size=1, db_max_overflow=0, db_pool_timeout_seconds=0.2
    )


def test_an_exhausted_pool_is_a_503_with_retry_after(settings, alpha_key):
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {alpha_key}"
        assert client.get("/v1/models").status_code == 200
        held = client.app.state.engine.connect()  # the pool's only connection
        try:
            r = client.get("/v1/models")
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "database_busy"
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "database_busy"
        finally:
            held.close()
        assert client.get("/v1/models").status_code == 200
        assert client.get("/readyz").json()["database"] == "ok"


def test_an_unreachable_database_is_told_apart(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", database_url="postgresql://nobody@127.0.0.1:1/none")
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "database_unavailable"
