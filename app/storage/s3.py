"""S3-compatible object storage (AWS S3, MinIO, Cloudflare R2, Ceph) through boto3: endpoint and credentials
come from the standard AWS variables. Uploads stream as multipart uploads, one part buffered at a time; a
directory is its files plus a manifest written last, so readers see it complete or not at all; what a process
reads is fetched once into a bounded local cache (app/storage/cache.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from app.storage.cache import LocalCache

# S3 parts are at least 5 MiB (but the last); this is also what one upload holds in memory.
PART_BYTES = 8 * 1024 * 1024
MANIFEST = ".manifest.json"


def _missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


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
            self._client.put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer))
        else:
            if self._buffer:
                self._upload_part(bytes(self._buffer))
            self._client.complete_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
            )
        self._buffer.clear()

    def abort(self) -> None:
        self._buffer.clear()
        if self._upload_id is not None:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)
            self._upload_id = None


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
            return self._client.head_object(Bucket=self._bucket, Key=object_key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head(self._key(key)) is not None

    def size(self, key: str) -> int:
        head = self._head(self._key(key))
        if head is None:
            raise FileNotFoundError(key)
        return int(head["ContentLength"])

    def iter_chunks(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        try:
            body = self._client.get_object(Bucket=self._bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(key) from exc
            raise
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def local_file(self, key: str) -> Path:
        def fetch(path: Path) -> None:
            try:
                self._client.download_file(self._bucket, self._key(key), str(path))
            except ClientError as exc:
                if _missing(exc):
                    raise FileNotFoundError(key) from exc
                raise

        return self._cache.get(key, fetch)

    # directories

    def put_dir(self, key: str, source: Path) -> None:
        source = Path(source)
        files = sorted(p for p in source.rglob("*") if p.is_file())
        names = [p.relative_to(source).as_posix() for p in files]
        base = self._key(key)
        self._client.delete_object(Bucket=self._bucket, Key=f"{base}/{MANIFEST}")  # a re-put is invisible until done
        for path, name in zip(files, names, strict=True):
            self._client.upload_file(str(path), self._bucket, f"{base}/{name}")
        manifest = {"files": {name: path.stat().st_size for path, name in zip(files, names, strict=True)}}
        self._client.put_object(Bucket=self._bucket, Key=f"{base}/{MANIFEST}", Body=json.dumps(manifest).encode())
        self._cache.evict(key)

    def dir_exists(self, key: str) -> bool:
        return self._head(f"{self._key(key)}/{MANIFEST}") is not None

    def local_dir(self, key: str) -> Path:
        base = self._key(key)

        def fetch(path: Path) -> None:
            try:
                raw = self._client.get_object(Bucket=self._bucket, Key=f"{base}/{MANIFEST}")["Body"].read()
                path.mkdir()
                for name in json.loads(raw)["files"]:
                    target = path / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self._client.download_file(self._bucket, f"{base}/{name}", str(target))
            except ClientError as exc:
                if _missing(exc):  # deleted before or while it was fetched
                    raise FileNotFoundError(key) from exc
                raise

        return self._cache.get(key, fetch)

    # both

    def delete(self, key: str) -> None:
        base = self._key(key)
        # The manifest first: the directory stops existing for readers before its files go.
        self._client.delete_object(Bucket=self._bucket, Key=f"{base}/{MANIFEST}")
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self._bucket, Prefix=f"{base}/"):
            objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if objects:
                self._client.delete_objects(Bucket=self._bucket, Delete={"Objects": objects, "Quiet": True})
        self._client.delete_object(Bucket=self._bucket, Key=base)
        self._cache.evict(key)

    def remove_stale_temp_files(self, older_than_seconds: float) -> int:
        """Abort multipart uploads that a killed writer left (their parts cost storage and never show): those
        with no part written for `older_than_seconds`. A slow upload that is still sending parts is left alone,
        however long ago it started."""
        cutoff = datetime.fromtimestamp(time.time() - older_than_seconds, tz=UTC)
        removed = 0
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
