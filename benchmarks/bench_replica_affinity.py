"""What routing by model buys with several inference replicas: 16 adapters served by one replica, by two with
each model sent to the replica it hashes to (what the API does), and by two taking turns (round-robin), in one run.

Each replica keeps at most 8 adapters resident (TUNESERVE_MAX_RESIDENT_ADAPTERS=8), half the working set: with
affinity each replica's share of the adapters fits, with round-robin every replica sees all 16 and evicts. The
load generator sends each request straight to the replica the policy picks (as the API would relay it, with the
internal token), so the three setups differ only in the policy. The replicas start fresh for each setup.

Workload: one job trained here (tuneserve-tiny, 16 checkpoints = 16 adapters), then 16 clients sending 256 chats of
8 new tokens each, the adapter of each drawn at random (seeded). Figures: requests/s per setup, adapter cold loads
per setup (all replicas), and the ratios. On this 2-core host the two replicas share the cores of one: the
throughput ratio measures routing and cache affinity, not added compute.

Last line: `name=value` pairs. Usage: python benchmarks/bench_replica_affinity.py
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.api.replicas import INTERNAL_TOKEN_HEADER, PROJECT_ID_HEADER, PROJECT_NAME_HEADER, rank  # noqa: E402
from benchmarks.scratch_db import project_key, scratch_database  # noqa: E402
from tests.datasets.samples import chat_example, jsonl  # noqa: E402
from tests.e2e.server import LiveServer, WorkerProcess, tuneserve_env  # noqa: E402

TOKEN = "bench-internal-token-0123456789"
ADAPTERS, RESIDENT, CLIENTS, REQUESTS, NEW_TOKENS = 16, 8, 16, 256, 8


def train_adapters(url: str, key: str) -> list[str]:
    """One job with a checkpoint per step: ADAPTERS distinct adapters, as models."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        file_id = http.post(
            "/v1/files",
            data={"purpose": "fine-tune"},
            files={"file": ("train.jsonl", jsonl(chat_example(i) for i in range(ADAPTERS)))},
        ).json()["id"]
        job = {
            "model": "tuneserve-tiny",
            "training_file": file_id,
            "hyperparameters": {"n_epochs": 1, "batch_size": 1},
            "n_checkpoints": ADAPTERS,
        }
        job_id = http.post("/v1/fine_tuning/jobs", json=job).raise_for_status().json()["id"]
        while (status := http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]) not in ("succeeded", "failed"):
            time.sleep(0.5)
        assert status == "succeeded", status
        checkpoints = http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100}).json()["data"]
    models = [c["fine_tuned_model_checkpoint"] for c in checkpoints]
    assert len(models) == ADAPTERS, len(models)
    return models


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


async def drive(pick, models: list[str], project: tuple[str, str]) -> float:
    rng = random.Random(0)
    work = [rng.choice(models) for _ in range(REQUESTS)]
    headers = {INTERNAL_TOKEN_HEADER: TOKEN, PROJECT_ID_HEADER: project[0], PROJECT_NAME_HEADER: project[1]}
    turn = itertools.count()

    async def client(http: httpx.AsyncClient) -> None:
        while work:
            model = work.pop()
            body = {
                "model": model,
                "max_tokens": NEW_TOKENS,
                "temperature": 0,
                "messages": [{"role": "user", "content": "What is 3 plus 3?"}],
            }
            r = await http.post(f"{pick(model, next(turn))}/v1/chat/completions", json=body, headers=headers)
            r.raise_for_status()

    async with httpx.AsyncClient(timeout=300) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
        return REQUESTS / (time.perf_counter() - start)


def run_setup(name: str, n_replicas: int, env: dict[str, str], tmp: Path, models, project) -> tuple[float, int]:
    replica_env = {**env, "TUNESERVE_INTERNAL_TOKEN": TOKEN, "TUNESERVE_MAX_RESIDENT_ADAPTERS": str(RESIDENT)}
    servers = [LiveServer(replica_env, tmp / f"{name}-{i}.log", command="inference") for i in range(n_replicas)]
    for server in servers:
        server.__enter__()
    try:
        urls = [s.url for s in servers]
        policies = {
            "affinity": lambda model, _turn: rank(urls, model)[0],
            "round_robin": lambda _model, turn: urls[turn % len(urls)],
        }
        pick = policies["round_robin" if name == "round_robin" else "affinity"]
        rps = asyncio.run(drive(pick, models, project))
        loads = sum(metric(url, "tuneserve_inference_adapter_loads_total") for url in urls)
    finally:
        for server in servers:
            server.__exit__(None, None, None)
    print(f"{name}: {n_replicas} replica(s), {rps:.1f} requests/s, {loads:.0f} adapter cold loads")
    return rps, int(loads)


def main() -> None:
    with scratch_database("tuneserve_affinity") as db_url, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        key, project_id = project_key(db_url, "bench")
        project = (project_id, "bench")
        # One host: every process shares the data directory (local storage) and so the trained adapters.
        env = tuneserve_env(tmp / "shared", db_url)
        with LiveServer(env, tmp / "api.log") as api, WorkerProcess(env, tmp / "worker.log"):
            models = train_adapters(api.url, key)
        results = {
            "one": run_setup("one", 1, env, tmp, models, project),
            "affinity": run_setup("affinity", 2, env, tmp, models, project),
            "round_robin": run_setup("round_robin", 2, env, tmp, models, project),
        }
    figures = {
        "rps_one_replica": round(results["one"][0], 1),
        "rps_two_affinity": round(results["affinity"][0], 1),
        "rps_two_round_robin": round(results["round_robin"][0], 1),
        "rps_ratio_two_vs_one": round(results["affinity"][0] / results["one"][0], 2),
        "rps_ratio_affinity_vs_round_robin": round(results["affinity"][0] / results["round_robin"][0], 2),
        "cold_loads_one": results["one"][1],
        "cold_loads_affinity": results["affinity"][1],
        "cold_loads_round_robin": results["round_robin"][1],
    }
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
