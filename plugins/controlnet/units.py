"""ControlNet units: validated options, control images, the loop contributor, infotext.

A unit is ``AdapterUnit("controlnet", {...})`` with these options (A1111's API names):

==================  =======================================================================
``model``           zoo id, name in the ControlNet folder, Path, or ``ControlNetModel``
``image``           PIL image, path or HWC uint8 array; or a list, one per batch item
``preprocessor``    a registered preprocessor (``module`` is accepted too); default ``none``
``weight``          0–2, default 1 (0 = the unit does nothing)
``guidance_start``  fraction of the steps where the unit starts, default 0
``guidance_end``    fraction of the steps where it stops, default 1
``control_mode``    ``Balanced`` | ``My prompt is more important`` | ``ControlNet is more important``
``union_control_type``
                    a union ControlNet's control type (sd-webui-controlnet's API field): a name
                    the family knows (FLUX, InstantX's: ``canny``, ``tile``, ``depth``, ``blur``,
                    ``pose``, ``gray``, ``lq``) or the ControlNet's integer index; required for a
                    union ControlNet, refused for others (unset: absent, None, ``""`` or ``Unknown``)
``resize_mode``     ``Crop and Resize`` (default) | ``Just Resize`` | ``Resize and Fill``
``mask``            the inpaint preprocessor's mask (white = repaint)
``threshold_a/b``   the preprocessor's two settings (or their names, e.g. ``low_threshold``)
``config``          a config folder for a single-file model that does not fit the base UNet
``allow_pickle``    allow ``.pth``/``.ckpt`` files (read with ``torch.load(weights_only=True)``): True or
                    False (or true/false, yes/no, on/off, 1/0 as text); default: the request's
                    ``allow_pickle`` (the command line's ``--allow-pickle``)
==================  =======================================================================

The unit is active at step ``i`` of ``n`` when ``guidance_start <= i / n <= guidance_end``
(as in sd-webui-controlnet); steps count over the whole schedule, also in img2img.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.api.options import parse_bool
from aipaint.engine.loop import LoopContributor
from aipaint.errors import ImageError, InvalidParameter
from aipaint.plugin.kit.codecs import Field, FieldsCodec

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from aipaint.plugin.adapters import AdapterActivation, AdapterContext
    from aipaint.plugin.preprocess import PreprocessorSpec

BALANCED, PROMPT, CONTROL = "Balanced", "My prompt is more important", "ControlNet is more important"
CONTROL_MODES: dict[str, str] = {
    "balanced": BALANCED, "0": BALANCED,
    "my prompt is more important": PROMPT, "prompt": PROMPT, "1": PROMPT,
    "controlnet is more important": CONTROL, "control": CONTROL, "controlnet": CONTROL, "2": CONTROL,
}
JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = "Just Resize", "Crop and Resize", "Resize and Fill"
RESIZE_MODES: dict[str, str] = {
    "just resize": JUST_RESIZE, "resize": JUST_RESIZE, "0": JUST_RESIZE,
    "crop and resize": CROP_AND_RESIZE, "crop": CROP_AND_RESIZE, "inner fit (scale to fit)": CROP_AND_RESIZE,
    "scale to fit (inner fit)": CROP_AND_RESIZE, "1": CROP_AND_RESIZE,
    "resize and fill": RESIZE_AND_FILL, "fill": RESIZE_AND_FILL, "outer fit (shrink to fit)": RESIZE_AND_FILL,
    "envelope (outer fit)": RESIZE_AND_FILL, "2": RESIZE_AND_FILL,
}
# sd-webui-controlnet's soft injection ("My prompt is more important"): residual k of n is
# scaled by 0.825 ** (n - 1 - k), so the deepest layers keep the most control.
SOFT_INJECTION_BASE = 0.825
UNIT_KEYS = (
    "model", "image", "preprocessor", "module", "weight", "guidance_start", "guidance_end", "control_mode",
    "resize_mode", "mask", "config", "allow_pickle", "threshold_a", "threshold_b", "model_hash", "processor_res",
    "pixel_perfect", "union_control_type",
)
UNSET_UNION_TYPES = ("", "unknown")  # sd-webui-controlnet's API sends "Unknown" when no type is chosen


def _number(name: str, value: Any, lo: float, hi: float, index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise InvalidParameter(f"ControlNet {index} {name}", value, f"must be a number from {lo} to {hi}")
    return float(value)


def _choice(name: str, value: Any, table: dict[str, str], index: int) -> str:
    key = str(value).strip().lower()
    if key not in table:
        raise InvalidParameter(f"ControlNet {index} {name}", value, "must be one of " + ", ".join(repr(v) for v in dict.fromkeys(table.values())))
    return table[key]


def _union_control_type(value: Any, index: int) -> str | int | None:
    """A unit's ``union_control_type`` as given (None when unset); the family reads it."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # the command line reads numbers as floats
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidParameter(f"ControlNet {index} union_control_type", value, "must be a control type's name or index")
    if isinstance(value, str):
        value = value.strip()
        return None if value.lower() in UNSET_UNION_TYPES else value
    return value


