"""QR-code art: pictures that carry a scannable code.

1. Make the code (error correction H).
2. Draw art that follows it: through a QR ControlNet (an installed one with "qr" in its
   name, or ``controlnet=NAME``; through the ControlNet adapter's public unit API),
   otherwise by img2img from the code itself.
3. Blend the code back in, module by module, by the code's *contribution* ``c`` (0: the
   art alone, 1: the plain code): each module's centre — where decoders sample — and the
   finder, timing and alignment patterns and the quiet zone — through which decoders find
   the code — are pushed toward the module's colour with weight ``min(1, 2c)``; the rest of
   each module with weight ``c²``, so the art survives between module centres.
4. Verify with real decoders, and repair: raise ``c`` step by step until the picture
   decodes, refine the lowest decoding ``c`` by bisection, then return
   ``c = lowest + safety`` (checked again). The *margin* — how far the blend could go
   back toward the plain art and still decode — is ``c - lowest``.

Every picture returned decodes to the payload; when even the plain code (``c = 1``) does
not, :class:`~aipaint_plugins.qrcode.code.QRUnreadable` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from aipaint_plugins.qrcode.code import QRCode, QRUnreadable, check_decoders, decodes_to, make_code

from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.plugin.kit.options import number

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.api.result import Result
    from aipaint.pipeline import Pipeline

CENTRE_FRACTION = 0.5


@dataclass(frozen=True)
class RepairSettings:
    """How the repair loop searches: start, step, bisection rounds, and the safety margin."""

    start: float = 0.1
    step: float = 0.05
    refine: int = 4
    safety: float = 0.1

    def __post_init__(self) -> None:
        number({"start": self.start}, "start", 0.1, 0.0, 1.0)
        number({"step": self.step}, "step", 0.05, 0.0, 1.0, low_open=True)
        number({"refine": self.refine}, "refine", 4, 0, 20, integer=True)
        number({"safety": self.safety}, "safety", 0.1, 0.0, 1.0)


@dataclass
class QRArt:
    """A picture that decodes to ``payload``, and how much of the code it needed."""

    image: Image.Image
    payload: str
    version: int
    contribution: float  # the code's share in the returned picture
    lowest_contribution: float  # the least share found that still decodes
    decoders: tuple[str, ...]
    art: Image.Image | None = None  # the art before the code was blended in
    attempts: list[tuple[float, bool]] = field(default_factory=list)

    @property
    def margin(self) -> float:
        """How far the contribution could be lowered from the returned one and still decode."""
        return round(self.contribution - self.lowest_contribution, 4)

    def infotext(self, method: str) -> dict[str, str]:
        return {
            "QR code": f"version {self.version}, error correction H",
            "QR method": method,
            "QR contribution": f"{self.contribution:.3f}",
            "QR margin": f"{self.margin:.3f}",
            "QR decoders": "+".join(self.decoders),
        }


def blend_weights(code: QRCode, size: int, contribution: float) -> np.ndarray:
    """Per-pixel weight of the code (0 = art, 1 = code) at ``contribution``."""
    index, offset = code.cell_map(size)
    inner = np.abs(offset - 0.5) <= CENTRE_FRACTION / 2
    centre = inner[:, None] & inner[None, :]
    strong = min(1.0, 2.0 * contribution)
    function = code.function[np.ix_(index, index)]
    return np.where(centre | function, strong, contribution**2).astype(np.float32)


def blend(art: np.ndarray, code: QRCode, contribution: float) -> np.ndarray:
    """Blend the code into ``art`` (float RGB in [0, 1], square) and return uint8 RGB."""
    size = art.shape[0]
    target = code.render(size)[..., None]
    weights = blend_weights(code, size, contribution)[..., None]
    mixed = art * (1.0 - weights) + target * weights
    return np.clip(np.round(mixed * 255), 0, 255).astype(np.uint8)


def repair(
    art: Image.Image,
    code: QRCode,
    *,
    settings: RepairSettings | None = None,
    decoders: tuple[str, ...] | None = None,
) -> QRArt:
    """Raise the code's contribution over ``art`` until the picture decodes (see the module doc)."""
    from PIL import Image

    settings = settings or RepairSettings()
    decoders = check_decoders(decoders)
    if art.width != art.height:
        raise InvalidParameter("image", f"{art.width}x{art.height}", "must be square for a QR code", "crop or resize it first")
    pixels = np.asarray(art.convert("RGB"), dtype=np.float32) / 255.0
    attempts: list[tuple[float, bool]] = []

    def ok(c: float) -> bool:
        good = decodes_to(blend(pixels, code, c), code.payload, decoders)
        attempts.append((round(c, 4), good))
        return good

    failed_below, lowest = None, None
    c = settings.start
    while True:
        if ok(c):
            lowest = c
            break
        failed_below = c
        if c >= 1.0:
            break
        c = min(1.0, c + settings.step)
    if lowest is None:
        raise QRUnreadable(
            f"the QR code for {code.payload!r} (version {code.version}, {code.size} modules) did not decode even "
            f"at full contribution in a {art.width}-px picture with decoders {', '.join(decoders)}; "
            "use a larger size, a shorter payload, or fewer decoders"
        )
    if failed_below is not None:
        lo, hi = failed_below, lowest
        for _ in range(settings.refine):
            mid = (lo + hi) / 2
            if ok(mid):
                hi = mid
            else:
                lo = mid
        lowest = hi
    chosen = min(1.0, lowest + settings.safety)
    while not ok(chosen):  # decoding is not strictly monotone in c: keep raising until it holds
        if chosen >= 1.0:
            chosen = lowest
            break
        chosen = min(1.0, chosen + settings.step)
    image = Image.fromarray(blend(pixels, code, chosen))
    return QRArt(image, code.payload, code.version, float(chosen), float(lowest), decoders, art.convert("RGB"), attempts)


