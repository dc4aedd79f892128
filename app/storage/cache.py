"""A bounded local cache of what a process fetched from object storage: training files for a worker, adapters for
an inference replica. Keys are written once, so an entry never goes stale; the least recently used go first when
the cache is over its size. Threads and processes of one machine share it: an entry appears by rename, complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

# An entry used this recently is never evicted: a reader may have been handed its path and not opened it yet (a
# worker reads its checkpoint after loading the base model, which can take minutes).
IN_USE_SECONDS = 900.0
# A fetch's temporary copy untouched this long belongs to a process that died mid-fetch.
STALE_FETCH_SECONDS = 3600.0


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
        cutoff = time.time() - STALE_FETCH_SECONDS
        for leftover in self._tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if leftover.lstat().st_mtime < cutoff:
                    _remove(leftover)

    def _path(self, key: str) -> Path:
        return self._entries / quote(key, safe="")  # one flat name per key: "files/x" and "files" cannot collide

    def get(self, key: str, fetch: Callable[[Path], None]) -> Path:
        """The entry for `key`, calling `fetch(path)` to write it (a file or a directory at `path`) on a miss."""
        target = self._path(key)
        try:
            os.utime(target)  # a hit: recently used from now
            return target
        except FileNotFoundError:
            pass  # a miss (or evicted a moment ago by another process)
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
        self._remove_entry(self._path(key))

    def _remove_entry(self, path: Path) -> None:
        # Out of sight in one rename, then deleted: a reader never finds half an entry under its key.
        doomed = self._tmp / f"evicted-{uuid.uuid4().hex}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return  # already gone
        _remove(doomed)

    def _shrink(self) -> None:
        with self._lock:
            entries = []
            for path in self._entries.iterdir():
                with contextlib.suppress(FileNotFoundError):  # another process evicted it meanwhile
                    entries.append((path.stat().st_mtime, _size(path), path))
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):  # least recently used first
                if total <= self._max_bytes:
                    break
                try:
                    in_use = path.stat().st_mtime >= time.time() - IN_USE_SECONDS  # as of now, not of the listing
                except FileNotFoundError:
                    in_use = False
                if not in_use:
                    self._remove_entry(path)
                    total -= size
