"""A bounded local cache of what a process fetched from object storage: training files for a worker, adapters for
an inference replica. Keys are written once, so an entry never goes stale; the least recently used go first when
the cache is over its size. Threads and processes of one machine share it: an entry appears by rename, complete.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

# An entry used this recently is never evicted: a reader may have just been handed its path.
IN_USE_SECONDS = 120.0


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class LocalCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self._entries = Path(root) / "entries"
        self._tmp = Path(root) / ".tmp"
        self._entries.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self._entries / quote(key, safe="")  # one flat name per key: "files/x" and "files" cannot collide

    def get(self, key: str, fetch: Callable[[Path], None]) -> Path:
        """The entry for `key`, calling `fetch(path)` to write it (a file or a directory at `path`) on a miss."""
        target = self._path(key)
        if target.exists():
            os.utime(target)  # recently used
            return target
        tmp = self._tmp / uuid.uuid4().hex
        try:
            fetch(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.exists():
                    raise
                # Another thread or process fetched it meanwhile; theirs is the same bytes.
        finally:
            _remove(tmp)
        self._shrink()
        return target

    def evict(self, key: str) -> None:
        _remove(self._path(key))

    def _shrink(self) -> None:
        with self._lock:
            entries = [(p.stat().st_mtime, _size(p), p) for p in self._entries.iterdir()]
            total = sum(size for _, size, _ in entries)
            recent = time.time() - IN_USE_SECONDS
            for mtime, size, path in sorted(entries):
                if total <= self._max_bytes or mtime >= recent:
                    break
                _remove(path)
                total -= size
