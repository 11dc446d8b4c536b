"""The generation request: one frozen dataclass, validated once.

Fields left as ``None`` take the loaded model's defaults (its zoo card), so the same
request works for a 32-pixel toy model and for SDXL. Ranges follow the AUTOMATIC1111
web UI.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from aipaint.api.options import G, normalise_options, option_group, resolve_options
from aipaint.errors import InvalidParameter
from aipaint.imageutil import OUTPAINT_FILLS

MAX_SEED = 2**32 - 1
SIZE_RANGE = (16, 4096)
STEPS_RANGE = (1, 1000)
CFG_RANGE = (1.0, 30.0)
BATCH_RANGE = (1, 64)
MAX_IMAGE_PROMPTS = 5
CLIP_SKIP_RANGE = (1, 12)
MAX_PROMPT_CHARS = 20_000  # for memory and readable errors: the parsers are linear (benchmarks/parsers.py)
NORMALIZATIONS = ("a1111", "none")
MASK_BLUR_RANGE = (0, 64)
PADDING_RANGE = (0, 256)
INPAINT_FILLS = ("fill", "original", "latent noise", "latent nothing")
"""A1111's "Masked content" choices, in its order (``inpainting_fill`` 0–3)."""
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")
"""A1111's img2img resize modes, in its order (``resize_mode`` 0–2)."""
OUTPAINT_SIDES = ("outpaint_left", "outpaint_top", "outpaint_right", "outpaint_bottom")
"""The request fields that say how far outpainting extends the image on each side."""


def _check_range(name: str, value: Any, lo: float, hi: float, kind: type) -> None:
    # Integer fields take ints only: a float such as 2.0 would pass here and fail later in torch or range().
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        raise InvalidParameter(name, value, f"must be {'an integer' if kind is int else 'a number'} from {lo} to {hi}")
    if not lo <= value <= hi:
        raise InvalidParameter(name, value, f"must be from {lo} to {hi}")


