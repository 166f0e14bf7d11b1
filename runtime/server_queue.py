"""The generation queue of ``edgepack serve``: one model, one context, one generation at a time.

Generations run on a single worker thread, in arrival order (a FIFO
``asyncio.Lock``). The lock is released by the worker's own completion, not by
the request handler, so a handler that is cancelled (client gone, shutdown) can
never let the next request start while the previous generation still runs. A
job cancelled while queued or mid-generation cancels its ``Stream``; the rest
of the queue moves on.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .base import Stream
from .server_protocol import ApiError


class Job:
    """One generation on the worker thread; its pieces arrive as ("piece" | "done" | "error", value) events."""

    def __init__(self, start: Callable[[], Stream], loop: asyncio.AbstractEventLoop) -> None:
        self._start = start
        self._loop = loop
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._stream: Stream | None = None
        self._cancelled = False
        self.finish = "cancelled"  # until the stream says otherwise

    def run(self) -> None:
        """Worker thread body: every outcome, including a failure to start, becomes an event."""

        def put(kind: str, value: Any) -> None:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

        if self._cancelled:
            return
        try:
            with self._start() as stream:
                self._stream = stream
                if self._cancelled:  # cancel() ran before the stream existed
                    stream.cancel()
                for piece in stream:
                    if piece:
                        put("piece", piece)
            self.finish = stream.completion.finish_reason
            put("done", stream.completion)
        except BaseException as e:  # noqa: BLE001 - delivered to the request, which renders it
            self.finish = "error"
            put("error", e)

    def cancel(self) -> None:
        """Stop this generation (or keep it from starting); safe to call at any time, repeatedly."""
        self._cancelled = True
        if self._stream is not None:
            self._stream.cancel()

    async def next(self) -> tuple[str, Any]:
        try:
            return await self._events.get()
        except BaseException:  # the request was cancelled: stop generating for nobody
            self.cancel()
            raise


class Gate:
    """FIFO of generations on one session: one worker thread, one running job at a time."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.pending = 0  # queued plus running
        self.closing = False
        self._lock = asyncio.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgepack-generate")
        self._running: Job | None = None
        self.finished: Counter[str] = Counter()  # finish reasons ("stop", "length", "cancelled", "error"), for /health

    async def submit(self, start: Callable[[], Stream]) -> Job:
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if self.pending >= self.max_queue:
            raise ApiError(503, f"{self.pending} requests are already queued: retry later (edgepack serve --max-queue)", code="queue_full")
        self.pending += 1
        try:
            await self._lock.acquire()
        except BaseException:
            self.pending -= 1
            raise
        if self.closing:
            self._release(None)
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        loop = asyncio.get_running_loop()
        job = self._running = Job(start, loop)
        loop.run_in_executor(self._pool, job.run).add_done_callback(lambda _: self._release(job))
        return job

    def _release(self, job: Job | None) -> None:
        if job is not None:
            self.finished[job.finish] += 1
        self._running = None
        self.pending -= 1
        self._lock.release()

    def stop(self) -> None:
        """Refuse new work and cancel the running generation (server shutdown)."""
        self.closing = True
        if self._running is not None:
            self._running.cancel()

    def close(self) -> None:
        self.stop()
        self._pool.shutdown(wait=True)
