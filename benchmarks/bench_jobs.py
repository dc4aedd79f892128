"""Job creation under 50 concurrent clients on Postgres (against GET /healthz as the floor, same run), and the
service's overhead around training (create -> succeeded, over the training function's own time).

Last line: create_p50_ms=... create_p99_ms=... jobs_per_s=... overhead_ratio=... (and the healthz floor).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import Settings  # noqa: E402
from benchmarks.scratch_db import project_key, scratch_database  # noqa: E402
from tests.datasets.samples import valid_chat_file  # noqa: E402
from tests.e2e.server import LiveServer, RedisServer, WorkerProcess, tuneserve_env  # noqa: E402

CLIENTS, SECONDS = 50, 10
# ~30 s of training on the tiny model here: 20 examples x 17 epochs at batch size 1.
OVERHEAD_JOB = {"n_epochs": 17, "batch_size": 1}


def wrk(url: str, connections: int, seconds: int, lua: str | None = None) -> dict:
    """Run wrk (a C load generator, so the client does not starve the server of the 2 cores) and read its
    requests/s and latency percentiles."""
    args = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        if lua:
            script.write(lua)
            script.flush()
            args[1:1] = ["-s", script.name]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")

    def ms(label: str) -> float:
        value = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        number, unit = float(value.group(1)), value.group(2)
        return number * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return {"p50_ms": ms("50"), "p99_ms": ms("99"), "rps": rps}


def measure_creation(tmp: Path, db_url: str, key: str, file_id: str, redis_url: str) -> dict:
    env = tuneserve_env(tmp / "data", db_url, TUNESERVE_BROKER_URL=redis_url, TUNESERVE_LOG_LEVEL="warning")
    body = json.dumps({"model": "tuneserve-tiny", "training_file": file_id, "hyperparameters": {"n_epochs": 1}})
    lua = (
        'wrk.method = "POST"\n'
        f"wrk.body = '{body}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    )
    with LiveServer(env, tmp / "api.log") as server:
        wrk(f"{server.url}/healthz", CLIENTS, 2)  # warm up
        health = wrk(f"{server.url}/healthz", CLIENTS, SECONDS)
        create = wrk(f"{server.url}/v1/fine_tuning/jobs", CLIENTS, SECONDS, lua)
    return {
        "create_p50_ms": create["p50_ms"],
        "create_p99_ms": create["p99_ms"],
        "jobs_per_s": create["rps"],
        "healthz_p50_ms": health["p50_ms"],
        "healthz_rps": health["rps"],
    }


def measure_overhead(tmp: Path, db_url: str, key: str, file_id: str, redis_url: str) -> tuple[float, float]:
    from app.jobs.spec import resolve_spec
    from app.ml.registry import BaseModelRegistry
    from worker.training.loop import train

    env = tuneserve_env(tmp / "data", db_url, TUNESERVE_BROKER_URL=redis_url)
    with LiveServer(env, tmp / "api2.log") as server, WorkerProcess(env, tmp / "worker.log"):
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "tuneserve-tiny", "training_file": file_id, "hyperparameters": OVERHEAD_JOB}
        start = time.perf_counter()
        job = httpx.post(f"{server.url}/v1/fine_tuning/jobs", json=body, headers=headers).json()
        while True:
            status = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()["status"]
            if status in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.2)
        service_s = time.perf_counter() - start
        assert status == "succeeded", status

    data = tmp / "train.jsonl"
    data.write_bytes(valid_chat_file(20))
    base = BaseModelRegistry(Settings(data_dir=tmp / "data")).resolve("tuneserve-tiny")
    spec = resolve_spec(OVERHEAD_JOB, 20, defaults=base.defaults)
    start = time.perf_counter()
    train(spec, data, None, base, tmp / "direct")
    return service_s, time.perf_counter() - start


def main() -> None:
    if shutil.which("wrk") is None:
        sys.exit("bench_jobs needs wrk (Debian: apt-get install wrk); `make bench` installs it")
    with scratch_database("tuneserve_bench") as db_url:
        key, _ = project_key(db_url, "bench")
        with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
            tmp = Path(tmp)
            env = tuneserve_env(tmp / "data", db_url, TUNESERVE_BROKER_URL=redis_server.url)
            with LiveServer(env, tmp / "setup.log") as server:
                file_id = httpx.post(
                    f"{server.url}/v1/files",
                    headers={"Authorization": f"Bearer {key}"},
                    data={"purpose": "fine-tune"},
                    files={"file": ("t.jsonl", valid_chat_file(20))},
                ).json()["id"]
            figures = measure_creation(tmp, db_url, key, file_id, redis_server.url)
            # The jobs created above would queue ahead of the measured one: take them out of the way.
            redis_server.flushall()
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute("UPDATE jobs SET status = 'cancelled' WHERE status = 'queued'")
            service_s, train_s = measure_overhead(tmp, db_url, key, file_id, redis_server.url)

    ratio = figures["create_p50_ms"] / figures["healthz_p50_ms"]
    print(f"{CLIENTS} concurrent clients for {SECONDS} s each, Postgres + Redis")
    print(f"GET /healthz: p50 {figures['healthz_p50_ms']:.1f} ms, {figures['healthz_rps']:.0f} req/s")
    print(f"POST /v1/fine_tuning/jobs: p50 {figures['create_p50_ms']:.1f} ms, p99 {figures['create_p99_ms']:.1f} ms")
    print(f"create -> succeeded {service_s:.1f} s vs the training function alone {train_s:.1f} s")
    print(
        f"create_p50_ms={figures['create_p50_ms']:.1f} create_p99_ms={figures['create_p99_ms']:.1f} "
        f"jobs_per_s={figures['jobs_per_s']:.1f} overhead_ratio={service_s / train_s:.2f} "
        f"healthz_p50_ms={figures['healthz_p50_ms']:.1f} create_vs_healthz_p50={ratio:.1f}"
    )


if __name__ == "__main__":
    main()