# --- art -----------------------------------------------------------------------------------------


def code_init_image(code: QRCode, size: int, contrast: float = 0.7) -> Image.Image:
    """The code softened toward grey, as a starting picture for img2img (room for art)."""
    from PIL import Image

    grey = 0.5 + (code.render(size) - 0.5) * contrast
    return Image.fromarray(np.round(np.repeat(grey[..., None], 3, axis=2) * 255).astype(np.uint8))


def generate_art(
    pipe: Pipeline,
    code: QRCode,
    prompt: str,
    negative_prompt: str = "",
    *,
    size: int,
    denoising_strength: float = 0.75,
    controlnet: str | None = None,
    controlnet_weight: float = 1.3,
    **params: Any,
) -> tuple[Result, str]:
    """Art that follows the code: (the generation's Result, method). The Result's infotexts
    record the generation as it ran (the ControlNet unit, or the img2img strength)."""
    from PIL import Image

    code_image = Image.fromarray(np.round(np.repeat(code.render(size)[..., None], 3, axis=2) * 255).astype(np.uint8))
    if controlnet:
        from aipaint.plugin.adapters import AdapterUnit

        if "controlnet" not in pipe.host.registry.adapters:
            raise UnsupportedFeature(f"controlnet={controlnet!r} needs the ControlNet adapter plugin, which is not installed")
        unit = AdapterUnit("controlnet", {"model": controlnet, "image": code_image, "weight": controlnet_weight})
        result = pipe.txt2img(prompt, negative_prompt, width=size, height=size, adapters=(unit,), **params)
        return result, f"controlnet {controlnet}"
    from aipaint.plugin.kit.diffusion import img2img

    result = img2img(pipe, code_init_image(code, size), prompt, negative_prompt, what="QR-code art",
                     denoising_strength=denoising_strength, width=size, height=size, **params)
    return result, "img2img"


def qr_art(
    pipe: Pipeline,
    payload: str,
    prompt: str,
    negative_prompt: str = "",
    *,
    size: int | None = None,
    version: int | None = None,
    denoising_strength: float = 0.75,
    controlnet: str | None = "auto",
    repair_settings: RepairSettings | None = None,
    decoders: tuple[str, ...] | None = None,
    **params: Any,
) -> list[tuple[QRArt, str]]:
    """Generate QR-code art; every picture returned decodes to ``payload``.

    Returns one (QRArt, infotext) per image of the batch. ``size`` defaults to the
    model's default size; it must hold the code at ≥2 px per module. ``controlnet``:
    ``"auto"`` (default) draws with an installed ControlNet whose name contains "qr" and
    falls back to img2img when there is none (the PNG's ``QR method`` says which);
    ``None`` forces img2img; a name forces that ControlNet. Each infotext is the
    generation's own (with its ``ControlNet 0`` unit, or img2img's ``Denoising strength``)
    plus the ``QR …`` entries.
    """
    from aipaint.plugin.kit.diffusion import choose_controlnet
    from aipaint.plugin.postprocess import merge_infotext

    controlnet = choose_controlnet(pipe, controlnet, ("qr",))
    size = int(size or pipe.model.defaults.width)
    if size % 8:
        raise InvalidParameter("size", size, "must be a multiple of 8")
    code = make_code(payload, version=version, image_size=size)
    decoders = check_decoders(decoders)
    result, method = generate_art(pipe, code, prompt, negative_prompt, size=size,
                                  denoising_strength=denoising_strength, controlnet=controlnet, **params)
    out = []
    for image, text in zip(result.images, result.infotexts):
        art = repair(image, code, settings=repair_settings, decoders=decoders)
        out.append((art, merge_infotext(text, art.infotext(method))))
    return out


def carry_code(image: Image.Image, payload: str, *, version: int | None = None, repair_settings: RepairSettings | None = None,
               decoders: tuple[str, ...] | None = None) -> QRArt:
    """Blend a code into an existing picture (cropped to a centred square) and repair it."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.convert("RGB").crop((left, top, left + side, top + side))
    code = make_code(payload, version=version, image_size=side)
    return repair(square, code, settings=repair_settings, decoders=decoders)

