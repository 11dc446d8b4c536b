"""Schedule types (A1111's "Schedule type"): the sigma spacing a sampler steps through."""

from __future__ import annotations

from typing import Any

SCHEDULES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
}
"""Schedule types as A1111 names them, with the scheduler options that select them."""
