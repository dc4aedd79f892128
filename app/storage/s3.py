"""S3-compatible object storage (AWS S3, MinIO, Cloudflare R2, Ceph) through boto3: endpoint and credentials
come from the standard AWS variables. Uploads stream as multipart uploads, one part buffered at a time; a
directory is its files plus a manifest written last, so readers see it complete or not at all; what a process
reads is fetched once into a bounded local cache (app/storage/cache.py).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.storage.cache import LocalCache
from app.storage.errors import StorageUnavailable

# S3 parts are at least 5 MiB (but the last); this is also what one upload holds in memory.
PART_BYTES = 8 * 1024 * 1024
MANIFEST = ".manifest.json"


def _missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


@contextlib.contextmanager
def _answered(key: str) -> Iterator[None]:
    """The store's failures as the storage contract names them: FileNotFoundError for a missing key,
    StorageUnavailable for the rest (after boto3's own retries)."""
    try:
        yield
    except ClientError as exc:
        if _missing(exc):
            raise FileNotFoundError(key) from exc
        raise StorageUnavailable(f"object storage failed on {key}: {exc}") from exc
    except (BotoCoreError, Boto3Error) as exc:
        raise StorageUnavailable(f"object storage failed on {key}: {exc}") from exc


class S3Writer:
    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self._client, self._bucket, self._key = client, bucket, key
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= PART_BYTES:
            self._upload_part(bytes(self._buffer[:PART_BYTES]))
            del self._buffer[:PART_BYTES]

    def _upload_part(self, chunk: bytes) -> None:
        with _answered(self._key):
            if self._upload_id is None:
                created = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key)
                self._upload_id = created["UploadId"]
            number = len(self._parts) + 1
            part = self._client.upload_part(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=chunk
            )
        self._parts.append({"ETag": part["ETag"], "PartNumber": number})

    def commit(self) -> None:
        if self._upload_id is None:  # small: one request
            with _answered(self._key):
                self._client.put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer))
        else:
            if self._buffer:
                self._upload_part(bytes(self._buffer))
            with _answered(self._key):
                self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
            self._upload_id = None  # complete: nothing left to abort
        self._buffer.clear()

    def abort(self) -> None:
        self._buffer.clear()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            # Best effort: an upload that cannot be aborted now is removed as stale later
            # (remove_stale_temp_files, or the bucket's lifecycle rule); the caller's own error is what matters.
            with contextlib.suppress(ClientError, BotoCoreError):
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=upload_id)


class S3Storage:
    def __init__(self, client: Any, bucket: str, prefix: str, cache: LocalCache) -> None:
        self._client, self._bucket = client, bucket
        self._prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._cache = cache

    @classmethod
    def from_url(cls, url: str, *, cache_dir: Path, cache_bytes: int) -> S3Storage:
        parsed = urlparse(url)
        client = boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))
        return cls(client, parsed.netloc, parsed.path, LocalCache(cache_dir, cache_bytes))

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid storage key: {key!r}")
        return self._prefix + key

    # blobs

    def writer(self, key: str) -> S3Writer:
        return S3Writer(self._client, self._bucket, self._key(key))

    def _head(self, object_key: str) -> dict[str, Any] | None:
        try:
            with _answered(object_key):
                return self._client.head_object(Bucket=self._bucket, Key=object_key)
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self._head(self._key(key)) is not None

    def size(self, key: str) -> int:
        head = self._head(self._key(key))
        if head is None:
            raise FileNotFoundError(key)
        return int(head["ContentLength"])

    def iter_chunks(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        with _answered(key):
            body = self._client.get_object(Bucket=self._bucket, Key=self._key(key))["Body"]
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

    def local_file(self, key: str) -> Path:
        def fetch(path: Path) -> None:
            with _answered(key):
                self._client.download_file(self._bucket, self._key(key), str(path))

        return self._cache.get(key, fetch)

    # directories

    def put_dir(self, key: str, source: Path) -> None:
        source = Path(source)
        files = sorted(p for p in source.rglob("*") if p.is_file())
        names = [p.relative_to(source).as_posix() for p in files]
        base = self._key(key)
        manifest = {"files": {name: path.stat().st_size for path, name in zip(files, names, strict=True)}}
        with _answered(key):
            # A re-put is invisible until it is complete again.
            self._client.delete_object(Bucket=self._bucket, Key=f"{base}/{MANIFEST}")
            for path, name in zip(files, names, strict=True):
                self._client.upload_file(str(path), self._bucket, f"{base}/{name}")
            self._client.put_object(Bucket=self._bucket, Key=f"{base}/{MANIFEST}", Body=json.dumps(manifest).encode())
        self._cache.evict(key)

    def dir_exists(self, key: str) -> bool:
        return self._head(f"{self._key(key)}/{MANIFEST}") is not None

    def local_dir(self, key: str) -> Path:
        base = self._key(key)

        def fetch(path: Path) -> None:
            with _answered(key):  # a directory deleted before or while it is fetched is not found
                raw = self._client.get_object(Bucket=self._bucket, Key=f"{base}/{MANIFEST}")["Body"].read()
                path.mkdir()
                for name in json.loads(raw)["files"]:
                    target = path / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self._client.download_file(self._bucket, f"{base}/{name}", str(target))

        return self._cache.get(key, fetch)

    # both

    def delete(self, key: str) -> None:
        base = self._key(key)
        with _answered(key):
            # The manifest first: the directory stops existing for readers before its files go.
            self._client.delete_object(Bucket=self._bucket, Key=f"{base}/{MANIFEST}")
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self._bucket, Prefix=f"{base}/"):
                objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if objects:
                    failed = self._client.delete_objects(
                        Bucket=self._bucket, Delete={"Objects": objects, "Quiet": True}
                    ).get("Errors", [])
                    if failed:
                        raise StorageUnavailable(f"object storage kept {len(failed)} object(s) of {key}: {failed[0]}")
            self._client.delete_object(Bucket=self._bucket, Key=base)
        self._cache.evict(key)

    def remove_stale_temp_files(self, older_than_seconds: float) -> int:
        """Abort multipart uploads that a killed writer left (their parts cost storage and never show): those
        with no part written for `older_than_seconds`. A slow upload that is still sending parts is left alone,
        however long ago it started."""
        cutoff = datetime.fromtimestamp(time.time() - older_than_seconds, tz=UTC)
        removed = 0
        with _answered(self._prefix or "/"):
            paginator = self._client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self._bucket, Prefix=self._prefix):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < cutoff and self._last_part_written(upload) < cutoff:
                        self._client.abort_multipart_upload(
                            Bucket=self._bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        removed += 1
        return removed

    def _last_part_written(self, upload: dict[str, Any]) -> datetime:
        listed = self._client.list_parts(Bucket=self._bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        return max((part["LastModified"] for part in listed.get("Parts", [])), default=upload["Initiated"])
