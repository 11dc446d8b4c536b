"""A1111 web UI API JSON ⇄ aipaint: requests in, responses out.

One place turns a ``/sdapi/v1/txt2img`` or ``/img2img`` body into a
:class:`aipaint.api.request.GenerationRequest` (which validates every value once), and a
:class:`aipaint.api.result.Result` back into A1111's response (base64 PNGs, ``parameters``,
``info`` as a JSON string). Images are decoded through :mod:`aipaint.imageutil`, which
refuses decompression bombs before decoding. Fields A1111 has but aipaint does not act on
are accepted, as A1111 accepts unknown fields, and named in the response's ``info``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from aipaint import imageutil
from aipaint.api.request import GenerationRequest
from aipaint.errors import ImageError, InvalidParameter

MAX_N_ITER = 100  # A1111's "Batch count" slider
MAX_BASE64_CHARS = 64 * 2**20  # one image; the body limit usually says no first
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,10}\]$")  # A1111 writes "name [abcdef12]"

# A1111 body fields → request fields, taken as they are.
_DIRECT = ("prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "batch_size", "subseed",
           "subseed_strength", "seed_resize_from_w", "seed_resize_from_h")
_IMG2IMG_DIRECT = ("denoising_strength", "mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
                   "inpainting_mask_invert", "resize_mode")
# Fields read elsewhere (the job, the response) or by name below.
_HANDLED = {"sampler_name", "sampler_index", "scheduler", "n_iter", "styles", "override_settings",
            "override_settings_restore_afterwards", "send_images", "save_images", "alwayson_scripts", "init_images",
            "mask"}
# A1111 defaults where they differ from "the model's".
_A1111_DEFAULTS = {"prompt": "", "seed": -1, "batch_size": 1, "subseed": -1, "subseed_strength": 0.0,
                   "seed_resize_from_w": -1, "seed_resize_from_h": -1}
_OVERRIDES = {"CLIP_stop_at_last_layers": "clip_skip"}


@dataclass
class Job:
    """One A1111 generation call: its request, how many times to run it, and what the response carries."""

    request: GenerationRequest
    n_iter: int = 1
    send_images: bool = True
    save_images: bool = False
    ignored: list[str] = field(default_factory=list)
    checkpoint: str | None = None  # override_settings.sd_model_checkpoint


class _Named(io.BytesIO):
    # imageutil names the file in its errors; this names the JSON field instead of a BytesIO repr.
    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


def decode_image(value: Any, what: str) -> Image.Image:
    """A base64 (or ``data:image/...;base64,``) image; bad base64, a non-image and a
    decompression bomb are :class:`aipaint.errors.ImageError` naming ``what``."""
    if not isinstance(value, str):
        raise InvalidParameter(what, value, "must be a base64-encoded image")
    if len(value) > MAX_BASE64_CHARS:
        raise InvalidParameter(what, f"<{len(value)} characters>", f"must be at most {MAX_BASE64_CHARS} characters")
    text = _DATA_URL.sub("", value.strip(), count=1)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"cannot read {what}: it is not valid base64 ({exc})") from exc
    return imageutil.read_image_file(_Named(data, what), "the image")


def encode_image(image: Image.Image, parameters: str | None = None) -> str:
    """A PNG as base64, with A1111's ``parameters`` text chunk when given."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if parameters:
        info = PngInfo()
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidParameter(name, value, "must be true or false")
    return value


def model_name(name: Any) -> str:
    """A checkpoint or ControlNet name as A1111 writes it, without its ``[hash]``."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidParameter("model", name, "must be a non-empty name")
    return _HASH_SUFFIX.sub("", name.strip())


def _sampler(body: Mapping[str, Any]) -> tuple[str | None, str | None]:
    sampler = body.get("sampler_name") or body.get("sampler_index") or None
    scheduler = body.get("scheduler") or None
    if isinstance(scheduler, str) and scheduler.strip().lower() == "automatic":
        scheduler = None
    return sampler, scheduler


def _controlnet_units(scripts: Any) -> tuple[tuple[Any, ...], list[str]]:
    """The ControlNet extension's units (``{"controlnet": {"args": [...]}}``, title in any case)."""
    from aipaint.plugin.adapters import AdapterUnit

    if scripts is None:
        return (), []
    if not isinstance(scripts, Mapping):
        raise InvalidParameter("alwayson_scripts", scripts, "must be an object of script title → {\"args\": [...]}")
    units: list[Any] = []
    ignored: list[str] = []
    for title, script in scripts.items():
        if str(title).strip().lower() != "controlnet":
            ignored.append(f"alwayson_scripts.{title}")
            continue
        args = script.get("args", []) if isinstance(script, Mapping) else None
        if not isinstance(args, list):
            raise InvalidParameter("alwayson_scripts.controlnet.args", args, "must be a list of ControlNet units")
        for index, unit in enumerate(args):
            if not isinstance(unit, Mapping):
                raise InvalidParameter(f"ControlNet {index}", unit, "must be an object")
            if not unit.get("enabled", True):
                continue
            options: dict[str, Any] = {"model": model_name(unit.get("model"))}
            module = unit.get("module")
            if module and str(module).lower() != "none":
                options["preprocessor"] = module
            for key in ("weight", "guidance_start", "guidance_end", "control_mode", "resize_mode"):
                if unit.get(key) is not None:
                    options[key] = unit[key]
            image, mask = unit.get("image") or unit.get("input_image"), unit.get("mask")
            if isinstance(image, Mapping):  # the extension's {"image": ..., "mask": ...} form
                image, mask = image.get("image"), image.get("mask") or mask
            if mask:
                options["mask"] = decode_image(mask, f"ControlNet {index} mask")
            if image:
                options["image"] = decode_image(image, f"ControlNet {index} image")
            units.append(AdapterUnit("controlnet", options))
    return tuple(units), ignored


