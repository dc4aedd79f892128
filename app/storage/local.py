"""Blob storage in a local directory (the embedded default). Writes go to a temporary name and are renamed into
place only when complete, so a reader never sees a partial blob and an aborted upload leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path


class BlobWriter:
    def __init__(self, final_path: Path, tmp_path: Path):
        self._final = final_path
        self._tmp = tmp_path
        self._f = open(tmp_path, "wb")  # noqa: SIM115 -- held open across write() calls until commit or abort

    def write(self, data: bytes) -> None:
        self._f.write(data)

    def commit(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, self._final)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)


class LocalStorage:
    """Keys are server-chosen ids (`files/file-...`); client names never reach the filesystem."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return path

    def writer(self, key: str) -> BlobWriter:
        return BlobWriter(self._path(key), self._tmp / uuid.uuid4().hex)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def iter_chunks(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        with open(self._path(key), "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def local_file(self, key: str) -> Path:
        """The blob as a local file: here, where it is stored."""
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path

    def local_dir(self, key: str) -> Path:
        """A directory put with `put_dir`, as a local directory: here, where it is stored."""
        path = self._path(key)
        if not path.is_dir():
            raise FileNotFoundError(key)
        return path

    def dir_exists(self, key: str) -> bool:
        return self._path(key).is_dir()

    def put_dir(self, key: str, source: Path) -> None:
        """Copy a directory in under `key`, complete or not at all."""
        target = self._path(key)
        tmp = self._tmp / uuid.uuid4().hex
        try:
            shutil.copytree(source, tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def temp_files(self) -> list[Path]:
        return list(self._tmp.iterdir())

    def remove_stale_temp_files(self, older_than_seconds: float) -> int:
        """Remove what crashed writers left in the temp area (an upload killed mid-way). Only entries untouched
        for `older_than_seconds`: another process sharing this storage may be writing the fresh ones."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        for path in self.temp_files():
            try:
                if path.lstat().st_mtime >= cutoff:
                    continue
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed += 1
            except FileNotFoundError:
                continue  # its writer finished (renamed it) or another process removed it meanwhile
        return removed
