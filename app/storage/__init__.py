"""Blob storage: uploaded files, checkpoints, adapters and result files, by key (`files/file-...`,
`adapters/<job>/...`). Two backends behind one interface: a local directory (the embedded default) and
S3-compatible object storage (`TUNESERVE_STORAGE_URL=s3://bucket/prefix`), which lets the API, workers and
inference replicas run on machines that share no disk. Keys are server-chosen and written once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from app.config import Settings
from app.storage.errors import StorageUnavailable
from app.storage.local import LocalStorage


class BlobWriter(Protocol):
    """One blob being written: nothing is visible under its key until `commit`; `abort` leaves nothing."""

    def write(self, data: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class Storage(Protocol):
    def writer(self, key: str) -> BlobWriter: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def iter_chunks(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]: ...
    def local_file(self, key: str) -> Path:
        """The blob as a local file to read (object storage: fetched once into a bounded local cache)."""
        ...

    def put_dir(self, key: str, source: Path) -> None:
        """Store a directory under `key`, complete or not at all."""
        ...

    def dir_exists(self, key: str) -> bool: ...
    def local_dir(self, key: str) -> Path:
        """A directory stored with `put_dir`, as a local directory to read (cached like `local_file`)."""
        ...

    def delete(self, key: str) -> None:
        """Remove a blob or a directory; nothing if absent."""
        ...

    def remove_stale_temp_files(self, older_than_seconds: float) -> int:
        """Remove what writers that died left behind (partial uploads), if untouched for that long."""
        ...


def open_storage(settings: Settings) -> Storage:
    """The storage `settings` name: S3-compatible when `storage_url` is `s3://...`, else the data directory."""
    if settings.storage_url:
        from app.storage.s3 import S3Storage  # boto3 is imported only by those who use it

        return S3Storage.from_url(
            settings.storage_url, cache_dir=settings.data_dir / "cache", cache_bytes=settings.storage_cache_bytes
        )
    return LocalStorage(settings.storage_dir)


__all__ = ["BlobWriter", "LocalStorage", "Storage", "StorageUnavailable", "open_storage"]
