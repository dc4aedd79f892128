"""Authentication and the error envelope on every kind of failure."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import session_scope
from app.main import create_app
from app.services import keys
from app.tables import ApiKey

ENVELOPE_KEYS = {"message", "type", "param", "code"}


def assert_envelope(response, status: int, *, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_KEYS
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def test_missing_unknown_and_malformed_keys_are_401(app_client):
    assert_envelope(app_client.get("/v1/files"), 401, code="missing_api_key")
    r = app_client.get("/v1/files", headers={"Authorization": "Bearer ts-not-a-real-key"})
    error = assert_envelope(r, 401, code="invalid_api_key")
    assert error["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    assert_envelope(app_client.get("/v1/files", headers={"Authorization": "Basic abc"}), 401)


def test_revoked_key_is_401(app_client, sessionmaker, alpha_key):
    headers = {"Authorization": f"Bearer {alpha_key}"}
    assert app_client.get("/v1/files", headers=headers).status_code == 200
    with session_scope(sessionmaker) as session:
        keys.revoke_key(session, alpha_key[: keys.DISPLAY_PREFIX_LEN])
    assert_envelope(app_client.get("/v1/files", headers=headers), 401, code="invalid_api_key")


def test_keys_are_stored_hashed_with_a_display_prefix(sessionmaker, alpha_key):
    assert alpha_key.startswith("ts-") and len(alpha_key) >= 3 + 43  # 256 bits in url-safe base64
    with sessionmaker() as session:
        row = session.scalar(select(ApiKey))
    assert row.key_hash == keys.hash_key(alpha_key) and alpha_key not in row.key_hash
    assert row.prefix == alpha_key[:12]


def test_revoke_refuses_ambiguous_prefix(sessionmaker):
    with session_scope(sessionmaker) as session:
        keys.create_key(session, "p")
        keys.create_key(session, "p")
    with session_scope(sessionmaker) as session:
        try:
            keys.revoke_key(session, "ts-")
        except keys.InvalidRequest as exc:
            assert exc.param == "prefix"
        else:
            raise AssertionError("an ambiguous prefix was accepted")


def test_unknown_route_and_method(client):
    error = assert_envelope(client.get("/v1/nope"), 404, code="unknown_url")
    assert "GET /v1/nope" in error["message"]
    assert_envelope(client.put("/v1/files"), 405)


def test_validation_errors_are_400_with_param(client):
    assert_envelope(client.get("/v1/files", params={"limit": "many"}), 400, param="limit", code="invalid_value")


def test_unexpected_exception_is_500_without_details(settings, caplog):
    app = create_app(settings)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internal detail")

    with TestClient(app, raise_server_exceptions=False) as c:
        error = assert_envelope(c.get("/boom"), 500)
    assert "secret" not in error["message"] and error["type"] == "server_error"
    assert "secret internal detail" in caplog.text


def test_health_and_readiness(app_client):
    assert app_client.get("/healthz").json() == {"status": "ok"}
    assert app_client.get("/readyz").status_code == 200


def test_readyz_is_503_when_the_database_is_unreachable(tmp_path):
    from app.config import Settings

    settings = Settings(data_dir=tmp_path, database_url="postgresql://postgres@127.0.0.1:1/none")
    with TestClient(create_app(settings)) as c:
        error = assert_envelope(c.get("/readyz"), 503, code="database_unavailable")
        assert c.get("/healthz").status_code == 200
    assert "database unreachable" in error["message"]


def test_values_the_database_cannot_hold_are_400_not_500(client):
    for path in ("/v1/files?after=%00", "/v1/files/file-%00", "/v1/fine_tuning/jobs/ftjob-%00x"):
        r = client.get(path)
        assert r.status_code in (400, 404), (path, r.text)
        assert_envelope(r, r.status_code)
