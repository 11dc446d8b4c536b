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
from aipaint.api.request import SIZE_RANGE, STEPS_RANGE, GenerationRequest, check_range
from aipaint.errors import ImageError, InvalidParameter
from aipaint.prompt.styles import PromptStyle, apply_styles

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
            "mask", "restore_faces"}
# txt2img's hires fix (read by _hires; acted on when enable_hr is true, as in A1111).
_HIRES_FIELDS = {"enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
                 "hr_prompt", "hr_negative_prompt", "hr_sampler_name", "hr_scheduler", "hr_checkpoint_name",
                 "denoising_strength", "firstphase_width", "firstphase_height"}
HIRES_SCALE_RANGE = (1.0, 8.0)  # the hires post-processor's
HIRES_DEFAULT_STRENGTH = 0.7  # A1111's txt2img default for the second pass
_SAME = ("", "use same sampler", "use same scheduler", "use same checkpoint")  # A1111's "no change" choices
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
    hires: dict[str, Any] | None = None  # the "hires" post-processor's options, when enable_hr
    hires_checkpoint: str | None = None  # hr_checkpoint_name, when it names one
    restore_faces: bool = False  # run the "facefix" post-processor on each image


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
            for key in ("weight", "guidance_start", "guidance_end", "control_mode", "resize_mode",
                        "union_control_type"):
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


