"""The modes of a generation: how each starts the loop and finishes the picture.

txt2img starts from pure noise and runs every step. What the image modes add to it, following A1111 (modules/processing.py,
``StableDiffusionProcessingImg2Img``) and diffusers (``StableDiffusionImg2ImgPipeline``,
``StableDiffusionInpaintPipeline``):

* **img2img**: the input is encoded by the VAE (posterior mean), noised to the level of
  step ``start`` (``steps - int(steps × strength)``, diffusers' rule) with the seed's
  noise, and only the remaining steps run. With ``img2img_exact_steps`` the schedule is
  lengthened to ``int(steps / strength)`` so exactly ``steps`` run (A1111's option).
  Strength 1 starts from pure noise (the input is ignored, the result is txt2img's);
  strength 0 runs nothing and returns the input through the VAE.
* **inpainting**: the mask (white = repaint) is inverted and blurred if asked; a latent
  copy of it decides what the loop may change. A 4-channel UNet gets *latent blending*:
  after every step the unmasked latents are replaced by the input noised to the level
  the loop has reached. A 9-channel inpainting UNet gets the mask and the masked image's
  latents as extra input channels instead. Finally A1111's overlay pastes the original
  back through the blurred mask in pixel space, so every pixel outside it is exact.
  "Only masked" crops the mask's region (plus padding, grown to the output's aspect
  ratio), generates it at the full requested size, and pastes it back.
* **outpainting**: the image is put on a larger canvas whose new area starts from its
  edge colours, a blurred fill or noise, and that area is inpainted; the overlay is
  feathered only *inside* the new area, so the original pixels never change. The sides
  and the fill are request fields (``outpaint_left`` … ``outpaint_fill``) and are recorded
  in the PNG parameters, so ``--from-png`` repeats an outpaint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from aipaint import imageutil
from aipaint.api.request import OUTPAINT_SIDES, SIZE_RANGE, STEPS_RANGE, GenerationRequest
from aipaint.engine.loop import LoopContributor
from aipaint.engine.plans import SamplingPlan
from aipaint.errors import InvalidParameter, UnsupportedFeature

if TYPE_CHECKING:
    from aipaint.models.latent import LatentDiffusionModel

DEFAULT_STRENGTH, DEFAULT_MASK_BLUR = 0.75, 4  # A1111's img2img tab
OUTPAINT_STRENGTH, OUTPAINT_MASK_BLUR = 1.0, 8
RESIZE_MODE_INFOTEXT = {"crop and resize": "Crop and resize", "resize and fill": "Resize and fill"}


# --- loop contributors -------------------------------------------------------------------
class LatentBlend(LoopContributor):
    """Latent blending for ordinary (4-channel) UNets, as diffusers' inpaint pipeline does it.

    After each sampler step, where ``mask`` is 0 the latents are replaced by the input's
    latents noised to the level the loop has just reached (clean after the last step).
    """

    def __init__(self, plan: SamplingPlan, clean: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, start: int) -> None:
        self.plan, self.clean, self.noise, self.mask, self.start = plan, clean, noise, mask, start

    def after_step(self, step: int, total: int, latents: torch.Tensor) -> torch.Tensor:
        kept = self.plan.noised_after(self.clean, self.noise, self.start, step + 1)
        return torch.lerp(kept, latents, self.mask.to(latents))


class InpaintChannels(LoopContributor):
    """The extra input of a 9-channel inpainting UNet: ``cat([latents, mask, masked_image_latents])``."""

    def __init__(self, mask: torch.Tensor, masked_latents: torch.Tensor) -> None:
        self.extra = torch.cat([mask.to(masked_latents), masked_latents], dim=1)

    def transform_input(self, step: int, latent_input: torch.Tensor) -> torch.Tensor:
        extra = self.extra.to(latent_input)
        return torch.cat([latent_input, extra.repeat(latent_input.shape[0] // extra.shape[0], 1, 1, 1)], dim=1)


def inpaint_channels(
    model: LatentDiffusionModel, image01: torch.Tensor, pixel_mask: torch.Tensor, mask: torch.Tensor, batch: int
) -> InpaintChannels:
    """Inputs for a 9-channel UNet: the latent ``mask``, and the latents of the image
    (1×3×H×W in [0, 1]) with its ``pixel_mask`` area, rounded, set to mid-grey (0 in the
    VAE's [-1, 1] range), as diffusers and A1111 build them."""
    masked = torch.lerp(image01, torch.full_like(image01, 0.5), pixel_mask.round())
    with torch.inference_mode():
        latents = model.encode(masked)
    return InpaintChannels(mask.expand(batch, -1, -1, -1), latents.expand(batch, -1, -1, -1))


def needs_inpaint_channels(model: LatentDiffusionModel) -> bool:
    """Whether the UNet takes mask and masked-image channels besides the latents."""
    extra = model.unet_in_channels - model.latent_channels
    if extra not in (0, model.latent_channels + 1):
        raise UnsupportedFeature(
            f"{model.name}: the UNet takes {model.unet_in_channels} input channels; aipaint knows "
            f"{model.latent_channels} (ordinary) and {2 * model.latent_channels + 1} (inpainting) models"
        )
    return extra > 0


def repaint_everything(model: LatentDiffusionModel, height: int, width: int, batch: int) -> InpaintChannels:
    """A1111's conditioning for an inpainting model outside inpainting: all mask, all grey."""
    grey = torch.full((1, 3, height, width), 0.5)
    factor = model.vae_scale_factor
    return inpaint_channels(model, grey, torch.ones_like(grey[:, :1]), torch.ones((1, 1, height // factor, width // factor)), batch)


# --- sizes and schedules -------------------------------------------------------------------
def size_grid(model: LatentDiffusionModel) -> int:
    """Widths and heights must be multiples of this: 8 (A1111) and the model's latent factor."""
    return math.lcm(8, model.vae_scale_factor)


def with_mode_defaults(request: GenerationRequest, strength: float, mask_blur: int) -> GenerationRequest:
    """Fill a ``None`` denoising strength and mask blur with the mode's defaults."""
    fill = {}
    if request.denoising_strength is None:
        fill["denoising_strength"] = strength
    if request.mask_blur is None:
        fill["mask_blur"] = mask_blur
    return dataclasses.replace(request, **fill) if fill else request


def with_image_size(request: GenerationRequest, grid: int) -> GenerationRequest:
    """Width and height default to the input image's, rounded to the nearest multiple of ``grid``."""

    def rounded(value: int) -> int:
        return min(max(grid * round(value / grid), grid, SIZE_RANGE[0]), SIZE_RANGE[1] - SIZE_RANGE[1] % grid)

    image = request.init_image
    fill = {}
    if request.width is None:
        fill["width"] = rounded(image.width)
    if request.height is None:
        fill["height"] = rounded(image.height)
    return dataclasses.replace(request, **fill) if fill else request


def img2img_schedule(steps: int, strength: float, exact: bool) -> int:
    """The sampling plan's length: ``steps``, or with ``exact`` ``int(steps / strength)`` so that
    exactly ``steps`` steps remain after skipping the noisiest ones (A1111's option)."""
    if not exact or strength == 0:
        return steps
    total = int(steps / strength)
    if total > STEPS_RANGE[1]:
        raise InvalidParameter(
            "denoising_strength",
            strength,
            f"with img2img_exact_steps, steps / denoising_strength must be at most {STEPS_RANGE[1]} (it is {total})",
            "raise the strength, lower the steps, or turn img2img_exact_steps off",
        )
    return total


def first_step(plan: SamplingPlan, request: GenerationRequest) -> int:
    """The first step of ``plan`` to run for the request's strength (``total_steps``: none)."""
    if request.img2img_exact_steps:
        return plan.total_steps - request.steps if request.denoising_strength else plan.total_steps
    return plan.start_index(request.denoising_strength)


# --- pixels <-> tensors ---------------------------------------------------------------------
def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image → 1×3×H×W float tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """``L`` mask → 1×1×H×W float tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)[None, None]


def latent_mask(mask: Image.Image, latent_size: tuple[int, int]) -> torch.Tensor:
    """The mask at latent resolution (area average, rounded to 0/1 like A1111's mask_round)."""
    return torch.nn.functional.interpolate(mask_tensor(mask), size=latent_size, mode="area").round()


# --- the masks of one inpainting run ---------------------------------------------------------
@dataclass
class InpaintLayout:
    """Where an inpainting run works and how its output goes back over the original.

    ``work_image``/``work_mask`` are at the generation size; ``overlay`` is the alpha of the
    generated pixels over ``original`` (both at the output size); ``crop`` is the region of
    the original that "only masked" generates, or None; ``result_box`` crops the final image.
    """

    original: Image.Image
    work_image: Image.Image
    work_mask: Image.Image
    overlay: Image.Image
    crop: tuple[int, int, int, int] | None = None
    result_box: tuple[int, int, int, int] | None = None

    @classmethod
    def from_request(cls, request: GenerationRequest) -> InpaintLayout:
        width, height = request.width, request.height
        image = request.init_image
        mask = imageutil.invert_mask(request.mask) if request.inpainting_mask_invert else request.mask
        blurred = imageutil.blur_mask(mask, request.mask_blur)
        if request.inpaint_full_res:
            box = imageutil.crop_region(blurred, request.inpaint_full_res_padding)
            box = imageutil.expand_to_ratio(box, width, height, image.size)
            work_image = imageutil.resize_image(image.crop(box), width, height, "resize and fill")
            work_mask = imageutil.resize_image(blurred.crop(box), width, height, "resize and fill")
            return cls(image, work_image, work_mask, blurred, box)
        work_image = imageutil.resize_image(image, width, height, request.resize_mode)
        work_mask = imageutil.resize_image(blurred, width, height, request.resize_mode)
        # A1111 doubles the blurred mask for the overlay: generated pixels are used in full
        # wherever the blur reaches half strength, and fade out only beyond the mask.
        overlay = work_mask.point(lambda v: min(255, 2 * v))
        return cls(work_image, work_image, work_mask, overlay)

    def paste(self, generated: Image.Image) -> Image.Image:
        """The final image: ``generated`` put back over the original through the overlay."""
        if self.crop is not None:
            x1, y1, x2, y2 = self.crop
            full = self.original.copy()
            full.paste(generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
            generated = full
        final = imageutil.composite(self.original, generated, self.overlay)
        return final.crop(self.result_box) if self.result_box else final


def image_infotext(request: GenerationRequest) -> dict[str, Any]:
    """A1111's infotext entries for an img2img/inpainting request."""
    values: dict[str, Any] = {"Denoising strength": request.denoising_strength}
    if request.resize_mode in RESIZE_MODE_INFOTEXT:
        values["Resize mode"] = RESIZE_MODE_INFOTEXT[request.resize_mode]
    if request.img2img_exact_steps:
        values["Img2img exact steps"] = "True"
    if request.mask is None:
        return values
    values["Mask blur"] = request.mask_blur
    if request.inpainting_mask_invert:
        values["Mask mode"] = "Inpaint not masked"
    if request.inpainting_fill != "original":  # A1111 writes the other three under its own names
        values["Masked content"] = request.inpainting_fill
    if request.inpaint_full_res:
        values["Inpaint area"] = "Only masked"
        values["Masked area padding"] = request.inpaint_full_res_padding
    return values


# --- outpainting ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Extension:
    """Pixels to add on each side of an image."""

    left: int = 0
    top: int = 0
    right: int = 0
    bottom: int = 0

    def __post_init__(self) -> None:
        for name in ("left", "top", "right", "bottom"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidParameter(name, value, "must be a whole number of pixels, 0 or more")
        if not (self.left or self.top or self.right or self.bottom):
            raise InvalidParameter("left/top/right/bottom", 0, "outpainting needs at least one side to extend by more than 0 pixels")

    def padded_to(self, size: tuple[int, int], grid: int) -> Extension:
        """The extension grown so the canvas is a multiple of ``grid`` on each axis.

        The extra pixels go to an extended side (right/bottom first), or to right/bottom
        when an axis is not extended; they are cropped from the result.
        """
        extra_w = -(size[0] + self.left + self.right) % grid
        extra_h = -(size[1] + self.top + self.bottom) % grid
        left_w = extra_w if (self.left and not self.right) else 0
        top_h = extra_h if (self.top and not self.bottom) else 0
        return Extension(self.left + left_w, self.top + top_h, self.right + extra_w - left_w, self.bottom + extra_h - top_h)

    def canvas_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] + self.left + self.right, size[1] + self.top + self.bottom


def check_canvas(extension: Extension, width: int, height: int) -> None:
    """The extended canvas must fit the size limits before anything is allocated."""
    if max(width, height) > SIZE_RANGE[1]:
        raise InvalidParameter(
            "left/top/right/bottom",
            f"{extension.left}/{extension.top}/{extension.right}/{extension.bottom}",
            f"the extended image would be {width}x{height}, larger than {SIZE_RANGE[1]} pixels on a side",
            "extend by less, or downscale the image first",
        )
    imageutil.check_pixels("outpainted image", width, height)


def outpaint_infotext(request: GenerationRequest) -> dict[str, Any]:
    """The PNG parameters that repeat an outpaint: the sides extended (as asked, before the
    padding to the size grid) and the fill. A1111 records none; these are aipaint's keys."""
    sides = {"Outpaint left": request.outpaint_left, "Outpaint top": request.outpaint_top,
             "Outpaint right": request.outpaint_right, "Outpaint bottom": request.outpaint_bottom}
    return {**{key: pixels for key, pixels in sides.items() if pixels}, "Outpaint fill": request.outpaint_fill}


# --- the modes ---------------------------------------------------------------------------------
@dataclass
class ModeStart:
    """How a mode starts the loop: the latents, the first step of the plan to run, and what it adds to the loop."""

    latents: torch.Tensor
    first_step: int = 0
    contributors: list[LoopContributor] = field(default_factory=list)


class Mode:
    """One way of starting and finishing a generation. :func:`aipaint.engine.run.generate` calls,
    in order: :meth:`settle` (before the model's defaults fill the request), :meth:`run_request`,
    :meth:`begin` (inside the job, after the adapters are active) and :meth:`finish`.

    A mode never calls back into the pipeline: it gets what it needs as arguments.
    """

    def capability(self, request: GenerationRequest) -> str:
        """The capability (see :mod:`aipaint.models.family`) a model needs for this mode."""
        raise NotImplementedError

    def settle(self, request: GenerationRequest, model: LatentDiffusionModel) -> GenerationRequest:
        """The request with this mode's own defaults filled in (sizes, strength)."""
        return request

    def run_request(self, request: GenerationRequest) -> GenerationRequest:
        """The request the loop runs: the same, or with a longer plan (img2img's exact steps)."""
        return request

    def begin(self, model: LatentDiffusionModel, request: GenerationRequest, plan: SamplingPlan,
              noise: torch.Tensor) -> ModeStart:
        raise NotImplementedError

    def finish(self, images: list[Image.Image]) -> list[Image.Image]:
        return images

    def infotext(self, request: GenerationRequest) -> dict[str, Any]:
        return {}

    def recorded(self, request: GenerationRequest) -> GenerationRequest:
        """The request the result records (and ``--from-png`` repeats)."""
        return request


class Txt2Img(Mode):
    """Pure noise in, every step run. An inpainting model repaints everything (A1111's dummy conditioning)."""

    def capability(self, request: GenerationRequest) -> str:
        return request.mode

    def begin(self, model, request, plan, noise):
        contributors = []
        if needs_inpaint_channels(model):
            contributors.append(repaint_everything(model, request.height, request.width, request.batch_size))
        return ModeStart(plan.initial_latents(noise).to(model.device, model.dtype), 0, contributors)


class Img2Img(Mode):
    """img2img, and inpainting when the request has a mask (see the module's docstring).

    ``layout`` replaces the one the request's mask options describe and ``extra_infotext``
    adds to the PNG parameters (both outpainting's own).
    """

    def __init__(self, layout: InpaintLayout | None = None, extra_infotext: Mapping[str, Any] | None = None) -> None:
        self.layout = layout
        self.extra_infotext = dict(extra_infotext or {})

    def capability(self, request: GenerationRequest) -> str:
        return "inpaint" if request.mask is not None else "img2img"

    def settle(self, request, model):
        request = with_mode_defaults(request, DEFAULT_STRENGTH, DEFAULT_MASK_BLUR)
        return with_image_size(request, size_grid(model))

    def run_request(self, request):
        self.asked = request
        total = img2img_schedule(request.steps, request.denoising_strength, request.img2img_exact_steps)
        return dataclasses.replace(request, steps=total) if total != request.steps else request

    def begin(self, model, request, plan, noise):
        # 1. What is generated where: the working image and mask, and how the result goes back.
        if self.layout is None and request.mask is not None:
            self.layout = InpaintLayout.from_request(request)
        layout = self.layout
        if layout is not None:
            work_image = layout.work_image
        else:
            work_image = imageutil.resize_image(request.init_image, request.width, request.height, request.resize_mode)
        if layout and request.inpainting_fill != "original":
            work_image = imageutil.fill_masked(work_image, layout.work_mask)  # A1111 fills for every non-original mode
        pixels = to_tensor(work_image)
        batch = request.batch_size
        with torch.inference_mode():
            clean = model.encode(pixels).expand(batch, -1, -1, -1)
        mask = latent_mask(layout.work_mask, tuple(clean.shape[-2:])) if layout else None
        start = first_step(plan, self.asked)
        # 2. "latent noise"/"latent nothing" replace the masked latents with the seed's noise or zeros.
        noise = noise.to(model.device, clean.dtype)
        if mask is not None and request.inpainting_fill in ("latent noise", "latent nothing"):
            replacement = noise if request.inpainting_fill == "latent noise" else torch.zeros_like(clean)
            clean = torch.lerp(clean, replacement, mask.to(clean))
        # 3. How the input steers the loop: extra UNet channels, or latent blending.
        contributors: list[LoopContributor] = []
        if needs_inpaint_channels(model):
            if mask is None:
                contributors.append(repaint_everything(model, request.height, request.width, batch))
            else:
                contributors.append(inpaint_channels(model, pixels, mask_tensor(layout.work_mask), mask, batch))
        elif mask is not None:
            contributors.append(LatentBlend(plan, clean, noise, mask.to(model.device), start))
        # 4. The input noised to the first step's level (pure noise at strength 1).
        latents = plan.initial_latents(noise) if start == 0 else plan.noised_latents(clean, noise, start)
        return ModeStart(latents.to(model.device, model.dtype), start, contributors)

    def finish(self, images):
        if self.layout is None:
            return images
        return [self.layout.paste(image) for image in images]

    def infotext(self, request):
        return {**image_infotext(request), **self.extra_infotext}


class Outpaint(Img2Img):
    """Extend ``request.init_image`` by the request's ``outpaint_*`` sides and paint the new area.

    The request's ``mask_blur`` is the width of the feather inside the new area; width and
    height are the canvas's and cannot be chosen, nor can a mask (the new area is the mask).
    The canvas is inpainted by an ordinary inpainting request, which the result records, so a
    post-processor that reuses it redraws the picture rather than extending it again.
    """

    def capability(self, request: GenerationRequest) -> str:
        return "outpaint"

    def settle(self, request, model):
        if request.init_image is None:
            raise InvalidParameter("init_image", None, "outpainting needs the image to extend")
        if request.mask is not None:
            raise InvalidParameter("mask", "<mask>", "is made by outpainting (the new area)", "leave the mask out, or inpaint instead")
        if request.width is not None or request.height is not None:
            raise InvalidParameter("width/height", f"{request.width}x{request.height}", "are set by outpainting: the image plus the extension")
        extension = Extension(*(getattr(request, name) for name in OUTPAINT_SIDES))
        image = request.init_image
        padded = extension.padded_to(image.size, size_grid(model))
        width, height = padded.canvas_size(image.size)
        check_canvas(extension, width, height)
        # The seed is fixed here because the "noise" fill is drawn from it.
        request = with_mode_defaults(request, OUTPAINT_STRENGTH, OUTPAINT_MASK_BLUR).with_seed()
        canvas = imageutil.extend_canvas(image, padded.left, padded.top, padded.right, padded.bottom, request.outpaint_fill,
                                         seed=request.seed)
        mask = imageutil.outpaint_mask(image.size, padded.left, padded.top, padded.right, padded.bottom)
        x, y = padded.left - extension.left, padded.top - extension.top
        out_width, out_height = extension.canvas_size(image.size)
        self.layout = InpaintLayout(
            original=canvas,
            work_image=canvas,
            work_mask=mask,
            overlay=imageutil.feather_inside(mask, request.mask_blur),
            result_box=(x, y, x + out_width, y + out_height),
        )
        self.extra_infotext = outpaint_infotext(request)
        inpaint_request = dataclasses.replace(
            request,
            init_image=canvas,
            mask=mask,
            width=width,
            height=height,
            resize_mode="just resize",
            inpainting_fill="original",
            inpainting_mask_invert=False,
            inpaint_full_res=False,
            outpaint_fill="edge",
            **dict.fromkeys(OUTPAINT_SIDES, 0),
        )
        return super().settle(inpaint_request, model)


class LatentImg2Img(Mode):
    """img2img from latents the caller already has (hires fix's latent upscalers): they are
    noised to the level of the first step ``strength`` leaves, and the remaining steps run."""

    def __init__(self, latents: torch.Tensor, strength: float) -> None:
        self.latents = latents
        self.strength = strength

    def capability(self, request: GenerationRequest) -> str:
        return "img2img"

    def begin(self, model, request, plan, noise):
        start = plan.start_index(self.strength)
        if start >= plan.total_steps:
            raise InvalidParameter("denoising_strength", self.strength, f"runs no step of {plan.total_steps} steps",
                                   "raise the strength or the steps")
        latents = self.latents.to(model.device, model.dtype)
        noised = plan.noised_latents(latents, noise.to(model.device, model.dtype), start)
        return ModeStart(noised, start, [])


def mode_for(request: GenerationRequest) -> Mode:
    """The mode a request asks for: outpaint (an image and a side to extend), img2img or
    inpaint (an image, with or without a mask), else text to image."""
    if request.outpaints:
        return Outpaint()
    if request.init_image is not None:
        return Img2Img()
    return Txt2Img()
