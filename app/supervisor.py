"""A child process kept running: `tuneserve up` supervises its worker with it.

A worker that dies (killed, out of memory) is started again; its job is not lost, because the job's lease
lapses and the reconciler hands it to the new worker, which resumes from the last checkpoint. Restarts back
off while the child keeps dying young, so a worker that cannot start does not spin.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time

log = logging.getLogger(__name__)

# A child that lived this long is considered healthy again: the next death restarts it at once.
HEALTHY_AFTER_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 30.0


class SupervisedProcess:
    def __init__(self, argv: list[str], name: str) -> None:
        self._argv = argv
        self._name = name
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._watcher = threading.Thread(target=self._watch, name=f"supervise-{name}", daemon=True)
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._process.pid if self._process else None

    def start(self) -> None:
        self._spawn()
        self._watcher.start()

    def _spawn(self) -> None:
        with self._lock:
            # Checked under the lock that `stop` takes: a restart racing a stop must not leave an orphan running.
            if not self._stopping.is_set():
                self._process = subprocess.Popen(self._argv)

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            with self._lock:
                process = self._process
            if process is None:
                return
            started = time.monotonic()
            code = process.wait()
            if self._stopping.is_set():
                return
            lived = time.monotonic() - started
            backoff = 1.0 if lived > HEALTHY_AFTER_SECONDS else min(backoff * 2, MAX_BACKOFF_SECONDS)
            log.warning("%s exited with %s after %.0f s; starting it again in %.0f s", self._name, code, lived, backoff)
            if self._stopping.wait(backoff):
                return
            self._spawn()
            self.restarts += 1

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate the child and stop restarting it; kill it if it has not exited within `timeout`."""
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._watcher.join(timeout=5)
