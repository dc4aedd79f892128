"""Where things live in storage. Keys are built from server-chosen ids only; an attempt's blobs carry its attempt
number, so a stale worker can never overwrite what the current one wrote."""

from __future__ import annotations


def file_key(file_id: str) -> str:
    return f"files/{file_id}"


def checkpoint_key(job_id: str, attempt: int, step: int) -> str:
    return f"jobs/{job_id}/checkpoints/step-{step:06d}-attempt-{attempt}"


def adapter_key(job_id: str, attempt: int) -> str:
    return f"models/{job_id}/attempt-{attempt}"
