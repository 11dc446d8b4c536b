"""Helpers shared by the post-processing plugins: generation settings taken from a
request and from options, and the image modes they diffuse with.

The image modes (``Pipeline.img2img`` / ``Pipeline.inpaint``) belong to the core; a
pipeline without them gets a clear :class:`~aipaint.errors.UnsupportedFeature` rather than
a half-working substitute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aipaint.errors import InvalidParameter, UnsupportedFeature

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.pipeline import Pipeline
    from aipaint.api.result import Result

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


def number(options: Mapping[str, Any], name: str, default: float, lo: float, hi: float, *, integer: bool = False,
           low_open: bool = False) -> Any:
    """Read a numeric option and check its range; the error names the option and the range."""
    value = options.get(name, default)
    if value is None:
        value = default
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidParameter(name, value, f"must be a number from {lo} to {hi}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(name, value, f"must be a number from {lo} to {hi}")
    if integer:
        if not float(value).is_integer():
            raise InvalidParameter(name, value, f"must be a whole number from {lo} to {hi}")
        value = int(value)
    if (value <= lo if low_open else value < lo) or value > hi:
        bound = f"above {lo}" if low_open else f"from {lo}"
        raise InvalidParameter(name, value, f"must be {bound} to {hi}")
    return value


FLAG_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def flag(options: Mapping[str, Any], name: str, default: bool = False) -> bool:
    """Read a yes/no option: a bool, the number 1 or 0, or one of :data:`FLAG_WORDS` (any case).

    Anything else is an error rather than Python truthiness, so ``allow_pickle=no`` or a typo
    such as ``allow_pickle=nope`` can never switch a safety option on.
    """
    value = options.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in FLAG_WORDS:
        return FLAG_WORDS[value.strip().lower()]
    raise InvalidParameter(name, value, "must be true or false", "write true/false, yes/no or 1/0")


def parse_size(value: Any, name: str) -> tuple[int, int] | None:
    """``"1024x768"`` or ``(1024, 768)`` → (width, height); ``None``/empty → None."""
    if value in (None, "", 0):
        return None
    if isinstance(value, str):
        parts = value.lower().split("x")
        try:
            width, height = (int(p) for p in parts)
        except ValueError:
            raise InvalidParameter(name, value, "must be WIDTHxHEIGHT, e.g. 1024x768") from None
    else:
        try:
            width, height = (int(v) for v in value)
        except (TypeError, ValueError):
            raise InvalidParameter(name, value, "must be WIDTHxHEIGHT, e.g. 1024x768") from None
    if width < 8 or height < 8:
        raise InvalidParameter(name, value, "must be at least 8x8")
    return width, height


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
    try:
        from aipaint_plugins.controlnet.models import folder_models, zoo_controlnets
    except ImportError:
        return None
    local = [cid for cid, card in zoo_controlnets().items() if card.source.get("kind") in ("embedded", "local")]
    for name in sorted(local) + sorted(folder_models()):
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
