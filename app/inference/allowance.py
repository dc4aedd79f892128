"""How many sequences each owner (project) has submitted that have not started: one owner's burst is capped, and
a client request's sequences are taken or refused together, so a request is never half admitted and a stream
never starts with 200 only to end in a 429."""

from __future__ import annotations

import threading
from collections import Counter

from app.errors import RateLimited


class WaitingAllowance:
    def __init__(self, max_waiting_per_owner: int) -> None:
        self._max = max_waiting_per_owner
        self._lock = threading.Lock()
        self._waiting: Counter[str] = Counter()

    def reserve(self, owner: str, count: int) -> None:
        """Count `count` more sequences of `owner` as waiting, or refuse them all with 429."""
        with self._lock:
            if self._waiting[owner] + count > self._max:
                raise RateLimited(
                    f"This project already has {self._waiting[owner]} sequences waiting for the engine and this "
                    f"request adds {count}; at most {self._max} may wait. Retry when some have started.",
                    kind="requests",
                    retry_after=1,
                    rate_headers={},
                )
            self._waiting[owner] += count

    def release(self, owner: str, count: int = 1) -> None:
        """Sequences that started decoding or ended before they could (failed, cancelled, refused)."""
        with self._lock:
            self._waiting[owner] -= count
            if self._waiting[owner] <= 0:
                del self._waiting[owner]

    def waiting(self, owner: str) -> int:
        with self._lock:
            return self._waiting[owner]
