"""Bounded load: 200 concurrent clients of two projects mixing uploads, job polls, streamed and whole chats for 60 s
against `tuneserve up` on Postgres and Redis, with one job training throughout.

Figures: requests by status (the goal is no 5xx), p50/p99 of `GET /v1/fine_tuning/jobs/{id}` under that load
against the same poll on the idle service in the same run (goal: p99 under 10x idle), and fairness: the decode
steps requests waited for a batch row (engine metrics) and project b's short chats, p50/p99 under load.

The polls are timed twice: by the load's own clients, and by a user in a process of its own polling every 50 ms
(`probe_poll_*`), whose figure cannot include the load generator's waits; `client_loop_lag_p99_ms` is how late the
load generator's event loop ran. The clients arrive over `--ramp` seconds; with `--ramp 1`, 200 users arriving
within a second queue behind each other for most of a second, and that shows in the p99.

Last line: `name=value` pairs. Usage: python benchmarks/bench_load.py [--clients 200] [--seconds 60] [--ramp 10]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing
import os
import random
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.ml.synthetic import intent_json_task  # noqa: E402
from benchmarks.scratch_db import project_key, scratch_database  # noqa: E402
from tests.datasets.samples import valid_chat_file  # noqa: E402
from tests.e2e.server import RedisServer, free_port, tuneserve_env  # noqa: E402

KEYS = {"a": "ts-bench-load-project-a-0123456789", "b": "ts-bench-load-project-b-0123456789"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start_up(tmp: Path, db_url: str, redis_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = tuneserve_env(
        tmp / "data",
        db_url,
        TUNESERVE_BROKER_URL=redis_url,
        TUNESERVE_PORT=str(port),
        TUNESERVE_API_KEY=KEYS["a"],
        TUNESERVE_LOG_LEVEL="warning",
    )
    with open(tmp / "up.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError((tmp / "up.log").read_text())


class Recorder:
    def __init__(self) -> None:
        self.statuses: collections.Counter[str] = collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)

    def record(self, kind: str, status: int | str, seconds: float) -> None:
        self.statuses[f"{kind}:{status}"] += 1
        self.latency[kind].append(seconds)


async def timed(recorder: Recorder, kind: str, call: Awaitable[httpx.Response]) -> None:
    start = time.perf_counter()
    try:
        status: int | str = (await call).status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    recorder.record(kind, status, time.perf_counter() - start)


async def streamed(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> httpx.Response:
    async with client.stream("POST", url, json=body, headers=headers) as response:
        async for _ in response.aiter_lines():
            pass
        return response


async def client_loop(
    client: httpx.AsyncClient,
    url: str,
    project: str,
    job_id: str,
    until: float,
    recorder: Recorder,
    seed: int,
    start_after: float,
) -> None:
    rng = random.Random(seed)
    await asyncio.sleep(start_after)
    headers = {"Authorization": f"Bearer {KEYS[project]}"}
    chat_url = f"{url}/v1/chat/completions"
    while time.monotonic() < until:
        roll = rng.random()
        messages = [{"role": "user", "content": f"what is my balance {rng.randrange(1000)}"}]
        chat = {"model": "tuneserve-tiny", "temperature": 0, "messages": messages}
        if project == "b":  # the other project: short chats only, its latency is the fairness figure
            await timed(
                recorder, "b_short_chat", client.post(chat_url, json={**chat, "max_tokens": 4}, headers=headers)
            )
        elif roll < 0.35:
            await timed(recorder, "poll_job", client.get(f"{url}/v1/fine_tuning/jobs/{job_id}", headers=headers))
        elif roll < 0.45:
            upload = client.post(
                f"{url}/v1/files",
                headers=headers,
                data={"purpose": "fine-tune"},
                files={"file": ("t.jsonl", valid_chat_file(12))},
            )
            await timed(recorder, "upload", upload)
        elif roll < 0.75:
            body = {**chat, "max_tokens": 16, "stream": True}
            await timed(recorder, "stream_chat", streamed(client, chat_url, body, headers))
        else:
            await timed(recorder, "chat", client.post(chat_url, json={**chat, "max_tokens": 8}, headers=headers))


async def idle_polls(url: str, job_id: str, n: int) -> list[float]:
    headers = {"Authorization": f"Bearer {KEYS['a']}"}
    times = []
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(n):
            start = time.perf_counter()
            r = await client.get(f"{url}/v1/fine_tuning/jobs/{job_id}", headers=headers)
            r.raise_for_status()
            times.append(time.perf_counter() - start)
    return times


async def idle_short_chats(url: str, n: int) -> list[float]:
    headers = {"Authorization": f"Bearer {KEYS['b']}"}
    body = {
        "model": "tuneserve-tiny",
        "temperature": 0,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
    }
    times = []
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(n):
            start = time.perf_counter()
            (await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)).raise_for_status()
            times.append(time.perf_counter() - start)
    return times


async def loop_lag(until: float, recorder: Recorder) -> None:
    """How late this process's own event loop wakes: the part of its latencies that is the load generator's."""
    while time.monotonic() < until:
        start = time.perf_counter()
        await asyncio.sleep(0.05)
        recorder.latency["client_loop_lag"].append(time.perf_counter() - start - 0.05)


def probe_polls(url: str, job_id: str, seconds: float, out: multiprocessing.Queue) -> None:
    """A user polling their job once every 50 ms from a process of its own, while the load runs."""
    headers = {"Authorization": f"Bearer {KEYS['a']}"}
    times = []
    until = time.monotonic() + seconds
    with httpx.Client(timeout=120) as client:
        while time.monotonic() < until:
            start = time.perf_counter()
            client.get(f"{url}/v1/fine_tuning/jobs/{job_id}", headers=headers).raise_for_status()
            times.append(time.perf_counter() - start)
            time.sleep(0.05)
    out.put(times)


async def load(url: str, job_id: str, clients: int, seconds: float, ramp_seconds: float) -> Recorder:
    recorder = Recorder()
    # A client, and so a connection, of its own for each user, made before the clock starts: clients sharing one
    # httpx pool queue inside it for seconds under this load before their request is even sent, and building 200
    # clients (an SSL context each) blocks this process's loop for seconds. Both are the load generator's waits.
    tls = ssl.create_default_context()
    async with contextlib.AsyncExitStack() as stack:
        users = [await stack.enter_async_context(httpx.AsyncClient(timeout=120, verify=tls)) for _ in range(clients)]
        until = time.monotonic() + seconds
        # Users arrive evenly over the first `ramp_seconds`, as a load test ramps up; every request counts in the
        # figures, the ramp's included.
        ramp = ramp_seconds / clients
        lag = asyncio.ensure_future(loop_lag(until, recorder))
        # One in ten clients belongs to project b.
        await asyncio.gather(
            *(
                client_loop(
                    user, url, "b" if i % 10 == 0 else "a", job_id, until, recorder, seed=i, start_after=i * ramp
                )
                for i, user in enumerate(users)
            )
        )
        await lag
    return recorder


def engine_metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    match = re.search(rf"^tuneserve_inference_{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds over which the clients arrive")
    args = parser.parse_args()

    proc = None
    with scratch_database("tuneserve_load") as db_url:
        try:
            with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
                tmp = Path(tmp)
                proc, url = start_up(tmp, db_url, redis_server.url)
                KEYS["b"], _ = project_key(db_url, "b")  # project b, with a key of its own
                headers = {"Authorization": f"Bearer {KEYS['a']}"}
                train, _ = intent_json_task(160, 10, seed=0)
                data = "".join(json.dumps(e) + "\n" for e in train).encode()
                file_id = httpx.post(
                    f"{url}/v1/files",
                    headers=headers,
                    data={"purpose": "fine-tune"},
                    files={"file": ("t.jsonl", data)},
                    timeout=60,
                ).json()["id"]
                # Training all through the load: the worker competes for the same two cores, as it would.
                body = {"model": "tuneserve-tiny", "training_file": file_id, "hyperparameters": {"n_epochs": 20}}
                job_id = httpx.post(f"{url}/v1/fine_tuning/jobs", json=body, headers=headers, timeout=60).json()["id"]

                asyncio.run(idle_short_chats(url, 5))  # loads the base model
                idle_poll = asyncio.run(idle_polls(url, job_id, 200))
                idle_chat = asyncio.run(idle_short_chats(url, 20))
                waited_before = engine_metric(url, "admission_wait_steps_sum")
                count_before = engine_metric(url, "admission_wait_steps_count")
                probed: multiprocessing.Queue = multiprocessing.Queue()
                prober = multiprocessing.Process(target=probe_polls, args=(url, job_id, args.seconds, probed))
                prober.start()
                recorder = asyncio.run(load(url, job_id, args.clients, args.seconds, args.ramp))
                probe = probed.get(timeout=120)
                prober.join()
                waited = engine_metric(url, "admission_wait_steps_sum") - waited_before
                admitted = engine_metric(url, "admission_wait_steps_count") - count_before
                max_wait = engine_metric(url, "admission_wait_steps_max")
                job = httpx.get(f"{url}/v1/fine_tuning/jobs/{job_id}", headers=headers, timeout=60).json()
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)

    by_status: collections.Counter[str] = collections.Counter()
    for key, n in recorder.statuses.items():
        by_status[key.split(":", 1)[1]] += n
    for key, n in sorted(recorder.statuses.items()):
        print(f"{key:28s} {n}")
    poll = recorder.latency["poll_job"]
    b_chat = recorder.latency["b_short_chat"]
    server_errors = sum(n for status, n in by_status.items() if not status.isdigit() or status.startswith("5"))
    figures = {
        "requests": sum(by_status.values()),
        "status_2xx": sum(n for s, n in by_status.items() if s.startswith("2")),
        "status_4xx": sum(n for s, n in by_status.items() if s.startswith("4")),
        "status_5xx_or_failed": server_errors,
        "poll_p50_ms_idle": round(statistics.median(idle_poll) * 1000, 1),
        "poll_p99_ms_idle": round(percentile(idle_poll, 0.99) * 1000, 1),
        "poll_p50_ms_load": round(statistics.median(poll) * 1000, 1) if poll else float("nan"),
        "poll_p99_ms_load": round(percentile(poll, 0.99) * 1000, 1),
        "poll_p99_ratio": round(percentile(poll, 0.99) / percentile(idle_poll, 0.99), 2),
        "probe_poll_p50_ms_load": round(statistics.median(probe) * 1000, 1),
        "probe_poll_p99_ms_load": round(percentile(probe, 0.99) * 1000, 1),
        "probe_poll_p99_ratio": round(percentile(probe, 0.99) / percentile(idle_poll, 0.99), 2),
        "client_loop_lag_p99_ms": round(percentile(recorder.latency["client_loop_lag"], 0.99) * 1000, 1),
        "b_chat_p50_s_idle": round(statistics.median(idle_chat), 3),
        "b_chat_p50_s_load": round(statistics.median(b_chat), 3) if b_chat else float("nan"),
        "b_chat_p99_s_load": round(percentile(b_chat, 0.99), 3),
        "admission_wait_steps_mean": round(waited / admitted, 1) if admitted else float("nan"),
        "admission_wait_steps_max": max_wait,
        "training_job_status": job["status"],
        "clients": args.clients,
        "ramp_seconds": args.ramp,
        "seconds": args.seconds,
    }
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