def build_job(body: Any, kind: str, *, request_options: Mapping[str, Any] | None = None) -> Job:
    """The :class:`Job` an A1111 ``txt2img`` or ``img2img`` body describes (``kind``). Every
    value is checked here, before the job waits in the queue."""
    if not isinstance(body, Mapping):
        raise InvalidParameter("body", body, "must be a JSON object")
    known = set(_DIRECT) | _HANDLED | (set(_IMG2IMG_DIRECT) if kind == "img2img" else set())
    fields: dict[str, Any] = {}
    for name in _DIRECT + (_IMG2IMG_DIRECT if kind == "img2img" else ()):
        value = body.get(name)
        if value is None or value == _A1111_DEFAULTS.get(name, object()):
            continue
        fields[name] = value
    for name in ("inpainting_mask_invert", "inpaint_full_res"):  # A1111 numbers these 0 and 1
        if fields.get(name) in (0, 1) and not isinstance(fields[name], bool):
            fields[name] = bool(fields[name])
    fields["sampler"], fields["schedule"] = _sampler(body)
    ignored = sorted(k for k in body if k not in known)
    styles = body.get("styles") or []
    if not isinstance(styles, list):
        raise InvalidParameter("styles", styles, "must be a list of style names")
    if styles:  # A1111's saved prompt styles live in its styles.csv; the server has none, and says so
        ignored.append("styles")
    checkpoint = None
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, Mapping):
        raise InvalidParameter("override_settings", overrides, "must be an object of setting → value")
    for key, value in overrides.items():
        if key == "sd_model_checkpoint":
            checkpoint = model_name(value)
        elif key in _OVERRIDES:
            fields[_OVERRIDES[key]] = value
        else:
            ignored.append(f"override_settings.{key}")
    units, ignored_scripts = _controlnet_units(body.get("alwayson_scripts"))
    ignored += ignored_scripts
    if kind == "img2img":
        images = body.get("init_images")
        if not isinstance(images, list) or not images:
            raise InvalidParameter("init_images", images, "must be a list of one base64-encoded image")
        fields["init_image"] = decode_image(images[0], "init_images[0]")
        if body.get("mask"):
            fields["mask"] = decode_image(body["mask"], "mask")
    n_iter = body.get("n_iter", 1)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or not 1 <= n_iter <= MAX_N_ITER:
        raise InvalidParameter("n_iter", n_iter, f"must be an integer from 1 to {MAX_N_ITER}")
    request = GenerationRequest(adapters=units, options=dict(request_options or {}), **fields)
    return Job(request, n_iter, _flag(body, "send_images", True), _flag(body, "save_images", False), ignored, checkpoint)


def parameters(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``parameters`` of a response: the body as given, images left out as A1111 does (it
    echoes them; they are the bulk of the response and the caller has them)."""
    return {k: (None if k in ("init_images", "mask") else v) for k, v in body.items()}


def info(job: Job, results: list[Any]) -> str:
    """A1111's ``info``: a JSON string with the infotexts, seeds and the job's settings."""
    infotexts = [text for result in results for text in result.infotexts]
    seeds = [seed for result in results for seed in result.seeds]
    request = results[0].request if results else job.request
    return json.dumps({
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * len(seeds),
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * len(seeds),
        "seed": seeds[0] if seeds else request.seed,
        "all_seeds": seeds,
        "subseed": request.subseed,
        "subseed_strength": request.subseed_strength,
        "width": request.width,
        "height": request.height,
        "sampler_name": request.sampler,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "n_iter": job.n_iter,
        "clip_skip": request.clip_skip,
        "denoising_strength": request.denoising_strength,
        "infotexts": infotexts,
        "ignored_fields": job.ignored,
    })
