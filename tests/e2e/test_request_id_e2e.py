"""The request id as the openai SDK sees it over a real uvicorn, and the same id in the server's log."""

from __future__ import annotations

import io
import re

import openai
import pytest

from tests.datasets.samples import valid_chat_file
from tests.e2e.conftest import wait_until
from tests.e2e.server import LiveServer

pytestmark = pytest.mark.slow


def test_the_sdk_reads_the_request_id_that_the_server_logs(sqlite_stack):
    stack = sqlite_stack
    with LiveServer(stack.env, stack.tmp / "api.log") as server:
        sdk = stack.sdk(server)
        uploaded = sdk.files.create(file=("t.jsonl", io.BytesIO(valid_chat_file(10))), purpose="fine-tune")
        raw = sdk.files.with_raw_response.retrieve(uploaded.id, extra_headers={"X-Request-Id": "client-trace-7"})
        with pytest.raises(openai.NotFoundError) as missing:
            sdk.files.retrieve("file-absent")
        with sdk.chat.completions.with_streaming_response.create(
            model="tuneserve-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        ) as streamed:
            assert list(streamed.iter_lines())
        ids = {
            "POST /v1/files": uploaded._request_id,
            f"GET /v1/files/{uploaded.id}": raw.request_id,
            "GET /v1/files/file-absent": missing.value.request_id,
            "POST /v1/chat/completions": streamed.request_id,
        }
        assert raw.request_id == "client-trace-7"
        assert all(re.fullmatch(r"req_[0-9a-f]{32}", ids[k]) for k in ids if k != f"GET /v1/files/{uploaded.id}")
        # Each id is on the access line of its own request, not just somewhere in the log.
        for request, request_id in ids.items():
            line = wait_until(
                lambda request_id=request_id: next(
                    (line for line in server.log().splitlines() if line.endswith(f"request_id={request_id}")), None
                ),
                timeout=10,
                what=f"the access line of {request}",
            )
            assert f'"{request} HTTP/1.1"' in line, line
