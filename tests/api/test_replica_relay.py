"""The relay to an inference replica, against a stand-in replica (a real HTTP server on a free port): answers pass
through whole, the count of open relays goes back to zero however a relay ends (answered, the client gone mid-way,
or a response never sent), and a client that leaves closes the replica's connection."""

from __future__ import annotations

import asyncio
import contextlib
import gc

from aiohttp import ClientConnectionResetError, web
from starlette.requests import ClientDisconnect

from app.api.replicas import ReplicaPool
from app.services.keys import CurrentProject

PROJECT = CurrentProject(id="p1", name="équipe")
CHUNKS = 50


async def replica_stand_in() -> tuple[web.AppRunner, str, dict]:
    seen: dict = {"closed_early": 0, "headers": None}

    async def stream(request: web.Request) -> web.StreamResponse:
        seen["headers"] = dict(request.headers)
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "x-request-id": "rid"})
        await response.prepare(request)
        try:
            for i in range(CHUNKS):
                await response.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(0.01)
        except (ConnectionResetError, ClientConnectionResetError, asyncio.CancelledError):
            seen["closed_early"] += 1
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}", seen


async def send_response(response, disconnect_after: int | None = None) -> list[bytes]:
    """Run a Starlette response as the server would, collecting its body; the client leaves after N chunks."""
    body: list[bytes] = []
    left = asyncio.Event()

    async def receive():
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            body.append(message["body"])
            if disconnect_after is not None and len(body) >= disconnect_after:
                left.set()
                raise OSError("client gone")

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "path": "/", "headers": []}
    with contextlib.suppress(OSError, ClientDisconnect):
        await response(scope, receive, send)
    return body


def test_relays_pass_answers_through_and_always_end():
    async def main():
        runner, url, seen = await replica_stand_in()
        pool = ReplicaPool([url], token="t" * 16)
        try:
            # Answered to the end: every chunk, the relayed headers, and the relay is counted while open only.
            relayed = await pool.forward("/v1/completions", b"{}", "m", PROJECT, "rid")
            assert pool._in_flight == 1
            body = await send_response(relayed)
            assert b"".join(body) == b"".join(f"data: {i}\n\n".encode() for i in range(CHUNKS))
            assert relayed.headers["x-request-id"] == "rid" and relayed.headers["x-tuneserve-replica"] == url
            assert seen["headers"]["x-tuneserve-project-name"] == "%C3%A9quipe"
            assert pool._in_flight == 0

            # The client leaves after 3 chunks: the replica's connection is closed (it stops generating).
            relayed = await pool.forward("/v1/completions", b"{}", "m", PROJECT, None)
            assert len(await send_response(relayed, disconnect_after=3)) == 3
            for _ in range(100):
                if seen["closed_early"]:
                    break
                await asyncio.sleep(0.02)
            assert seen["closed_early"] == 1 and pool._in_flight == 0

            # A response that is never sent (the request failed after forwarding) is not counted forever.
            relayed = await pool.forward("/v1/completions", b"{}", "m", PROJECT, None)
            assert pool._in_flight == 1
            del relayed
            gc.collect()
            assert pool._in_flight == 0
        finally:
            await pool.close()
            await runner.cleanup()

    asyncio.run(main())
