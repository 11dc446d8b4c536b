"""Watching one job of the engine from a test: what the adapters contributed and which steps'
conditioning the loop asked for, without reaching into the engine's internals."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest.mock import patch


@dataclass
class JobRecord:
    contributors: list[Any] = field(default_factory=list)  # the adapters' loop contributors
    infotext: dict[str, str] = field(default_factory=dict)  # the adapters' PNG parameters
    conditioning_steps: list[int] = field(default_factory=list)  # one per model call of the main model
    conditioning_at: Callable[[int], Any] | None = None  # the main model's conditioning schedule


@contextmanager
def record_job() -> Iterator[JobRecord]:
    """Record the next job(s) run through :func:`aipaint.engine.run.generate`."""
    import aipaint.engine.run as run

    record = JobRecord()
    real_activate, real_schedule = run.activate_adapters, run.conditioning_schedule

    def activate(*args: Any, **kwargs: Any) -> Any:
        active = real_activate(*args, **kwargs)
        record.contributors.extend(active.contributors)
        record.infotext.update(active.infotext)
        return active

    def schedule(*args: Any, **kwargs: Any) -> Any:
        conditioning_at = real_schedule(*args, **kwargs)
        if record.conditioning_at is not None:  # a refiner's schedule: not the main model's
            return conditioning_at
        record.conditioning_at = conditioning_at

        def recording(step: int) -> Any:
            record.conditioning_steps.append(step)
            return conditioning_at(step)

        return recording

    with patch.object(run, "activate_adapters", activate), patch.object(run, "conditioning_schedule", schedule):
        yield record
