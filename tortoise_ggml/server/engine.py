"""One worker thread that owns the TextToSpeech, fed by a bounded queue of jobs.

TextToSpeech is not thread-safe and its work is compute-bound, so every call on it runs here, one job at a time,
off the event loop. A job is a generator function ``work(tts)``: the worker runs it item by item (an item is one
part's audio, or a result) and hands each item to the job's asyncio side as soon as it is made. Between items the
worker checks the job's cancel flag, so a cancelled long-input job stops at the next part boundary; a job cancelled
while it waits is taken out of the queue at once.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque

log = logging.getLogger("tortoise_ggml.server")

ITEM, ERROR, DONE = "item", "error", "done"


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


class Job:
    """A unit of work and the channel its items come back on (read from the event loop with ``next``)."""

    def __init__(self, work, request_id: str, loop: asyncio.AbstractEventLoop, label: str = "job"):
        self.work = work
        self.id = request_id
        self.label = label
        self.state = "queued"          # queued -> running -> done | cancelled | failed
        self.submitted = time.monotonic()
        self._loop = loop
        self._items: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _emit(self, kind: str, value=None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, (kind, value))
        except RuntimeError:   # the event loop is gone (shutdown): nobody is listening any more
            pass

    async def next(self):
        """The next (kind, value): (ITEM, x), (ERROR, exception) or (DONE, None); the last two end the job."""
        return await self._items.get()


class Engine:
    def __init__(self, tts, max_queue: int = 8):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.tts = tts
        self.max_queue = int(max_queue)
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._closing = False
        self._job_seconds = None      # moving average of a job's run time, for Retry-After
        self.counts = {"done": 0, "failed": 0, "cancelled": 0, "rejected": 0}
        self._thread = threading.Thread(target=self._loop, name="tts-worker", daemon=True)

    # -- the event loop's side ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, work, request_id: str, label: str = "job") -> Job:
        """Queue ``work``; raises QueueFull (with a Retry-After estimate) or ShuttingDown. Call from the loop."""
        job = Job(work, request_id, asyncio.get_running_loop(), label)
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue and (self._running is not None or self._queue):
                self.counts["rejected"] += 1
                raise QueueFull(self._retry_after_locked())
            self._queue.append(job)
            self._cond.notify()
        log.info("[%s] %s queued (%d waiting)", request_id, label, len(self._queue))
        return job

    def cancel(self, job: Job, why: str = "client disconnected") -> None:
        """Cancel ``job``: dropped from the queue if it waits, stopped at its next item boundary if it runs."""
        if job.cancelled or job.state in ("done", "failed", "cancelled"):
            return
        job._cancel.set()
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                job.state = "cancelled"
                self.counts["cancelled"] += 1
                log.info("[%s] %s cancelled while queued (%s)", job.id, job.label, why)
                return
        log.info("[%s] %s cancelled while running (%s): stops at the next part boundary", job.id, job.label, why)

    def begin_shutdown(self) -> None:
        """Refuse new jobs and fail the queued ones (503); the running job finishes."""
        with self._cond:
            self._closing = True
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in dropped:
            job.state = "cancelled"
            job._emit(ERROR, ShuttingDown("the server is shutting down"))
        if dropped:
            log.info("shutting down: %d queued job(s) refused", len(dropped))

    def stop(self, timeout: float | None = None) -> None:
        """begin_shutdown, then wait for the running job to finish."""
        self.begin_shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def closing(self) -> bool:
        return self._closing

    def status(self) -> dict:
        with self._cond:
            return {"running": self._running.id if self._running is not None else None, "queued": len(self._queue),
                    "max_queue": self.max_queue, "closing": self._closing, **self.counts}

    def _retry_after_locked(self) -> int:
        per_job = self._job_seconds if self._job_seconds is not None else 5.0
        return int(min(3600, max(1, math.ceil(per_job * (len(self._queue) + 1)))))

    # -- the worker thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:      # closing and nothing left
                    return
                job = self._queue.popleft()
                self._running = job
                job.state = "running"
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None

    def _run(self, job: Job) -> None:
        t0 = time.monotonic()
        log.info("[%s] %s started (waited %.2f s)", job.id, job.label, t0 - job.submitted)
        if job.cancelled:
            job.state = "cancelled"
            self._count("cancelled")
            log.info("[%s] %s cancelled before it started", job.id, job.label)
            job._emit(DONE)
            return
        gen = None
        try:
            gen = job.work(self.tts)
            for item in gen:
                job._emit(ITEM, item)
                if job.cancelled:
                    break
        except BaseException as e:  # noqa: BLE001 - any failure goes back to the request that caused it
            job.state = "failed"
            self._count("failed")
            level = logging.INFO if isinstance(e, (ValueError, LookupError, NotImplementedError)) else logging.ERROR
            log.log(level, "[%s] %s failed after %.2f s: %s: %s", job.id, job.label, time.monotonic() - t0,
                    type(e).__name__, e, exc_info=level >= logging.ERROR)
            job._emit(ERROR, e)
            if not isinstance(e, Exception):
                raise
            return
        finally:
            if gen is not None:
                gen.close()
        elapsed = time.monotonic() - t0
        if job.cancelled:
            job.state = "cancelled"
            self._count("cancelled")
            log.info("[%s] %s stopped after %.2f s (cancelled)", job.id, job.label, elapsed)
        else:
            job.state = "done"
            self._count("done")
            with self._cond:
                a = 0.3
                self._job_seconds = elapsed if self._job_seconds is None else (1 - a) * self._job_seconds + a * elapsed
            log.info("[%s] %s done in %.2f s", job.id, job.label, elapsed)
        job._emit(DONE)

    def _count(self, key: str) -> None:
        with self._cond:
            self.counts[key] += 1
