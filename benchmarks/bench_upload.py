"""Upload + validation throughput of a 200 MB chat JSONL through the real server, and its memory growth, with
the file stored in the local data directory and in S3-compatible object storage.

Baselines in the same run: reading the same file with `json.loads` per line and nothing else; the local directory
for the object store. The object store here is moto's standalone server on this host (in memory, in Python): its
MB/s is a floor for what a real MinIO or S3 would give, while the server's memory growth is the server's own.
Last line: upload_mb_s=... rss_growth_mb=... ratio_vs_json_loads=... validate_mb_s=... upload_s3_mb_s=...
rss_growth_s3_mb=... ratio_s3_vs_local=...
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.datasets import validate_path  # noqa: E402
from tests.e2e.server import LiveServer, S3Server, tuneserve_env  # noqa: E402

TARGET_BYTES = 200 * 1024 * 1024
WORDS = ["the", "a", "model", "answer", "schema", "json", "field", "value", "user", "request", "intent", "order"]


def make_dataset(path: Path, target: int = TARGET_BYTES) -> int:
    """Chat examples of varied length (about 0.2-3 KB), like real instruction data."""
    rng = random.Random(0)
    size = 0
    with open(path, "w") as f:
        while size < target:
            turns = rng.randint(1, 3)
            messages = [{"role": "system", "content": "Reply with JSON only."}]
            for _ in range(turns):
                messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(5, 120)))})
                answer = {"intent": rng.choice(WORDS), "args": rng.choices(WORDS, k=rng.randint(1, 60))}
                messages.append({"role": "assistant", "content": json.dumps(answer)})
            line = json.dumps({"messages": messages}) + "\n"
            f.write(line)
            size += len(line.encode())
    return size


def json_loads_seconds(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb") as f:
        for line in f:
            json.loads(line)
    return time.perf_counter() - start


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakRss:
    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def upload(url: str, key: str, path: Path) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(
            f"{url}/v1/files",
            headers={"Authorization": f"Bearer {key}"},
            data={"purpose": "fine-tune"},
            files={"file": ("train.jsonl", f, "application/jsonl")},
            timeout=600,
        )


def measure_upload(
    env: dict[str, str], log: Path, key: str, data: Path, small: Path, size: int
) -> tuple[float, int, int]:
    """(seconds, server RSS before, peak server RSS during) of uploading `data` to a server started with `env`."""
    with LiveServer(env, log) as server:
        assert upload(server.url, key, small).status_code == 200  # warm up imports and pools
        before = rss_bytes(server.pid)
        with PeakRss(server.pid) as peak:
            start = time.perf_counter()
            response = upload(server.url, key, data)
            seconds = time.perf_counter() - start
        assert response.status_code == 200, response.text
        assert response.json()["bytes"] == size
    return seconds, before, peak.peak


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "train.jsonl"
        size = make_dataset(data)
        mb = size / 1e6
        small = tmp / "small.jsonl"
        small.write_bytes(b"".join(data.open("rb").readline() for _ in range(20)))

        json_s = json_loads_seconds(data)
        start = time.perf_counter()
        report = validate_path(data)
        validate_s = time.perf_counter() - start
        assert report.ok, report.summary()

        env = tuneserve_env(tmp / "data", f"sqlite:///{tmp / 'bench.db'}")
        from app import migrate
        from app.db import make_engine, make_sessionmaker, session_scope
        from app.services.keys import create_key

        migrate.upgrade(env["TUNESERVE_DATABASE_URL"])
        engine = make_engine(env["TUNESERVE_DATABASE_URL"])
        with session_scope(make_sessionmaker(engine)) as session:
            key = create_key(session, "bench")
        engine.dispose()

        upload_s, before, peak = measure_upload(env, tmp / "server.log", key, data, small, size)
        with S3Server() as s3:
            s3_env = {**env, **s3.env, "TUNESERVE_STORAGE_URL": f"s3://{s3.BUCKET}/bench"}
            s3_s, s3_before, s3_peak = measure_upload(s3_env, tmp / "server-s3.log", key, data, small, size)

    upload_mb_s = mb / upload_s
    json_mb_s = mb / json_s
    growth_mb = (peak - before) / 1e6
    s3_mb_s, s3_growth_mb = mb / s3_s, (s3_peak - s3_before) / 1e6
    print(f"file: {mb:.0f} MB, {report.n_examples} examples")
    print(f"json.loads per line alone: {json_mb_s:.1f} MB/s; validator alone: {mb / validate_s:.1f} MB/s")
    print(f"upload through the server: {upload_mb_s:.1f} MB/s", end="; ")
    print(f"server RSS {before / 1e6:.0f} MB -> peak {peak / 1e6:.0f} MB")
    print(f"upload to the object store: {s3_mb_s:.1f} MB/s; server RSS {s3_before / 1e6:.0f} -> {s3_peak / 1e6:.0f} MB")
    print(
        f"upload_mb_s={upload_mb_s:.1f} rss_growth_mb={growth_mb:.1f} "
        f"ratio_vs_json_loads={upload_mb_s / json_mb_s:.2f} validate_mb_s={mb / validate_s:.1f} "
        f"upload_s3_mb_s={s3_mb_s:.1f} rss_growth_s3_mb={s3_growth_mb:.1f} "
        f"ratio_s3_vs_local={s3_mb_s / upload_mb_s:.2f}"
    )


if __name__ == "__main__":
    main()
