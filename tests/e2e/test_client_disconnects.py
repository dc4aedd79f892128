"""A client that leaves mid-upload is not a server error: nothing of the upload stays, and the log says the
client left instead of printing an "unhandled error" traceback."""

from __future__ import annotations

import socket
import time

import pytest

from tests.e2e.conftest import make_key, wait_until
from tests.e2e.server import LiveServer

pytestmark = pytest.mark.slow


def test_a_client_leaving_mid_upload_leaves_nothing_and_no_traceback(sqlite_stack):
    key = make_key(sqlite_stack.sessionmaker, "alpha")
    with LiveServer(sqlite_stack.env, sqlite_stack.tmp / "api.log") as server:
        head = (
            f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n"
        )
        part = (
            '--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            '--b\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'
        )
        with socket.create_connection(("127.0.0.1", server.port)) as conn:
            conn.sendall(head.encode() + part.encode() + b'{"messages": []}\n' * 20000)
            time.sleep(1)  # the server has started writing the upload
        wait_until(lambda: "client disconnected during POST /v1/files" in server.log(), 30, "the disconnect logged")
        tmp = sqlite_stack.tmp / "data" / "storage" / ".tmp"
        wait_until(lambda: not list(tmp.iterdir()), 30, "the partial upload removed")
        assert "unhandled error" not in server.log() and "Traceback" not in server.log()
