"""Public identifiers. Random, URL-safe, and prefixed so a reader can tell what an id names."""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def _random(n: int) -> str:
    """n characters of [A-Za-z0-9] from one read of the OS's random source (a syscall per character is slow).
    Bytes >= 248 are dropped so every character is equally likely (248 = 4 x 62)."""
    out: list[str] = []
    while len(out) < n:
        out.extend(_ALPHABET[b % 62] for b in secrets.token_bytes(n + 8) if b < 248)
    return "".join(out[:n])


def project_id() -> str:
    return f"proj_{_random(20)}"


def file_id() -> str:
    return f"file-{_random(24)}"


def job_id() -> str:
    return f"ftjob-{_random(24)}"


def event_id() -> str:
    return f"ftevent-{_random(24)}"


def checkpoint_id() -> str:
    return f"ftckpt_{_random(24)}"


def fine_tuned_model_name(base: str, project: str, suffix: str | None, job: str) -> str:
    """OpenAI's shape, `ft:{base}:{org}:{suffix}:{short id}`; an empty suffix keeps its colons."""
    return f"ft:{base}:{project}:{suffix or ''}:{job.removeprefix('ftjob-')[:8]}"


def checkpoint_model_name(model: str, step: int) -> str:
    return f"{model}:ckpt-step-{step}"


def completion_id() -> str:
    return f"cmpl-{_random(24)}"


def chat_completion_id() -> str:
    return f"chatcmpl-{_random(24)}"
