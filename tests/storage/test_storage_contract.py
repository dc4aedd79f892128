"""The storage contract, on both backends: the data directory and a real S3-compatible HTTP server (moto's
standalone server, started by the test session). What one backend promises the other must keep: nothing is
visible until committed, an aborted write leaves nothing, directories appear whole, deletes take everything."""

from __future__ import annotations

import os

import pytest

from app.storage.s3 import PART_BYTES, S3Storage


def leftovers(storage) -> list[str]:
    """Everything the backend holds, committed or not: files and temp files, or objects and multipart uploads."""
    if isinstance(storage, S3Storage):
        client, bucket, prefix = storage._client, storage._bucket, storage._prefix
        objects = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
        return [o["Key"] for o in objects] + [f"upload:{u['Key']}" for u in uploads]
    return [str(p.relative_to(storage.root)) for p in storage.root.rglob("*") if p.is_file()]


def write(storage, key: str, data: bytes, piece: int = 1024 * 1024) -> None:
    writer = storage.writer(key)
    for start in range(0, len(data), piece):
        writer.write(data[start : start + piece])
    writer.commit()


@pytest.mark.parametrize("size", [0, 10, PART_BYTES * 2 + 12345])  # empty, one request, multipart with a tail
def test_a_committed_blob_reads_back_whole(storage, size):
    data = os.urandom(size)
    write(storage, "files/file-a", data)
    assert storage.exists("files/file-a") and storage.size("files/file-a") == size
    assert b"".join(storage.iter_chunks("files/file-a", chunk_size=65536)) == data
    assert storage.local_file("files/file-a").read_bytes() == data


def test_nothing_is_visible_before_commit_and_an_abort_leaves_nothing(storage):
    writer = storage.writer("files/file-b")
    writer.write(os.urandom(PART_BYTES + 1))  # past one part: object storage has started a multipart upload
    assert not storage.exists("files/file-b")
    writer.abort()
    assert not storage.exists("files/file-b")
    assert leftovers(storage) == []


def test_missing_blobs_and_directories(storage):
    assert not storage.exists("files/none") and not storage.dir_exists("adapters/none")
    for read in (storage.local_file, storage.local_dir, storage.size, lambda k: list(storage.iter_chunks(k))):
        with pytest.raises(FileNotFoundError):
            read("files/none")
    storage.delete("files/none")  # deleting what is not there is not an error


def test_a_directory_is_stored_whole_and_deleted_whole(storage, tmp_path):
    source = tmp_path / "adapter"
    (source / "nested").mkdir(parents=True)
    (source / "adapter_config.json").write_text('{"r": 8}')
    (source / "nested" / "weights.bin").write_bytes(os.urandom(5000))
    storage.put_dir("adapters/job-1/attempt-1", source)
    assert storage.dir_exists("adapters/job-1/attempt-1")
    local = storage.local_dir("adapters/job-1/attempt-1")
    assert (local / "adapter_config.json").read_text() == '{"r": 8}'
    assert (local / "nested" / "weights.bin").read_bytes() == (source / "nested" / "weights.bin").read_bytes()
    write(storage, "files/file-c", b"kept")
    storage.delete("adapters/job-1/attempt-1")
    assert not storage.dir_exists("adapters/job-1/attempt-1")
    with pytest.raises(FileNotFoundError):
        storage.local_dir("adapters/job-1/attempt-1")
    assert storage.exists("files/file-c")  # a delete takes its key only
    storage.delete("files/file-c")
    assert leftovers(storage) == []


def test_what_a_killed_writer_left_is_removed_once_stale(storage):
    writer = storage.writer("files/file-d")
    writer.write(os.urandom(PART_BYTES + 1))  # then the process dies: no commit, no abort
    assert storage.remove_stale_temp_files(older_than_seconds=3600) == 0  # it may still be writing
    assert leftovers(storage) != []
    assert storage.remove_stale_temp_files(older_than_seconds=0) == 1
    assert leftovers(storage) == []


def test_keys_cannot_escape(storage):
    with pytest.raises(ValueError):
        storage.writer("../outside")


def test_an_upload_whose_row_fails_to_commit_leaves_no_object(storage, sessionmaker, monkeypatch):
    """The blob is written before its row, and removed if the row does not commit: a crash between the two can
    leave an unreferenced blob, never a row without its blob; a failed commit leaves neither."""
    from sqlalchemy import select

    from app.services import files, keys
    from app.tables import File
    from tests.conftest import make_key
    from tests.datasets.samples import valid_chat_file

    key = make_key(sessionmaker, f"p-{os.urandom(4).hex()}")
    upload = files.FileUpload(storage, max_bytes=10**6)
    upload.write(valid_chat_file(12))
    with sessionmaker() as session:
        project = keys.authenticate(session, key)

        def broken_commit():
            raise RuntimeError("the database went away")

        monkeypatch.setattr(session, "commit", broken_commit)
        with pytest.raises(RuntimeError):
            files.store_upload(session, storage, project, upload, "fine-tune", "t.jsonl")
    with sessionmaker() as session:
        assert session.scalar(select(File).where(File.id == upload.id)) is None
    assert not storage.exists(f"files/{upload.id}") and leftovers(storage) == []
