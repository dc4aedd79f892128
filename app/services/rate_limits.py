"""Per-project rate limits on the inference endpoints: requests and tokens per minute, as token buckets.

A request takes one request and its token budget (prompt tokens plus max_tokens for every sequence, as OpenAI
counts it) when it is admitted; a bucket refills continuously at its per-minute rate. A request the buckets
cannot cover is refused with 429, Retry-After and OpenAI's `x-ratelimit-*` headers, which successful answers
carry too. Buckets live in the API process: with several API processes each enforces the limit on its own share.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.errors import InvalidRequest, RateLimited


@dataclass
class _Bucket:
    level: float
    updated: float


class _Limit:
    """One per-minute limit, a bucket per project."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self._rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def level(self, project: str) -> float:
        now = self._clock()
        bucket = self._buckets.setdefault(project, _Bucket(float(self.per_minute), now))
        bucket.level = min(float(self.per_minute), bucket.level + (now - bucket.updated) * self._rate)
        bucket.updated = now
        return bucket.level

    def wait_for(self, project: str, amount: float) -> float:
        """Seconds until `amount` is available (0 if it is now)."""
        return max(0.0, (amount - self.level(project)) / self._rate)

    def take(self, project: str, amount: float) -> None:
        self._buckets[project].level -= amount

    def headers(self, project: str, name: str) -> dict[str, str]:
        remaining = self.level(project)
        refill = (self.per_minute - remaining) / self._rate
        return {
            f"x-ratelimit-limit-{name}": str(self.per_minute),
            f"x-ratelimit-remaining-{name}": str(math.floor(remaining)),
            f"x-ratelimit-reset-{name}": f"{refill:.3g}s",
        }


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._requests = _Limit(requests_per_minute, clock) if requests_per_minute else None
        self._tokens = _Limit(tokens_per_minute, clock) if tokens_per_minute else None
        self._lock = threading.Lock()

    def admit(self, project: str, tokens: int) -> dict[str, str]:
        """Take one request and `tokens` from the project's buckets; returns the x-ratelimit-* headers.
        Raises RateLimited (nothing taken) when either is short, InvalidRequest when `tokens` could never fit."""
        with self._lock:
            if self._tokens is not None and tokens > self._tokens.per_minute:
                raise InvalidRequest(
                    f"This request needs {tokens} tokens (prompt and max_tokens), more than this project's limit "
                    f"of {self._tokens.per_minute} tokens per minute; lower max_tokens.",
                    param="max_tokens",
                    code="rate_limit_exceeded",
                )
            waits = {
                name: limit.wait_for(project, amount)
                for name, limit, amount in (("requests", self._requests, 1), ("tokens", self._tokens, tokens))
                if limit is not None
            }
            short = {name: wait for name, wait in waits.items() if wait > 0}
            if short:
                kind, wait = max(short.items(), key=lambda item: item[1])
                raise RateLimited(
                    f"Rate limit reached for {kind} per minute for this project; retry in {wait:.1f} s.",
                    kind=kind,
                    retry_after=wait,
                    rate_headers=self._headers(project),
                )
            for limit, amount in ((self._requests, 1), (self._tokens, tokens)):
                if limit is not None:
                    limit.take(project, amount)
            return self._headers(project)

    def _headers(self, project: str) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self._requests is not None:
            headers |= self._requests.headers(project, "requests")
        if self._tokens is not None:
            headers |= self._tokens.headers(project, "tokens")
        return headers