def _text(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidParameter(name, value, "must be a string")
    return value


def _number(body: Mapping[str, Any], name: str, default: Any, lo: float, hi: float, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return default
    check_range(name, value, lo, hi, kind)
    return value


def _hires(body: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None, list[str]]:
    """txt2img's hires fix as the ``hires`` post-processor's options (None unless ``enable_hr``),
    the checkpoint ``hr_checkpoint_name`` names (None: the same), and the fields not acted on."""
    if not _flag(body, "enable_hr", False):
        return None, None, []
    options: dict[str, Any] = {}
    ignored: list[str] = []
    resize = [_number(body, name, 0, 0, SIZE_RANGE[1], int) for name in ("hr_resize_x", "hr_resize_y")]
    if any(resize):
        options["resize"] = tuple(resize)  # the app turns this into a size once the base size is known
    else:
        options["scale"] = _number(body, "hr_scale", 2.0, *HIRES_SCALE_RANGE, float)
    upscaler = _text(body, "hr_upscaler")
    options["upscaler"] = upscaler if upscaler and upscaler.strip() else "Latent"  # A1111's default
    options["hires_steps"] = _number(body, "hr_second_pass_steps", 0, 0, STEPS_RANGE[1], int)
    strength = _number(body, "denoising_strength", HIRES_DEFAULT_STRENGTH, 0.0, 1.0, float)
    if strength == 0:
        raise InvalidParameter("denoising_strength", strength, "must be above 0 for hires fix (its second pass "
                                                               "would change nothing)")
    options["denoising_strength"] = strength
    for field_name, option in (("hr_prompt", "hires_prompt"), ("hr_negative_prompt", "hires_negative_prompt")):
        text = _text(body, field_name)
        if text:  # A1111: empty means "the first pass's"
            options[option] = text
    sampler = _text(body, "hr_sampler_name")
    if sampler and sampler.strip().lower() not in _SAME:
        options["hires_sampler"] = sampler.strip()
    scheduler = _text(body, "hr_scheduler")
    if scheduler and scheduler.strip().lower() not in _SAME + ("automatic",):
        ignored.append("hr_scheduler")
    checkpoint = _text(body, "hr_checkpoint_name")
    checkpoint = None if checkpoint is None or checkpoint.strip().lower() in _SAME else model_name(checkpoint)
    ignored += [name for name in ("firstphase_width", "firstphase_height") if body.get(name)]
    return options, checkpoint, ignored


def hires_size(width: int, height: int, options: Mapping[str, Any]) -> tuple[int, int]:
    """The size of a hires picture from a ``width`` x ``height`` first pass: ``hr_resize_x/y``
    (one of them 0: the other from the first pass's aspect, as A1111 computes it) or
    ``hr_scale``; rounded down to a multiple of 8, as the hires post-processor rounds it."""
    if "resize" in options:
        x, y = options["resize"]
        if not y:
            x, y = x, x * height // width
        elif not x:
            x, y = y * width // height, y
    else:
        x, y = int(width * options["scale"]), int(height * options["scale"])
    return max(8, x - x % 8), max(8, y - y % 8)


def build_job(body: Any, kind: str, *, request_options: Mapping[str, Any] | None = None,
              styles: Mapping[str, PromptStyle] | None = None,
              api_fields: Mapping[str, tuple[str, str, Any]] | None = None) -> Job:
    """The :class:`Job` an A1111 ``txt2img`` or ``img2img`` body describes (``kind``). Every
    value is checked here, before the job waits in the queue; ``styles`` are the saved
    prompt styles a body's ``styles`` may name. ``api_fields``: body fields that plugins' option
    groups read (``OptionGroup.api_fields``: key → (namespace, field, the API's unset value))."""
    if not isinstance(body, Mapping):
        raise InvalidParameter("body", body, "must be a JSON object")
    api_fields = api_fields or {}
    known = set(_DIRECT) | _HANDLED | (set(_IMG2IMG_DIRECT) if kind == "img2img" else _HIRES_FIELDS) | set(api_fields)
    plugin_options: dict[str, dict[str, Any]] = {}
    for key, (namespace, name, unset) in api_fields.items():
        value = body.get(key)
        if value is not None and value != unset:
            plugin_options.setdefault(namespace, {})[name] = value
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
    names = body.get("styles") or []
    if not isinstance(names, list):
        raise InvalidParameter("styles", names, "must be a list of style names")
    hires, hires_checkpoint, hires_ignored = _hires(body) if kind == "txt2img" else (None, None, [])
    ignored += hires_ignored
    if names:  # A1111's saved prompt styles (aipaint serve --styles), applied in order
        prompt, negative = fields.get("prompt", ""), fields.get("negative_prompt", "")
        for name in ("prompt", "negative_prompt"):
            if not isinstance(fields.get(name, ""), str):
                raise InvalidParameter(name, fields[name], "must be a string")
        fields["prompt"], fields["negative_prompt"] = apply_styles(prompt, negative, names, styles or {})
        if hires is not None and ("hires_prompt" in hires or "hires_negative_prompt" in hires):
            # A1111 styles the hires prompts too (an empty one is the first pass's, styled above)
            styled = apply_styles(hires.get("hires_prompt", ""), hires.get("hires_negative_prompt", ""), names, styles or {})
            for option, text in zip(("hires_prompt", "hires_negative_prompt"), styled):
                if option in hires:
                    hires[option] = text
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
    options = dict(request_options or {})
    for namespace, values in plugin_options.items():
        options[namespace] = {**options.get(namespace, {}), **values}
    request = GenerationRequest(adapters=units, options=options, **fields)
    return Job(request, n_iter, _flag(body, "send_images", True), _flag(body, "save_images", False), ignored, checkpoint,
               hires, hires_checkpoint, _flag(body, "restore_faces", False))


# --- extras: /extra-single-image and /extra-batch-images ------------------------------------------
EXTRAS_SCALE_MAX = 16.0  # the upscale post-processor's largest factor
_EXTRAS_FIELDS = {"image", "imageList", "resize_mode", "upscaling_resize", "upscaling_resize_w", "upscaling_resize_h",
                  "upscaling_crop", "upscaler_1", "upscaler_2", "extras_upscaler_2_visibility", "gfpgan_visibility",
                  "codeformer_visibility", "codeformer_weight", "show_extras_results", "upscale_first"}


@dataclass
class ExtrasJob:
    """One A1111 extras call: its images (name, picture), the upscale and the face restoration."""

    images: list[tuple[str, Image.Image]]
    resize_mode: int = 0  # 0: by ``scale``; 1: to ``size`` (cropped to it when ``crop``)
    scale: float = 2.0
    size: tuple[int, int] = (512, 512)
    crop: bool = True
    upscaler_1: str | None = None  # None: no upscaling (A1111's "None")
    upscaler_2: str | None = None
    upscaler_2_visibility: float = 0.0
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    ignored: list[str] = field(default_factory=list)

    def upscaled_size(self, width: int, height: int) -> tuple[int, int]:
        """What the upscalers make of a ``width`` x ``height`` image (before a crop): A1111's
        factor, ``upscaling_resize`` or the one that covers ``upscaling_resize_w/h``."""
        if self.resize_mode == 0:
            return max(1, round(width * self.scale)), max(1, round(height * self.scale))
        by = max(self.size[0] / width, self.size[1] / height)
        return max(self.size[0], round(width * by)), max(self.size[1], round(height * by))

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        if self.upscaler_1 is None:
            return width, height
        return self.size if self.resize_mode == 1 and self.crop else self.upscaled_size(width, height)


def _upscaler_field(body: Mapping[str, Any], name: str) -> str | None:
    value = _text(body, name)
    if value is None or not value.strip() or value.strip().lower() == "none":
        return None
    return value.strip()


def build_extras(body: Any, batch: bool) -> ExtrasJob:
    """The :class:`ExtrasJob` of an ``extra-single-image`` (``batch`` False) or
    ``extra-batch-images`` body, every value checked; upscaler and face-restorer names are
    checked by the server, which knows the installed ones."""
    if not isinstance(body, Mapping):
        raise InvalidParameter("body", body, "must be a JSON object")
    if batch:
        items = body.get("imageList")
        if not isinstance(items, list) or not items:
            raise InvalidParameter("imageList", items, 'must be a list of {"data": base64 image, "name": ...}')
        images = []
        for index, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise InvalidParameter(f"imageList[{index}]", item, 'must be {"data": base64 image, "name": ...}')
            name = item.get("name")
            if name is not None and not isinstance(name, str):
                raise InvalidParameter(f"imageList[{index}].name", name, "must be a string")
            images.append((name or f"image{index + 1:05}", decode_image(item.get("data"), f"imageList[{index}].data")))
    else:
        images = [("image", decode_image(body.get("image"), "image"))]
    mode = body.get("resize_mode", 0)
    if mode is None:
        mode = 0
    if isinstance(mode, bool) or mode not in (0, 1):
        raise InvalidParameter("resize_mode", mode, "must be 0 (scale by upscaling_resize) or 1 (scale to "
                                                    "upscaling_resize_w x upscaling_resize_h)")
    job = ExtrasJob(images, mode, crop=_flag(body, "upscaling_crop", True))
    job.upscaler_1, job.upscaler_2 = _upscaler_field(body, "upscaler_1"), _upscaler_field(body, "upscaler_2")
    if mode == 0:
        job.scale = _number(body, "upscaling_resize", 2.0, 0.0, EXTRAS_SCALE_MAX, float)
        if job.scale <= 0:
            raise InvalidParameter("upscaling_resize", job.scale, f"must be above 0 to {EXTRAS_SCALE_MAX:g}")
    else:
        job.size = (_number(body, "upscaling_resize_w", 512, 1, SIZE_RANGE[1] * 4, int),
                    _number(body, "upscaling_resize_h", 512, 1, SIZE_RANGE[1] * 4, int))
    job.upscaler_2_visibility = _number(body, "extras_upscaler_2_visibility", 0.0, 0.0, 1.0, float)
    job.gfpgan_visibility = _number(body, "gfpgan_visibility", 0.0, 0.0, 1.0, float)
    job.codeformer_visibility = _number(body, "codeformer_visibility", 0.0, 0.0, 1.0, float)
    _number(body, "codeformer_weight", 0.0, 0.0, 1.0, float)
    if job.codeformer_visibility and body.get("codeformer_weight") is not None:
        job.ignored.append("codeformer_weight")  # aipaint's face restoration has no fidelity knob
    if _flag(body, "upscale_first", False):
        job.ignored.append("upscale_first")  # the order is fixed: upscale, then restore faces (as A1111 1.x)
    if job.upscaler_1 is not None:
        for name, image in images:
            imageutil.check_pixels(f"upscaled size of {name!r}", *job.upscaled_size(*image.size))
    job.ignored += sorted(k for k in body if k not in _EXTRAS_FIELDS)
    return job


def html_info(lines: list[str], ignored: list[str]) -> str:
    """A1111's ``html_info``: the processing text as HTML paragraphs (its ``plaintext_to_html``)."""
    from html import escape

    text = "<br>\n".join(escape(line) for line in dict.fromkeys(lines) if line)
    out = f"<p>{text}</p>"
    if ignored:
        out += f"<p>ignored fields: {escape(', '.join(ignored))}</p>"
    return out


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
        "denoising_strength": request.denoising_strength if job.hires is None else job.hires["denoising_strength"],
        "infotexts": infotexts,
        "ignored_fields": job.ignored,
    })
