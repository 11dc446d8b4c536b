"""What post-processors that diffuse an image again share (face fix, hires fix, SD upscale,
QR-code art, line-art colouring): generation settings taken from a request and from
options, the image modes they diffuse with, input images, and an installed ControlNet.

The image modes (``Pipeline.img2img`` / ``Pipeline.inpaint``) belong to the core; a
pipeline without them gets a clear :class:`~aipaint.errors.UnsupportedFeature` rather than
a half-working substitute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.plugin.kit.folders import controlnet_dir, model_entries

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.api.result import Result
    from aipaint.pipeline import Pipeline

GENERATION_OPTIONS = ("prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "seed", "clip_skip")
REQUEST_FIELDS = ("steps", "cfg_scale", "sampler", "schedule", "seed", "clip_skip", "guidance_rescale", "emphasis")


def generation_settings(options: Mapping[str, Any], request: Any = None, *, what: str) -> tuple[str, str, dict[str, Any]]:
    """(prompt, negative prompt, other request fields): the request's, overridden by options.

    A processor run after a generation reuses that generation's prompt and seed; run on a
    bare image it needs a ``prompt`` option.
    """
    prompt = options.get("prompt")
    negative = options.get("negative_prompt")
    params: dict[str, Any] = {}
    if request is not None:
        prompt = request.prompt if prompt is None else prompt
        negative = request.negative_prompt if negative is None else negative
        params = {name: getattr(request, name) for name in REQUEST_FIELDS if getattr(request, name, None) is not None}
    if prompt is None:
        raise InvalidParameter("prompt", None, f"{what} diffuses the image again and needs a prompt",
                               "pass prompt=... (or run it in a chain after a generation)")
    for name in REQUEST_FIELDS:
        if options.get(name) is not None:
            params[name] = options[name]
    return str(prompt), str(negative or ""), params


def require_mode(pipe: Pipeline, mode: str, what: str) -> Any:
    """``pipe.img2img`` or ``pipe.inpaint``, or an error naming what needs it."""
    method = getattr(pipe, mode, None)
    if method is None:
        raise UnsupportedFeature(f"{what} needs the pipeline's {mode} mode, which this pipeline ({type(pipe).__name__}) lacks")
    return method


def img2img(pipe: Pipeline, image: Image.Image, prompt: str, negative_prompt: str, *, what: str,
            denoising_strength: float, **params: Any) -> Result:
    return require_mode(pipe, "img2img", what)(image, prompt, negative_prompt, denoising_strength=denoising_strength, **params)


def inpaint(pipe: Pipeline, image: Image.Image, mask: Image.Image, prompt: str, negative_prompt: str, *, what: str,
            denoising_strength: float, **params: Any) -> Result:
    return require_mode(pipe, "inpaint", what)(image, mask, prompt, negative_prompt, denoising_strength=denoising_strength, **params)


def open_image(path: str) -> Image.Image:
    """Open an image file as RGB, with an error that names the file (also for a decompression bomb)."""
    from aipaint.imageutil import read_image_file

    return read_image_file(path, "image").convert("RGB")


def installed_controlnet(pipe: Pipeline, keywords: tuple[str, ...]) -> str | None:
    """The first installed ControlNet whose name contains one of ``keywords`` (``"qr"``,
    ``"lineart"``), when the ControlNet adapter is registered; else None.

    "Installed" means present on disk: files in the ControlNet folder, or zoo cards whose
    weights ship locally — a hub card is not picked, since it would need a download.
    """
    registry = getattr(getattr(pipe, "host", None), "registry", None)
    if registry is None or "controlnet" not in registry.adapters:
        return None
    from aipaint.models import zoo

    local = [card.id for card in zoo.cards() if card.family == "controlnet" and card.source.get("kind") in ("embedded", "local")]
    for name in sorted(local) + sorted(model_entries(controlnet_dir())):
        if any(keyword in name.lower() for keyword in keywords):
            return name
    return None


def choose_controlnet(pipe: Pipeline, controlnet: str | None, keywords: tuple[str, ...]) -> str | None:
    """``"auto"``: an installed ControlNet matching ``keywords`` or None (img2img);
    ``None``/``"none"``: no ControlNet; anything else: that model."""
    if controlnet is None or str(controlnet).lower() in ("", "none", "off"):
        return None
    if str(controlnet).lower() == "auto":
        return installed_controlnet(pipe, keywords)
    return str(controlnet)