def load_image(value: Any, what: str) -> Image.Image:
    """A PIL image from a PIL image, a path or an HWC/HW uint8 array."""
    import numpy as np
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)):
        from aipaint.imageutil import read_image_file

        return read_image_file(value, f"the {what}")
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
        return Image.fromarray(value)
    raise ImageError(f"the {what} must be a PIL image, a path or a uint8 array, not {type(value).__name__}")


@dataclass
class UnitOptions:
    """One unit's options, validated (see the module docstring)."""

    index: int
    model: Any
    images: list[Image.Image]
    preprocessor: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = BALANCED
    resize_mode: str = CROP_AND_RESIZE
    mask: Image.Image | None = None
    config: Path | None = None
    allow_pickle: bool = False
    preprocessor_params: dict[str, Any] = field(default_factory=dict)
    union_control_type: str | int | None = None

    @classmethod
    def parse(cls, options: Mapping[str, Any], index: int, batch_size: int, request: Any = None) -> UnitOptions:
        """Validate; like A1111, a unit without image or mask takes the img2img/inpaint request's."""
        options = dict(options)
        if options.get("image") is None and getattr(request, "init_image", None) is not None:
            options["image"] = request.init_image
        if options.get("mask") is None and getattr(request, "mask", None) is not None:
            from PIL import ImageOps

            mask = request.mask.convert("L")
            options["mask"] = ImageOps.invert(mask) if getattr(request, "inpainting_mask_invert", False) else mask
        if "module" in options and "preprocessor" in options:
            raise InvalidParameter(f"ControlNet {index} preprocessor", options["module"], "given twice, as 'preprocessor' and 'module'")
        preprocessor = options.pop("preprocessor", options.pop("module", None)) or "none"
        image = options.pop("image", None)
        if image is None:
            raise InvalidParameter(f"ControlNet {index} image", None, "is required: the control image (PIL image or path)")
        raw_images = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(raw_images) not in (1, batch_size):
            raise InvalidParameter(f"ControlNet {index} image", f"{len(raw_images)} images",
                                   f"must be one image, or one per batch item ({batch_size})")
        unit = cls(
            index=index,
            model=options.pop("model", None),
            images=[load_image(i, f"ControlNet {index} image") for i in raw_images],
            preprocessor=str(preprocessor),
            weight=_number("weight", options.pop("weight", 1.0), 0.0, 2.0, index),
            guidance_start=_number("guidance_start", options.pop("guidance_start", 0.0), 0.0, 1.0, index),
            guidance_end=_number("guidance_end", options.pop("guidance_end", 1.0), 0.0, 1.0, index),
            control_mode=_choice("control_mode", options.pop("control_mode", BALANCED), CONTROL_MODES, index),
            resize_mode=_choice("resize_mode", options.pop("resize_mode", CROP_AND_RESIZE), RESIZE_MODES, index),
        )
        if unit.guidance_start > unit.guidance_end:
            raise InvalidParameter(f"ControlNet {index} guidance_start", unit.guidance_start,
                                   f"must not exceed guidance_end ({unit.guidance_end})")
        mask = options.pop("mask", None)
        unit.mask = load_image(mask, f"ControlNet {index} mask").convert("L") if mask is not None else None
        config = options.pop("config", None)
        unit.config = Path(config).expanduser() if config is not None else None
        # The request's opt-in (--allow-pickle) covers every file of the run; a unit may still set its own.
        run_opt_in = getattr(request, "allow_pickle", False) is True
        unit.allow_pickle = parse_bool(f"ControlNet {index} allow_pickle", options.pop("allow_pickle", run_opt_in))
        expected = options.pop("model_hash", "")
        if expected and isinstance(unit.model, str) and "[" not in unit.model:
            unit.model = f"{unit.model} [{expected}]"
        unit.union_control_type = _union_control_type(options.pop("union_control_type", None), index)
        options.pop("processor_res", None)  # maps are always made at the generation's size (pixel perfect)
        options.pop("pixel_perfect", None)
        unit.preprocessor_params = options  # the rest: checked against the preprocessor by check_keys
        return unit

    def check_keys(self, spec: PreprocessorSpec) -> None:
        """Options left over must be settings of the chosen preprocessor; a typo is an error, not ignored."""
        allowed = {"threshold_a", "threshold_b", *(p.name for p in spec.params)}
        unknown = [k for k in self.preprocessor_params if k not in allowed]
        if unknown:
            valid = sorted(set(UNIT_KEYS) - {"module"}) + [p.name for p in spec.params]
            raise InvalidParameter(f"ControlNet {self.index} option", unknown[0],
                                   f"valid options (with preprocessor {spec.name!r}) are {', '.join(valid)}")


