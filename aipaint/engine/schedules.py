"""Schedule types (A1111's "Schedule type"): the sigma spacing a sampler steps through."""

from __future__ import annotations

from typing import Any

SCHEDULES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    # k-diffusion's sgm_uniform: timesteps evenly spaced from the last training step down,
    # the final one left out (diffusers' "trailing" spacing). What SDXL Turbo, Lightning and
    # Hyper-SD are sampled with, and what their cards ask for.
    "SGM Uniform": {"timestep_spacing": "trailing"},
}
"""Schedule types as A1111 names them, with the scheduler options that select them."""
