"""The starting noise of a generation, with A1111's seed extras.

* **Variation seed** (``subseed``, ``subseed_strength``): the noise of the seed is
  spherically interpolated towards the noise of a second seed, so a strength of 0.05
  gives a close variation of an image and 1.0 gives the variation seed's own image.
* **Resize seed from W×H** (``seed_resize_from_w/h``): the noise a seed would give at
  another size is drawn and pasted, centred, into this size's noise, so changing the
  size keeps the composition of an image found at the old size.

Everything is drawn on the CPU, one generator per image (seed + i, variation seed + i),
so A1111's "CPU" random source, CPU and GPU runs all start from the same numbers. The
per-image generator keeps running afterwards (ancestral samplers draw from it), as in
A1111, which draws the variation and the resized noise from fresh generators instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from aipaint.api.request import MAX_SEED

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``low`` (t=0) to ``high`` (t=1), as A1111 does it.

    A1111 normalises over dimension 1 of a ``(C, H, W)`` noise tensor, i.e. each
    ``(channel, column)`` vector separately; the numbers are kept identical to its own.
    Nearly parallel vectors fall back to linear interpolation.
    """
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * (1 - t) + high * t
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _fresh(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed))


def paste_centred(small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """Paste ``small`` (C, h, w) centred into a copy of ``big`` (C, H, W), cropping what overflows."""
    out = big.clone()
    dy, dx = (big.shape[1] - small.shape[1]) // 2, (big.shape[2] - small.shape[2]) // 2
    h = small.shape[1] if dy >= 0 else small.shape[1] + 2 * dy
    w = small.shape[2] if dx >= 0 else small.shape[2] + 2 * dx
    ty, tx = max(dy, 0), max(dx, 0)
    sy, sx = max(-dy, 0), max(-dx, 0)
    out[:, ty : ty + h, tx : tx + w] = small[:, sy : sy + h, sx : sx + w]
    return out


def initial_noise(
    seeds: Sequence[int],
    shape: tuple[int, ...],
    generators: Sequence[torch.Generator],
    *,
    subseeds: Sequence[int] = (),
    subseed_strength: float = 0.0,
    resize_from: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Noise of ``shape`` (C, H, W) for each image, batched along a new first dimension.

    ``generators[i]`` is seeded with ``seeds[i]`` and advanced by the main draw.
    ``resize_from`` is the *latent* ``(height, width)`` the seed's noise is drawn at
    before being pasted into ``shape``; ``subseeds`` apply when ``subseed_strength > 0``.
    """
    shape = tuple(int(s) for s in shape)
    noise_shape = shape
    if resize_from is not None and tuple(resize_from) != shape[1:]:
        noise_shape = (shape[0], int(resize_from[0]), int(resize_from[1]))
    items = []
    for i, (seed, generator) in enumerate(zip(seeds, generators, strict=True)):
        if noise_shape == shape:
            noise = _randn(shape, generator)
        else:
            noise = _randn(noise_shape, _fresh(seed))
        if subseed_strength and subseeds:
            noise = slerp(float(subseed_strength), noise, _randn(noise_shape, _fresh(subseeds[i])))
        if noise_shape != shape:
            noise = paste_centred(noise, _randn(shape, generator))
        items.append(noise)
    return torch.stack(items)


def variation_seeds(request: GenerationRequest) -> list[int]:
    """The variation seed of each image of a batch (``subseed + i``, like ``seed + i``)."""
    return [(request.subseed + i) % (MAX_SEED + 1) for i in range(request.batch_size)]


def request_noise(
    request: GenerationRequest, shape: tuple[int, ...], generators: Sequence[torch.Generator], factor: int
) -> torch.Tensor:
    """The starting noise of a prepared request; ``factor`` is the model's pixels per latent."""
    resize_from = None
    if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
        resize_from = (request.seed_resize_from_h // factor, request.seed_resize_from_w // factor)
    return initial_noise(
        request.seeds,
        shape,
        generators,
        subseeds=variation_seeds(request) if request.subseed_strength else (),
        subseed_strength=request.subseed_strength,
        resize_from=resize_from,
    )


def seed_infotext(request: GenerationRequest, seed: int) -> dict[str, object]:
    """A1111's infotext entries for the seed extras of the image made with ``seed``."""
    values: dict[str, object] = {}
    if request.subseed_strength:
        index = (seed - request.seed) % (MAX_SEED + 1)
        values["Variation seed"] = (request.subseed + index) % (MAX_SEED + 1)
        values["Variation seed strength"] = request.subseed_strength
    if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
        values["Seed resize from"] = f"{request.seed_resize_from_w}x{request.seed_resize_from_h}"
    return values
