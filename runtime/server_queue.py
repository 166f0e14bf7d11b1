"""The generation queue of ``edgepack serve``: one model, ``workers`` generations at a time (its slots, ``--parallel``).

Generations start in arrival order (a FIFO ``asyncio.Semaphore`` of ``workers``),
each on a worker thread that reads its ``Stream``. With one worker they take turns
on the session; with more, each reads a slot of ``Session.slots`` and the slots'
thread batches them. A place is given back by the worker's own completion, not by
the request handler, so a handler that is cancelled (client gone, shutdown) can
never let another request start while its generation still runs. A job cancelled
while queued or mid-generation cancels its ``Stream``; the rest of the queue moves on.
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
    """FIFO of generations on one model: ``workers`` worker threads, as many running jobs at a time."""

    def __init__(self, max_queue: int, workers: int = 1) -> None:
        self.max_queue = max_queue
        self.pending = 0  # queued plus running
        self.closing = False
        self._places = asyncio.Semaphore(workers)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="edgepack-generate")
        self._running: set[Job] = set()
        self.finished: Counter[str] = Counter()  # finish reasons ("stop", "length", "cancelled", "error"), for /health

    async def submit(self, start: Callable[[], Stream]) -> Job:
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if self.pending >= self.max_queue:
            raise ApiError(503, f"{self.pending} requests are already queued: retry later (edgepack serve --max-queue)", code="queue_full")
        self.pending += 1
        try:
            await self._places.acquire()
        except BaseException:
            self.pending -= 1
            raise
        if self.closing:
            self._release(None)
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        loop = asyncio.get_running_loop()
        job = Job(start, loop)
        self._running.add(job)
        loop.run_in_executor(self._pool, job.run).add_done_callback(lambda _: self._release(job))
        return job

    @property
    def running(self) -> int:
        return len(self._running)

    def _release(self, job: Job | None) -> None:
        if job is not None:
            self.finished[job.finish] += 1
            self._running.discard(job)
        self.pending -= 1
        self._places.release()

    def stop(self) -> None:
        """Refuse new work and cancel the running generations (server shutdown)."""
        self.closing = True
        for job in list(self._running):
            job.cancel()

    def close(self) -> None:
        self.stop()
        self._pool.shutdown(wait=True)
