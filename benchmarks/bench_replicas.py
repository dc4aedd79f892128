"""What forwarding inference to a replica costs: the same chat requests against an API that serves them in its own
process and against an API that relays them to one `tuneserve inference` replica, in one run, on Postgres.

Workload: tuneserve-tiny, 16 concurrent clients, 96 chats of 16 new tokens each (greedy), plus 30 sequential
1-token requests for the per-request overhead. Each setup runs twice, interleaved, and keeps its better run.
A third setup sends the same requests straight to the replica, as the API relays them (internal token, project
named). Figures: throughput ratios (relayed / in-process and relayed / direct; 1.0 means the relay costs nothing)
and the added latency of a 1-token request in ms (median relayed minus median in-process, and minus direct).

With `--pin`, the host is cut in two as the production topology is: CPU 0 is the GPU machine (the replica, or
the in-process API, with one torch thread) and CPU 1 everything else (this load generator and the relaying API).
Without it, every process shares both cores, and the relaying API's CPU is taken from the replica's.

Last line: `name=value` pairs. Usage: python benchmarks/bench_replicas.py [--pin]
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.api.replicas import INTERNAL_TOKEN_HEADER, PROJECT_ID_HEADER, PROJECT_NAME_HEADER  # noqa: E402
from benchmarks.scratch_db import project_key, scratch_database  # noqa: E402
from tests.e2e.server import LiveServer, tuneserve_env  # noqa: E402

TOKEN = "bench-internal-token-0123456789"
CLIENTS, REQUESTS, NEW_TOKENS, PROBES, REPEATS = 16, 96, 16, 30, 2


def chat(max_tokens: int, i: int) -> dict:
    return {
        "model": "tuneserve-tiny",
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"question number {i}: what is the balance?"}],
    }


async def throughput(url: str, headers: dict[str, str]) -> float:
    queue = list(range(REQUESTS))

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


def probe_ms(url: str, headers: dict[str, str]) -> float:
    times = []
    with httpx.Client(timeout=60, headers=headers) as http:
        for i in range(PROBES):
            start = time.perf_counter()
            http.post(f"{url}/v1/chat/completions", json=chat(1, i)).raise_for_status()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, headers: dict[str, str], servers: dict[str, LiveServer]) -> tuple[float, float, dict]:
    """(requests/s, 1-token ms, CPU ms per request of each of `servers` during the throughput run)."""
    probe_ms(url, headers)  # warm: the base model loads
    before = {name: cpu_seconds(server.pid) for name, server in servers.items()}
    rps = asyncio.run(throughput(url, headers))
    cpu = {name: (cpu_seconds(s.pid) - before[name]) * 1000 / REQUESTS for name, s in servers.items()}
    return rps, probe_ms(url, headers), cpu


def pin(server: LiveServer | None, cpu: int) -> None:
    """Move every thread of `server` (None: this process) onto `cpu`."""
    pid = os.getpid() if server is None else server.pid
    subprocess.run(["taskset", "-a", "-cp", str(cpu), str(pid)], check=True, capture_output=True)


def main() -> None:
    pinned = "--pin" in sys.argv[1:]
    if pinned:
        pin(None, 1)
    with scratch_database("tuneserve_replicas") as db_url, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        key, project = project_key(db_url, "bench")
        user = {"Authorization": f"Bearer {key}"}
        # What the API sends a replica: the shared token and the project it authenticated.
        internal = {INTERNAL_TOKEN_HEADER: TOKEN, PROJECT_ID_HEADER: project, PROJECT_NAME_HEADER: "bench"}
        base = tuneserve_env(tmp / "shared", db_url)
        gpu_machine = {"OMP_NUM_THREADS": "1"} if pinned else {}
        replica_env = {
            **base,
            **gpu_machine,
            "TUNESERVE_DATA_DIR": str(tmp / "replica"),
            "TUNESERVE_INTERNAL_TOKEN": TOKEN,
        }
        results: dict[str, list[tuple[float, float, dict]]] = {"in_process": [], "relayed": [], "direct": []}
        with LiveServer(replica_env, tmp / "replica.log", command="inference") as replica:
            if pinned:
                pin(replica, 0)
            relay_env = {
                **base,
                "TUNESERVE_DATA_DIR": str(tmp / "api"),
                "TUNESERVE_INFERENCE_REPLICAS": json.dumps([replica.url]),
                "TUNESERVE_INTERNAL_TOKEN": TOKEN,
            }
            for _ in range(REPEATS):
                solo_env = {**base, **gpu_machine, "TUNESERVE_DATA_DIR": str(tmp / "solo")}
                with LiveServer(solo_env, tmp / "solo.log") as solo:
                    if pinned:
                        pin(solo, 0)
                    results["in_process"].append(measure(solo.url, user, {"server": solo}))
                with LiveServer(relay_env, tmp / "api.log") as api:
                    if pinned:
                        pin(api, 1)
                    results["relayed"].append(measure(api.url, user, {"api": api, "replica": replica}))
                results["direct"].append(measure(replica.url, internal, {"replica": replica}))
    rps = {name: max(r for r, _, _ in runs) for name, runs in results.items()}
    ms = {name: min(m for _, m, _ in runs) for name, runs in results.items()}
    # CPU per request, from each setup's faster run.
    cpu = {name: max(runs, key=lambda run: run[0])[2] for name, runs in results.items()}
    figures = {
        "pinned": pinned,
        "rps_in_process": round(rps["in_process"], 2),
        "rps_direct": round(rps["direct"], 2),
        "rps_relayed": round(rps["relayed"], 2),
        "rps_ratio_relayed": round(rps["relayed"] / rps["in_process"], 3),
        "rps_ratio_relayed_vs_direct": round(rps["relayed"] / rps["direct"], 3),
        "one_token_ms_in_process": round(ms["in_process"], 1),
        "one_token_ms_direct": round(ms["direct"], 1),
        "one_token_ms_relayed": round(ms["relayed"], 1),
        "relay_added_ms": round(ms["relayed"] - ms["in_process"], 1),
        "relay_added_ms_vs_direct": round(ms["relayed"] - ms["direct"], 1),
        "cpu_ms_per_request_in_process": round(cpu["in_process"]["server"], 2),
        "cpu_ms_per_request_direct_replica": round(cpu["direct"]["replica"], 2),
        "cpu_ms_per_request_relayed_replica": round(cpu["relayed"]["replica"], 2),
        "cpu_ms_per_request_relayed_api": round(cpu["relayed"]["api"], 2),
    }
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
