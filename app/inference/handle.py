"""The bridge from the scheduler thread to the consumer (an asyncio task, or a plain thread)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable

from app.inference.types import Finished, TextDelta


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class GenerationHandle:
    """Events of one request: `TextDelta`... then exactly one `Finished`, or the error raised while iterating.

    The scheduler thread pushes events; the consumer iterates with `async for` (on any event loop) or a plain
    `for`. `cancel()` tells the scheduler that nobody is listening: the request leaves the batch at the next
    decode step and its stream ends with `Finished(finish_reason="cancelled")`.
    """

    def __init__(self, on_first_event: Callable[[], None] | None = None) -> None:
        # Called once, on the producer's thread, when the first event arrives: the sequence has started decoding
        # or has ended without starting (the engine counts what waits; see app/inference/allowance.py).
        self._on_first_event = on_first_event
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._events: deque = deque()
        self._ended = False  # the consumer has taken the terminal event
        self._waiter: asyncio.Future | None = None
        self._cancelled = threading.Event()

    # consumer side

    def cancel(self) -> None:
        """The client went away: stop decoding this request at the next step (idempotent, thread-safe)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __aiter__(self) -> GenerationHandle:
        return self

    async def __anext__(self) -> TextDelta | Finished:
        while True:
            with self._lock:
                if self._ended:
                    raise StopAsyncIteration
                if self._events:
                    return self._take()
                waiter = asyncio.get_running_loop().create_future()
                self._waiter = waiter
            await waiter

    def __iter__(self) -> GenerationHandle:
        return self

    def __next__(self) -> TextDelta | Finished:
        with self._ready:
            if self._ended:
                raise StopIteration
            self._ready.wait_for(lambda: self._events)
            return self._take()

    def _take(self) -> TextDelta | Finished:
        event = self._events.popleft()
        if isinstance(event, BaseException):
            self._ended = True
            raise event
        if isinstance(event, Finished):
            self._ended = True
        return event

    # producer side (scheduler or loader threads)

    def push(self, event: TextDelta | Finished | BaseException) -> None:
        with self._ready:
            self._events.append(event)
            self._ready.notify_all()
            waiter, self._waiter = self._waiter, None
            first, self._on_first_event = self._on_first_event, None
        if first is not None:
            first()
        if waiter is not None:
            # A closed loop means the consumer is gone: nobody will read this event.
            with contextlib.suppress(RuntimeError):
                waiter.get_loop().call_soon_threadsafe(_wake, waiter)
