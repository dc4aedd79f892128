"""What forwarding inference to a replica costs: the same chat requests against an API that serves them in its own
process and against an API that relays them to one `tuneserve inference` replica, in one run, on Postgres.

Workload: tuneserve-tiny, 16 concurrent clients, 96 chats of 16 new tokens each (greedy), plus 30 sequential
1-token requests for the per-request overhead. Each setup runs twice, interleaved, and keeps its better run.
Figures: throughput ratio (relayed / in-process; 1.0 means the relay costs nothing) and the added latency of a
1-token request in ms (median relayed minus median in-process).

Last line: `name=value` pairs. Usage: python benchmarks/bench_replicas.py
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.server import LiveServer, tuneserve_env  # noqa: E402

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
TOKEN = "bench-internal-token-0123456789"
CLIENTS, REQUESTS, NEW_TOKENS, PROBES, REPEATS = 16, 96, 16, 30, 2


def chat(max_tokens: int, i: int) -> dict:
    return {
        "model": "tuneserve-tiny",
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"question number {i}: what is the balance?"}],
    }


async def throughput(url: str, key: str) -> float:
    queue = list(range(REQUESTS))
    headers = {"Authorization": f"Bearer {key}"}

    async def client() -> None:
        async with httpx.AsyncClient(timeout=300) as http:
            while queue:
                i = queue.pop()
                (
                    await http.post(f"{url}/v1/chat/completions", json=chat(NEW_TOKENS, i), headers=headers)
                ).raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return REQUESTS / (time.perf_counter() - start)


def probe_ms(url: str, key: str) -> float:
    times = []
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {key}"}) as http:
        for i in range(PROBES):
            start = time.perf_counter()
            http.post(f"{url}/v1/chat/completions", json=chat(1, i)).raise_for_status()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(url: str, key: str) -> tuple[float, float]:
    probe_ms(url, key)  # warm: the base model loads
    return asyncio.run(throughput(url, key)), probe_ms(url, key)


def main() -> None:
    name = f"tuneserve_replicas_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            from app import migrate
            from app.db import make_engine, make_sessionmaker, session_scope
            from app.services.keys import create_key

            migrate.upgrade(db_url)
            engine = make_engine(db_url)
            with session_scope(make_sessionmaker(engine)) as session:
                key = create_key(session, "bench")
            engine.dispose()
            base = tuneserve_env(tmp / "shared", db_url)
            replica_env = {**base, "TUNESERVE_DATA_DIR": str(tmp / "replica"), "TUNESERVE_INTERNAL_TOKEN": TOKEN}
            results: dict[str, list[tuple[float, float]]] = {"in_process": [], "relayed": []}
            with LiveServer(replica_env, tmp / "replica.log", command="inference") as replica:
                relay_env = {
                    **base,
                    "TUNESERVE_DATA_DIR": str(tmp / "api"),
                    "TUNESERVE_INFERENCE_REPLICAS": json.dumps([replica.url]),
                    "TUNESERVE_INTERNAL_TOKEN": TOKEN,
                }
                for _ in range(REPEATS):
                    with LiveServer({**base, "TUNESERVE_DATA_DIR": str(tmp / "solo")}, tmp / "solo.log") as solo:
                        results["in_process"].append(measure(solo.url, key))
                    with LiveServer(relay_env, tmp / "api.log") as api:
                        results["relayed"].append(measure(api.url, key))
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    solo_rps = max(r for r, _ in results["in_process"])
    relay_rps = max(r for r, _ in results["relayed"])
    solo_ms = min(m for _, m in results["in_process"])
    relay_ms = min(m for _, m in results["relayed"])
    figures = {
        "rps_in_process": round(solo_rps, 2),
        "rps_relayed": round(relay_rps, 2),
        "rps_ratio_relayed": round(relay_rps / solo_rps, 3),
        "one_token_ms_in_process": round(solo_ms, 1),
        "one_token_ms_relayed": round(relay_ms, 1),
        "relay_added_ms": round(relay_ms - solo_ms, 1),
    }
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
