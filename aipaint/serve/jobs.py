"""The job queue: one model, one job at a time, in arrival order.

Each HTTP request that needs the model takes a ticket as it arrives (in the server's event
loop, so in the order requests were read) and waits for its turn; while
``max_queue`` jobs are held (the running one and those waiting) a new one is refused with :class:`QueueFull`. The running job's
progress callbacks update :class:`JobState` (what ``/sdapi/v1/progress`` reports) and raise
:class:`Interrupted` when ``/interrupt`` or ``/skip`` asked them to stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aipaint.errors import AipaintError


class QueueFull(AipaintError):
    """More jobs are waiting than the server was configured to hold."""


class ClientGone(Exception):  # noqa: N818 - a signal: the job's client closed its connection before its turn
    """Raised by :meth:`JobQueue.turn` for a job whose client went away while it waited."""


class Interrupted(Exception):  # noqa: N818 - a signal, not an error: the job stops where it is
    """Raised from a progress callback to stop the running image (``skip``) or job (``interrupt``)."""


@dataclass
class JobState:
    """What ``/progress`` reports about the running job."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    ticket: int = -1
    interrupted: bool = False
    skipped: bool = False
    preview: Any = None  # the latest aipaint.engine.preview.StepPreview

    @property
    def progress(self) -> float:
        if not self.job_count or not self.sampling_steps:
            return 0.0
        return min(1.0, (self.job_no + self.sampling_step / self.sampling_steps) / self.job_count)


class JobQueue:
    """Serialises the model's work: :meth:`turn` waits for a job's turn, in arrival order."""

    def __init__(self, max_queue: int = 16) -> None:
        self.max_queue = max_queue
        self.state = JobState()
        self._lock = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._cancelled: set[int] = set()
        self._gone: set[int] = set()

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._next_ticket - self._serving

    def ticket(self) -> int:
        """A place in the queue, taken as a request arrives; :class:`QueueFull` when none is left."""
        with self._lock:
            if self._next_ticket - self._serving >= self.max_queue:
                raise QueueFull(f"the server is busy: it holds {self.max_queue} jobs (running and waiting), "
                                "the most it was started with (--queue-size); try again later")
            self._next_ticket += 1
            return self._next_ticket - 1

    def cancel(self, ticket: int) -> None:
        """Give up a ticket whose job will not run (its request was refused): later jobs do not wait for it."""
        with self._lock:
            self._cancelled.add(ticket)
            self._advance()

    def _advance(self) -> None:
        while self._serving in self._cancelled:
            self._cancelled.discard(self._serving)
            self._serving += 1
        self._lock.notify_all()

    @contextmanager
    def turn(self, name: str, job_count: int = 1, ticket: int | None = None) -> Iterator[JobState]:
        """Wait for the turn of ``ticket`` (a new one when None), then hold the model until the block ends."""
        ticket = self.ticket() if ticket is None else ticket
        with self._lock:
            while self._serving != ticket:
                self._lock.wait()
            if ticket in self._gone:  # its client went away while it waited: nobody to answer
                self._gone.discard(ticket)
                self._serving += 1
                self._advance()
                raise ClientGone(name)
            self.state = JobState(job=name, job_count=job_count, started=time.time(), ticket=ticket)
        try:
            yield self.state
        finally:
            with self._lock:
                self.state = JobState()
                self._serving += 1
                self._advance()

    def abandon(self, ticket: int) -> None:
        """The client of ``ticket`` went away: a waiting job will not run, a running one stops
        at its next step as if interrupted."""
        with self._lock:
            if self.state.ticket == ticket:
                self.state.interrupted = True
            elif ticket >= self._serving:
                self._gone.add(ticket)

    def interrupt(self) -> None:
        self.state.interrupted = True

    def skip(self) -> None:
        self.state.skipped = True

    def callbacks(self, state: JobState) -> tuple[Any, Any]:
        """The ``progress`` and ``preview`` callbacks of one image of the job."""

        def progress(done: int, total: int) -> None:
            state.sampling_step, state.sampling_steps = done, total
            if state.interrupted or state.skipped:
                raise Interrupted

        def preview(step: Any) -> None:
            state.preview = step

        return progress, preview