# --------------------------------------------------------------------------- images
def _border_colour(image: Image.Image) -> tuple[int, ...]:
    import numpy as np

    a = np.asarray(image)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0).reshape(-1))


def fit_image(image: Image.Image, width: int, height: int, mode: str, *, is_mask: bool = False) -> Image.Image:
    """Resize to width × height the A1111 way: stretch, cover and crop, or fit and pad."""
    from PIL import Image

    from aipaint.imageutil import check_pixels

    check_pixels("control image size", width, height)
    resample = Image.NEAREST if is_mask else Image.LANCZOS
    iw, ih = image.size
    if mode == JUST_RESIZE or (iw, ih) == (width, height):
        return image.resize((width, height), resample) if (iw, ih) != (width, height) else image
    scale = max(width / iw, height / ih) if mode == CROP_AND_RESIZE else min(width / iw, height / ih)
    sw, sh = max(1, round(iw * scale)), max(1, round(ih * scale))
    check_pixels("control image size", sw, sh)  # covering a very long, thin image scales it far past the crop
    scaled = image.resize((sw, sh), resample)
    if mode == CROP_AND_RESIZE:
        left, top = (sw - width) // 2, (sh - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    # Resize and Fill: pad with the border colour (for a mask: 255, the padding is to be generated).
    fill = 255 if is_mask else _border_colour(scaled)
    canvas = Image.new(scaled.mode, (width, height), fill)
    canvas.paste(scaled, ((width - sw) // 2, (height - sh) // 2))
    return canvas


def control_tensor(maps: list[Image.Image]) -> torch.Tensor:
    """Maps → a float tensor in [0, 1] (N, 3, H, W); transparent pixels become -1 (unknown)."""
    import numpy as np
    import torch

    arrays = []
    for m in maps:
        a = np.asarray(m.convert("RGBA"), dtype=np.float32) / 255.0
        rgb = a[:, :, :3].copy()
        rgb[a[:, :, 3] == 0] = -1.0
        arrays.append(rgb.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


def make_control_maps(unit: UnitOptions, spec: PreprocessorSpec, width: int, height: int) -> list[Image.Image]:
    """Fit each control image to the generation size, then run the preprocessor on it."""
    mask = fit_image(unit.mask, width, height, unit.resize_mode, is_mask=True) if unit.mask is not None else None
    maps = []
    for image in unit.images:
        fitted = fit_image(image.convert("RGB"), width, height, unit.resize_mode)
        maps.append(spec.apply(fitted, unit.preprocessor_params, mask))
    return maps


# --------------------------------------------------------------------------- the loop seam
class ControlNetContributor(LoopContributor):
    """Runs one ControlNet on the loop's UNet input and hands its residuals to the UNet.

    The loop's batch is ``[negative, positive_1, …] × batch``; the control images are
    repeated to match, one per batch item. Residuals are scaled by the unit's weight;
    outside [guidance_start, guidance_end] the unit adds nothing (not even a zero), so
    such a step is the same as one without ControlNet.
    """

    def __init__(
        self,
        controlnet: Any,
        control: torch.Tensor,
        *,
        weight: float,
        guidance_start: float,
        guidance_end: float,
        control_mode: str,
        total_steps: int,
        batch_size: int,
        uses_cfg: bool,
    ) -> None:
        self.controlnet = controlnet
        self.control = control
        self.weight = weight
        self.guidance_start = guidance_start
        self.guidance_end = guidance_end
        self.control_mode = control_mode
        self.total_steps = max(1, total_steps)
        self.batch_size = batch_size
        self.uses_cfg = uses_cfg
        self.in_channels = int(controlnet.config.in_channels)
        self.calls = 0

    def before_call(self, step: int, guided: bool) -> None:
        self.uses_cfg = guided  # Skip Early CFG leaves the negative rows out of early calls

    def active(self, step: int) -> bool:
        fraction = step / self.total_steps
        return self.weight > 0 and self.guidance_start <= fraction <= self.guidance_end

    def _control_for(self, rows: int) -> torch.Tensor:
        per_item = self.control if self.control.shape[0] == self.batch_size else self.control.expand(self.batch_size, -1, -1, -1)
        return per_item.repeat(rows // self.batch_size, 1, 1, 1)

    def unet_kwargs(self, step: int, latent_input: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> dict[str, Any]:
        import torch

        if not self.active(step):
            return {}
        self.calls += 1
        rows = latent_input.shape[0]
        # "ControlNet is more important": only the conditional rows see the control, so CFG
        # pushes towards it (the unconditional rows come first, one per batch item).
        skip = self.batch_size if self.control_mode == CONTROL and self.uses_cfg else 0
        x = latent_input[skip:, : self.in_channels]
        timestep = t[skip:] if t.dim() and t.shape[0] == rows else t
        down, mid = self.controlnet(
            x, timestep, encoder_hidden_states=embeds[skip:], controlnet_cond=self._control_for(rows - skip),
            return_dict=False,
        )
        residuals = [*down, mid]
        scales = [self.weight] * len(residuals)
        if self.control_mode in (PROMPT, CONTROL):
            n = len(residuals)
            scales = [self.weight * SOFT_INJECTION_BASE ** (n - 1 - k) for k in range(n)]
        residuals = [r * s for r, s in zip(residuals, scales, strict=True)]
        if skip:
            residuals = [torch.cat([torch.zeros_like(r[:skip]), r]) for r in residuals]
        return {"down_block_additional_residuals": residuals[:-1], "mid_block_additional_residual": residuals[-1]}


class TransformerControlNetContributor(LoopContributor):
    """Asks a transformer family (SD 3, FLUX) to run one ControlNet inside its ``predict``.

    The family builds the ControlNet's inputs as it builds its transformer's (packed tokens,
    position ids, pooled projections, guidance) and adds the block outputs, scaled by the
    unit's weight; ``condition`` is the family's encoding of the control images, one row per
    batch item. Outside [guidance_start, guidance_end] the unit adds nothing.
    """

    def __init__(self, controlnet: Any, condition: torch.Tensor, *, weight: float, guidance_start: float,
                 guidance_end: float, total_steps: int, control_type: int | None = None) -> None:
        self.controlnet = controlnet
        self.condition = condition
        self.control_type = control_type
        self.weight = weight
        self.guidance_start = guidance_start
        self.guidance_end = guidance_end
        self.total_steps = max(1, total_steps)
        self.calls = 0

    def active(self, step: int) -> bool:
        fraction = step / self.total_steps
        return self.weight > 0 and self.guidance_start <= fraction <= self.guidance_end

    def unet_kwargs(self, step: int, latent_input: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> dict[str, Any]:
        from aipaint.plugin.kit.controlnets import transformer_controlnet_kwargs

        if not self.active(step):
            return {}
        self.calls += 1
        return transformer_controlnet_kwargs(self.controlnet, self.condition, self.weight, self.control_type)


def union_control_type(unit: UnitOptions, controlnet: Any, model: Any) -> tuple[int, str] | None:
    """The unit's control type as ``(index, name)`` for a union ControlNet (the family reads the
    value: ``controlnet_control_type``), None for a ControlNet of one type; a type given to a
    ControlNet of a family without union ControlNets is refused."""
    from . import models

    label = f"ControlNet {unit.index} union_control_type"
    transformer = models.is_transformer_controlnet(controlnet)
    choose = getattr(model, "controlnet_control_type", None) if transformer else None
    if choose is None:
        if unit.union_control_type is not None:
            raise InvalidParameter(label, unit.union_control_type,
                                   f"applies to union ControlNets only; {type(controlnet).__name__} on "
                                   f"{model.family} model {model.name!r} takes none: leave it unset")
        return None
    return choose(controlnet, unit.union_control_type, label)


def transformer_contributor(unit: UnitOptions, controlnet: Any, control: torch.Tensor, model: Any,
                            request: Any, control_type: int | None = None) -> TransformerControlNetContributor:
    """The contributor for a transformer family's ControlNet (balanced control mode only)."""
    import torch

    from aipaint.errors import UnsupportedFeature

    if unit.control_mode != BALANCED:
        raise UnsupportedFeature(
            f"ControlNet {unit.index} control_mode {unit.control_mode!r}: {model.family} ControlNets run only in "
            f"{BALANCED!r} mode (soft injection and conditional-only control are defined for UNet residuals)"
        )
    per_item = control if control.shape[0] == request.batch_size else control.expand(request.batch_size, -1, -1, -1)
    with torch.inference_mode():
        condition = model.controlnet_condition(controlnet, per_item)
    return TransformerControlNetContributor(
        controlnet, condition, weight=unit.weight, guidance_start=unit.guidance_start,
        guidance_end=unit.guidance_end, total_steps=int(request.steps), control_type=control_type,
    )


# --------------------------------------------------------------------------- infotext
# sd-webui-controlnet's entry, declared once for writing and for --from-png.
INFOTEXT = FieldsCodec(
    "ControlNet {index}",
    (
        Field("Module", "preprocessor"),
        Field("Model", "model"),
        Field("Weight", "weight", float),
        Field("Resize Mode", "resize_mode"),
        Field("Processor Res", None, write=str),
        Field("Threshold A", "threshold_a", float),
        Field("Threshold B", "threshold_b", float),
        Field("Guidance Start", "guidance_start", float),
        Field("Guidance End", "guidance_end", float),
        Field("Pixel Perfect", None),
        Field("Control Mode", "control_mode"),
        Field("Union Control Type", "union_control_type"),
    ),
    required=("model",),
)
# Without a control type (every ControlNet but a union one) the entry is sd-webui-controlnet's, as it was.
_INFOTEXT_ONE_TYPE = replace(INFOTEXT, fields=INFOTEXT.fields[:-1])


def infotext_entry(unit: UnitOptions, spec: PreprocessorSpec, model_display: str, width: int, height: int,
                   control_type: str | None = None) -> dict[str, str]:
    """One unit as sd-webui-controlnet writes it into PNG parameters: ``{"ControlNet <index>": text}``;
    a union ControlNet's control type (its name) ends the entry as ``Union Control Type: <name>``."""
    params = spec.resolve_params(unit.preprocessor_params)
    thresholds = [params[p.name] for p in spec.params] + [-1, -1]
    codec = INFOTEXT if control_type is not None else _INFOTEXT_ONE_TYPE
    return codec.write({
        "preprocessor": spec.name,
        "model": model_display,
        "weight": unit.weight,
        "resize_mode": unit.resize_mode,
        "Processor Res": min(width, height),
        "threshold_a": thresholds[0],
        "threshold_b": thresholds[1],
        "guidance_start": unit.guidance_start,
        "guidance_end": unit.guidance_end,
        "Pixel Perfect": True,
        "control_mode": unit.control_mode,
        "union_control_type": control_type,
    }, index=unit.index)


def units_from_params(params: Mapping[str, str]) -> list[dict[str, Any]]:
    """The ControlNet units recorded in PNG parameters, as unit options without images,
    in unit order. Accepts what sd-webui-controlnet writes (extra fields are ignored)."""
    return INFOTEXT.read(params)


# --------------------------------------------------------------------------- activation
@contextmanager
def activate(context: AdapterContext) -> Iterator[AdapterActivation]:
    """Load each unit's model, make its control maps, and add one contributor per unit."""
    from aipaint.plugin.adapters import AdapterActivation
    from aipaint.plugin.host import default_host

    from . import models

    request = context.request
    host = context.host or default_host()
    width, height = int(request.width), int(request.height)
    contributors: list[LoopContributor] = []
    infotext: dict[str, str] = {}
    for index, adapter_unit in enumerate(context.units):
        unit = UnitOptions.parse(adapter_unit.options, index, request.batch_size, request)
        spec = host.registry.preprocessors.get(unit.preprocessor)
        unit.check_keys(spec)
        maps = make_control_maps(unit, spec, width, height)  # before loading: bad images fail fast
        ref = models.resolve(unit.model, allow_pickle=unit.allow_pickle)
        controlnet = models.load(ref, context.model, config=unit.config, allow_pickle=unit.allow_pickle)
        control = control_tensor(maps).to(context.model.device, context.model.dtype)
        control_type = union_control_type(unit, controlnet, context.model)
        infotext.update(infotext_entry(unit, spec, ref.display_name, width, height,
                                       control_type[1] if control_type is not None else None))
        if models.is_transformer_controlnet(controlnet):  # check_fits made sure the family runs it
            contributors.append(transformer_contributor(unit, controlnet, control, context.model, request,
                                                        control_type[0] if control_type is not None else None))
            continue
        contributors.append(
            ControlNetContributor(
                controlnet,
                control,
                weight=unit.weight,
                guidance_start=unit.guidance_start,
                guidance_end=unit.guidance_end,
                control_mode=unit.control_mode,
                total_steps=int(request.steps),
                batch_size=request.batch_size,
                uses_cfg=float(request.cfg_scale) > 1.0,
            )
        )
    yield AdapterActivation(contributors=contributors, infotext=infotext)
