"""How many sequences each owner (project) has submitted to a base model's queue that have not started: one
owner's burst is capped per base model (each has its own batch), and a client request's sequences are taken or
refused together, so a request is never half admitted and a stream never starts with 200 only to end in a 429."""

from __future__ import annotations

import threading
from collections import Counter

from app.errors import RateLimited


class WaitingAllowance:
    def __init__(self, max_waiting_per_owner: int) -> None:
        self._max = max_waiting_per_owner
        self._lock = threading.Lock()
        self._waiting: Counter[tuple[str, str]] = Counter()  # (owner, base model) -> sequences

    def reserve(self, queue: tuple[str, str], count: int) -> None:
        """Count `count` more sequences as waiting in `queue` (owner, base model), or refuse them all with 429."""
        with self._lock:
            if self._waiting[queue] + count > self._max:
                raise RateLimited(
                    f"This project already has {self._waiting[queue]} sequences waiting for the model "
                    f"'{queue[1]}' and this request adds {count}; at most {self._max} may wait. Retry when some "
                    "have started.",
                    kind="requests",
                    retry_after=1,
                    rate_headers={},
                )
            self._waiting[queue] += count

    def release(self, queue: tuple[str, str], count: int = 1) -> None:
        """Sequences that started decoding or ended before they could (failed, cancelled, refused)."""
        with self._lock:
            self._waiting[queue] -= count
            if self._waiting[queue] <= 0:
                del self._waiting[queue]

    def waiting(self, queue: tuple[str, str]) -> int:
        with self._lock:
            return self._waiting[queue]
