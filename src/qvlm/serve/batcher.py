"""A bounded request queue and one worker thread that runs compatible requests as one batch.

The event loop never runs the model: handlers ``submit`` a ``Job`` and read its events (text deltas,
then one "done" or "error") from an ``asyncio.Queue`` the worker fills thread-safely. The worker
takes the oldest waiting job plus up to ``max_batch_size - 1`` more with the same ``key`` (same
sampling settings), in arrival order, and hands them to ``run_batch``. Back-pressure: more than
``max_queue`` waiting jobs and ``submit`` raises ``QueueFull`` (the server answers 429). A job whose
client left is ``cancel``-led: taken out of the queue at once if it waits, or stopped by the runner
at its next generation step if it runs (``Job.cancelled``).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting jobs already."""


@dataclass(eq=False)
class Job:
    """One request's work and its way back to the event loop."""

    key: Hashable  # jobs with equal keys may share a batch
    payload: Any  # what ``run_batch`` needs (the engine's prepared request)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False  # set with the final event ("done" or "error")
    failed: bool = False  # the final event was an "error"

    def emit(self, kind: str, **data: Any) -> None:
        """Send an event to the handler (from any thread). "done" and "error" end the job."""
        if self.done:
            return
        self.done = kind in ("done", "error")
        self.failed = kind == "error"
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


@dataclass
class Stats:
    submitted: int = 0
    rejected: int = 0  # queue full
    completed: int = 0
    cancelled: int = 0  # the client left
    failed: int = 0
    batches: int = 0
    largest_batch: int = 0


class Batcher:
    def __init__(self, run_batch: Callable[[list[Job]], None], max_batch_size: int = 8, max_queue: int = 64):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.stats = Stats()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- the event-loop side -------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue and (self._running or self._waiting):
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (max_queue {self.max_queue})")
            self._waiting.append(job)
            self.stats.submitted += 1
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client left: drop the job if it waits, else flag it for the runner."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.stats.cancelled += 1
                job.emit("done", finish_reason="cancelled")

    def snapshot(self) -> dict:
        with self._cond:
            return {"waiting": len(self._waiting), "running": len(self._running),
                    "max_batch_size": self.max_batch_size, "max_queue": self.max_queue, **vars(self.stats)}

    # ---- the worker ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="qvlm-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, cancel the waiting ones, let the running batch finish."""
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                job.emit("error", message="the server is shutting down", status=503)
            self._waiting.clear()
            for job in self._running:
                job.cancelled.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _take(self) -> list[Job]:
        """The oldest waiting job and up to max_batch_size - 1 later ones with its key (lock held)."""
        first = self._waiting.popleft()
        batch = [first]
        for job in list(self._waiting):
            if len(batch) == self.max_batch_size:
                break
            if job.key == first.key:
                self._waiting.remove(job)
                batch.append(job)
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = self._running = self._take()
                self.stats.batches += 1
                self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            try:
                self.run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - a failed batch fails its jobs, not the server
                for job in batch:
                    job.emit("error", message=f"generation failed: {type(exc).__name__}: {exc}", status=500)
            with self._cond:
                for job in batch:
                    if not job.done:  # a runner must end every job; this is the safety net
                        job.emit("error", message="generation ended without an answer", status=500)
                    if job.cancelled.is_set():
                        self.stats.cancelled += 1
                    elif job.failed:
                        self.stats.failed += 1
                    else:
                        self.stats.completed += 1
                self._running = []