def check_range(name: str, value: Any, lo: float, hi: float, kind: type = int) -> None:
    """:class:`InvalidParameter` naming ``name`` unless ``value`` is an integer (``kind=int``) or a
    number (``kind=float``) from ``lo`` to ``hi``: the core's range check, for plugins' options."""
    _check_range(name, value, lo, hi, kind)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """A choice by name (any case) or by its index in ``choices``, as A1111's API numbers them."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return choices[value]
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise InvalidParameter(name, value, "must be one of " + ", ".join(repr(c) for c in choices))


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides an image. ``None`` means "the model's default"."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    schedule: str | None = None
    seed: int = -1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    clip_skip: int = 1
    guidance_rescale: float | None = None
    skip_early_cfg: float = 0.0  # A1111's "Ignore negative prompt during early sampling" (0-1)
    emphasis: str | None = None  # "a1111" (A1111's "Original") or "none" ("No norm"); None: the model's
    adapters: tuple[Any, ...] = ()
    # Plugins' typed option groups (see aipaint.api.options): option groups, or mappings by
    # namespace that Pipeline.generate turns into them ({"sdxl": {"aesthetic_score": 6}}).
    options: Any = None
    # The one security opt-in: load pickle-based files (.ckpt/.pt/.bin) that this job names
    # (LoRAs, embeddings, ControlNets, upscalers), through torch.load(weights_only=True) only.
    allow_pickle: bool = False
    # Image prompts (unCLIP): one image asks for variations of it, 2-5 for a blend, mixed by
    # ``image_prompt_weights`` (equal when empty). Stored loaded, as RGB images.
    image_prompts: tuple[Any, ...] = ()
    image_prompt_weights: tuple[float, ...] = ()
    # A1111's refiner: a second loaded model (Pipeline or model) that takes over the loop at
    # the first step past ``refiner_switch_at`` of the noise schedule.
    refiner: Any = None
    refiner_switch_at: float = 0.8
    # Image-conditioned modes (A1111's img2img tab; see aipaint.engine.modes). ``init_image``
    # and ``mask`` accept a PIL image, numpy array or path and are stored loaded: the image
    # as RGB, the mask as a binary ``L`` image (see aipaint.imageutil for the threshold).
    # ``None`` strength and blur take the mode's default (0.75 and 4; outpainting 1.0 and 8).
    init_image: Any = None
    denoising_strength: float | None = None
    resize_mode: str = "just resize"
    img2img_exact_steps: bool = False  # A1111's "do exactly the amount of steps the slider specifies"
    mask: Any = None
    mask_blur: int | None = None
    inpainting_mask_invert: bool = False
    inpainting_fill: str = "original"
    inpaint_full_res: bool = False  # "Inpaint area: Only masked"
    inpaint_full_res_padding: int = 32
    # Outpainting (see aipaint.engine.modes.outpaint): with an ``init_image``, any side above 0
    # makes the request an outpainting one; the image is extended by these pixels and
    # ``outpaint_fill`` starts the new area.
    outpaint_left: int = 0
    outpaint_top: int = 0
    outpaint_right: int = 0
    outpaint_bottom: int = 0
    outpaint_fill: str = "edge"
    # A1111's seed extras (see aipaint.engine.noise): variation seed (-1 = random) and strength,
    # and "resize seed from" width/height (0 = off).
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise InvalidParameter("prompt", self.prompt, "must be a string")
        if not isinstance(self.negative_prompt, str):
            raise InvalidParameter("negative_prompt", self.negative_prompt, "must be a string")
        for name in ("prompt", "negative_prompt"):
            length = len(getattr(self, name))
            if length > MAX_PROMPT_CHARS:
                raise InvalidParameter(name, f"<{length} characters>", f"must be at most {MAX_PROMPT_CHARS} characters")
        if self.steps is not None:
            _check_range("steps", self.steps, *STEPS_RANGE, int)
        if self.cfg_scale is not None:
            _check_range("cfg_scale", self.cfg_scale, *CFG_RANGE, float)
        if self.guidance_rescale is not None:
            _check_range("guidance_rescale", self.guidance_rescale, 0.0, 1.0, float)
        _check_range("skip_early_cfg", self.skip_early_cfg, 0.0, 1.0, float)
        _check_range("seed", self.seed, -1, MAX_SEED, int)
        _check_range("batch_size", self.batch_size, *BATCH_RANGE, int)
        _check_range("clip_skip", self.clip_skip, *CLIP_SKIP_RANGE, int)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_range(name, value, *SIZE_RANGE, int)
            if value % 8:
                lower, upper = value - value % 8, value - value % 8 + 8
                raise InvalidParameter(name, value, "must be a multiple of 8", f"try {lower} or {upper}")
        if self.width is not None and self.height is not None:
            from aipaint.imageutil import check_pixels

            check_pixels("width x height", self.width, self.height)  # $AIPAINT_MAX_PIXELS may be set below 4096x4096
        if isinstance(self.refiner_switch_at, bool) or not isinstance(self.refiner_switch_at, (int, float)) or not (
            0.0 < self.refiner_switch_at <= 1.0
        ):
            raise InvalidParameter("refiner_switch_at", self.refiner_switch_at, "must be a number above 0 and at most 1",
                                   "the fraction of the noise schedule the main model runs before the refiner")
        self._check_image_fields()
        self._check_image_prompts()
        object.__setattr__(self, "options", normalise_options(self.options))
        if not isinstance(self.allow_pickle, bool):
            raise InvalidParameter("allow_pickle", self.allow_pickle, "must be True or False")
        if self.emphasis is not None and self.emphasis not in NORMALIZATIONS:
            raise InvalidParameter("emphasis", self.emphasis, f"must be one of {', '.join(NORMALIZATIONS)}")
        for name in ("sampler", "schedule"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidParameter(name, value, "must be a non-empty name")

    def _check_image_fields(self) -> None:
        if self.denoising_strength is not None:
            _check_range("denoising_strength", self.denoising_strength, 0.0, 1.0, float)
        if self.mask_blur is not None:
            _check_range("mask_blur", self.mask_blur, *MASK_BLUR_RANGE, int)
        _check_range("inpaint_full_res_padding", self.inpaint_full_res_padding, *PADDING_RANGE, int)
        _check_range("subseed", self.subseed, -1, MAX_SEED, int)
        _check_range("subseed_strength", self.subseed_strength, 0.0, 1.0, float)
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            value = getattr(self, name)
            _check_range(name, value, -1, SIZE_RANGE[1], int)
            if 0 < value < SIZE_RANGE[0]:
                raise InvalidParameter(name, value, f"must be 0 (off) or from {SIZE_RANGE[0]} to {SIZE_RANGE[1]}")
        for name in ("img2img_exact_steps", "inpainting_mask_invert", "inpaint_full_res"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameter(name, getattr(self, name), "must be True or False")
        object.__setattr__(self, "inpainting_fill", _choice("inpainting_fill", self.inpainting_fill, INPAINT_FILLS))
        object.__setattr__(self, "resize_mode", _choice("resize_mode", self.resize_mode, RESIZE_MODES))
        for name in OUTPAINT_SIDES:
            _check_range(name, getattr(self, name), 0, SIZE_RANGE[1], int)
        object.__setattr__(self, "outpaint_fill", _choice("outpaint_fill", self.outpaint_fill, OUTPAINT_FILLS))
        if self.init_image is None and self.mask is None:
            return
        from aipaint import imageutil

        if self.init_image is None:
            raise InvalidParameter("mask", "<mask>", "needs an init_image to inpaint", "pass the image the mask belongs to")
        object.__setattr__(self, "init_image", imageutil.load_image(self.init_image))
        if self.mask is not None:
            mask = imageutil.load_mask(self.mask)
            imageutil.check_mask(imageutil.invert_mask(mask) if self.inpainting_mask_invert else mask, self.init_image.size)
            object.__setattr__(self, "mask", mask)

    def _check_image_prompts(self) -> None:
        if not isinstance(self.image_prompts, (tuple, list)):
            raise InvalidParameter("image_prompts", self.image_prompts, "must be a list of images")
        if not isinstance(self.image_prompt_weights, (tuple, list)):
            raise InvalidParameter("image_prompt_weights", self.image_prompt_weights, "must be a list of numbers")
        if not self.image_prompts:
            if self.image_prompt_weights:
                raise InvalidParameter("image_prompt_weights", self.image_prompt_weights, "needs image_prompts to weigh")
            return
        if len(self.image_prompts) > MAX_IMAGE_PROMPTS:
            raise InvalidParameter("image_prompts", f"<{len(self.image_prompts)} images>",
                                   f"must be 1 (variations) to {MAX_IMAGE_PROMPTS} (a blend) images")
        if self.init_image is not None:
            raise InvalidParameter("image_prompts", f"<{len(self.image_prompts)} images>",
                                   "cannot be combined with init_image (img2img/inpaint)")
        from aipaint import imageutil

        images = tuple(imageutil.load_image(image, what="image prompt") for image in self.image_prompts)
        object.__setattr__(self, "image_prompts", images)
        weights = tuple(self.image_prompt_weights)
        if weights:
            if len(weights) != len(images):
                raise InvalidParameter("image_prompt_weights", weights, f"must give one weight per image ({len(images)})")
            for weight in weights:
                _check_range("image_prompt_weights", weight, 0.0, 1e6, float)
            if not sum(weights) > 0:
                raise InvalidParameter("image_prompt_weights", weights, "must not all be 0")
        object.__setattr__(self, "image_prompt_weights", tuple(float(w) for w in weights))

    @property
    def mode(self) -> str:
        """What the request asks for: ``outpaint``, ``inpaint``, ``img2img``, ``variations``,
        ``blend`` or ``txt2img`` (the capability a model needs for it)."""
        if self.outpaints:
            return "outpaint"
        if self.init_image is not None:
            return "inpaint" if self.mask is not None else "img2img"
        if self.image_prompts:
            return "blend" if len(self.image_prompts) > 1 else "variations"
        return "txt2img"

    def option(self, cls: type[G]) -> G:
        """The option group ``cls`` of this request: the one given, or its defaults."""
        return option_group(self.options, cls)

    def with_typed_options(self, known: Any) -> GenerationRequest:
        """This request with every option group typed against ``known`` (the registry's option
        catalogue, or a mapping of namespace to class): unknown ones are errors."""
        if not self.options:
            return self
        catalogue = {name: known.get(name) for name in known.names()} if hasattr(known, "names") else dict(known)
        return dataclasses.replace(self, options=resolve_options(self.options, catalogue))

    def with_defaults(self, defaults: Any) -> GenerationRequest:
        """Fill ``None`` fields from a :class:`aipaint.models.latent.ModelDefaults`."""
        fill = {
            name: getattr(defaults, name)
            for name in ("steps", "cfg_scale", "sampler", "schedule", "width", "height", "guidance_rescale", "emphasis")
            if getattr(self, name) is None
        }
        return dataclasses.replace(self, **fill)

    def with_seed(self) -> GenerationRequest:
        """Replace seed -1 (and a used variation seed -1) by a random seed, so the result records it."""
        fixed: dict[str, int] = {}
        if self.seed == -1:
            fixed["seed"] = random.randint(0, MAX_SEED - self.batch_size)
        if self.subseed == -1 and self.subseed_strength:
            fixed["subseed"] = random.randint(0, MAX_SEED - self.batch_size)
        return dataclasses.replace(self, **fixed) if fixed else self

    @property
    def outpaints(self) -> bool:
        """Whether this is an outpainting request: an image, and a side to extend it on."""
        return self.init_image is not None and any(getattr(self, name) for name in OUTPAINT_SIDES)

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.batch_size)]
