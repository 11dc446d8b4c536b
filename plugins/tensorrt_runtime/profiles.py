"""TensorRT optimization profiles, computed from an ONNX export's manifest.

Pure Python (no TensorRT needed), so it is tested everywhere. An engine accepts any
input shape between a profile's ``min`` and ``max`` and is fastest at ``opt``. The
user thinks in images per request and pixels; the networks see other numbers:

* the UNet's batch is the image batch times the prompt parts of classifier-free
  guidance (negative + positive: 2), so it spans ``min_batch`` to ``2 * max_batch``;
* the text encoder encodes one 77-token chunk per call (A1111's chunking), and the UNet
  sees ``77 * chunks`` tokens, up to ``max_chunks``;
* height and width are latent pixels: image pixels divided by the VAE factor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aipaint.errors import InvalidParameter
from aipaint.plugin.kit.exports import resolve_shape

Shape = tuple[int, ...]
GUIDANCE_PARTS = 2  # negative + positive prompt per image under classifier-free guidance


@dataclass(frozen=True)
class ProfileSettings:
    """What the engines must accept. Defaults: batch 1–4, 256–1024 px, up to 3 prompt chunks."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4
    min_size: int = 256
    opt_size: int = 512
    max_size: int = 1024
    max_chunks: int = 3

    def check(self, vae_scale_factor: int) -> None:
        for name in ("min_batch", "opt_batch", "max_batch", "max_chunks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameter(name, value, "a whole number of at least 1")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise InvalidParameter("batch", (self.min_batch, self.opt_batch, self.max_batch), "min <= opt <= max")
        if not self.min_size <= self.opt_size <= self.max_size:
            raise InvalidParameter("size", (self.min_size, self.opt_size, self.max_size), "min <= opt <= max")
        step = 8 * vae_scale_factor
        for name in ("min_size", "opt_size", "max_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < step or value % step:
                raise InvalidParameter(name, value, f"a multiple of {step} pixels for this model (8 latent pixels)")

    def symbol_ranges(self, component: str, vae_scale_factor: int) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of each shape symbol for one component."""
        latent = tuple(s // vae_scale_factor for s in (self.min_size, self.opt_size, self.max_size))
        if component == "unet":
            batch = (self.min_batch, GUIDANCE_PARTS * self.opt_batch, GUIDANCE_PARTS * self.max_batch)
        elif component.startswith("text_encoder"):
            batch = (1, 1, self.max_batch)
        else:
            batch = (self.min_batch, self.opt_batch, self.max_batch)
        return {"batch": batch, "height": latent, "width": latent, "sequence": (77, 77, 77 * self.max_chunks)}


def component_profiles(
    components: Mapping[str, Mapping[str, Any]], settings: ProfileSettings, vae_scale_factor: int
) -> dict[str, dict[str, tuple[Shape, Shape, Shape]]]:
    """``{component: {input: (min, opt, max)}}`` for every input of every exported component."""
    settings.check(vae_scale_factor)
    profiles: dict[str, dict[str, tuple[Shape, Shape, Shape]]] = {}
    for name, entry in components.items():
        ranges = settings.symbol_ranges(name, vae_scale_factor)
        picks = [{symbol: r[i] for symbol, r in ranges.items()} for i in range(3)]
        profiles[name] = {
            io["name"]: tuple(resolve_shape(io["shape"], values) for values in picks)  # type: ignore[misc]
            for io in entry["inputs"]
        }
    return profiles


def shape_in_profile(shape: Shape, profile: tuple[Shape, Shape, Shape]) -> bool:
    low, _, high = profile
    return len(shape) == len(low) and all(lo <= s <= hi for s, lo, hi in zip(shape, low, high))
