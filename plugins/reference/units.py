"""Reference units: validated options, the reference image, the job's activation, infotext.

A unit is ``AdapterUnit("reference", {...})``; its options follow sd-webui-controlnet's unit
where they mean the same thing:

==================  =======================================================================
``image``           the reference: PIL image, path or HWC uint8 array (required)
``mode``            ``reference-only`` (default), ``reference-adain``, ``reference-adain+attn``
                    (no weights), or ``ip-adapter``; ``module`` is accepted too, with
                    sd-webui-controlnet's names (``reference_only``, ``ip-adapter_clip_sd15``, …)
``weight``          0–2, default 1. reference-only: which self-attention layers take part
                    (sd-webui-controlnet's rule: widest first, all at 1); IP-Adapter: the
                    scale of its image attention
``style_fidelity``  reference-only, 0–1, default 0.5 (``threshold_a`` is accepted too)
``control_mode``    ``Balanced`` (default), ``My prompt is more important`` (fidelity 0),
                    ``ControlNet is more important`` (fidelity 1), as sd-webui-controlnet
``guidance_start``  fraction of the steps where the unit starts, default 0
``guidance_end``    fraction of the steps where it stops, default 1
``model``           IP-Adapter weights: a name in the IP-Adapter folder, a path, or
                    ``h94/IP-Adapter/<file>`` on the Hugging Face Hub (default: the plain
                    adapter for the model's text width, SD 1.5 or SDXL)
``image_encoder``   IP-Adapter's CLIP vision encoder: a diffusers folder, a name in the
                    IP-Adapter folder, or ``h94/IP-Adapter/<folder>`` (default: the one the
                    adapter was trained with)
==================  =======================================================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import ImageError, InvalidParameter
from aipaint.plugin.kit.codecs import Field, FieldsCodec

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from aipaint.engine.loop import LoopContributor
    from aipaint.plugin.adapters import AdapterActivation, AdapterContext

REFERENCE_ONLY, REFERENCE_ADAIN, REFERENCE_ADAIN_ATTN = "reference-only", "reference-adain", "reference-adain+attn"
IP_ADAPTER = "ip-adapter"
WEIGHT_FREE = (REFERENCE_ONLY, REFERENCE_ADAIN, REFERENCE_ADAIN_ATTN)
MODES: dict[str, str] = {
    "reference-only": REFERENCE_ONLY, "reference_only": REFERENCE_ONLY, "reference": REFERENCE_ONLY,
    "reference-adain": REFERENCE_ADAIN, "reference_adain": REFERENCE_ADAIN,
    "reference-adain+attn": REFERENCE_ADAIN_ATTN, "reference_adain+attn": REFERENCE_ADAIN_ATTN,
    "ip-adapter": IP_ADAPTER, "ip_adapter": IP_ADAPTER, "ipadapter": IP_ADAPTER,
    # sd-webui-controlnet's IP-Adapter preprocessor names: the CLIP encoder is picked from the weights here
    "ip-adapter_clip_sd15": IP_ADAPTER, "ip-adapter_clip_sdxl": IP_ADAPTER,
    "ip-adapter_clip_sdxl_plus_vith": IP_ADAPTER, "ip-adapter-auto": IP_ADAPTER,
}
BALANCED, PROMPT, CONTROL = "Balanced", "My prompt is more important", "ControlNet is more important"
CONTROL_MODES: dict[str, str] = {
    "balanced": BALANCED, "0": BALANCED,
    "my prompt is more important": PROMPT, "prompt": PROMPT, "1": PROMPT,
    "controlnet is more important": CONTROL, "reference is more important": CONTROL, "control": CONTROL,
    "reference": CONTROL, "2": CONTROL,
}
UNIT_KEYS = ("image", "mode", "module", "weight", "style_fidelity", "threshold_a", "control_mode", "guidance_start",
             "guidance_end", "model", "image_encoder")


def _number(index: int, name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, str):
        try:
            value = float(value) if len(value) <= 64 else value
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise InvalidParameter(f"Reference {index} {name}", value, f"must be a number from {lo:g} to {hi:g}")
    return float(value)


def _choice(index: int, name: str, value: Any, table: Mapping[str, str]) -> str:
    key = str(value).strip().lower()
    if key not in table:
        allowed = ", ".join(repr(v) for v in dict.fromkeys(table.values()))
        raise InvalidParameter(f"Reference {index} {name}", value, f"must be one of {allowed}")
    return table[key]


def load_image(value: Any, what: str) -> Image.Image:
    """An RGB PIL image from a PIL image, a path or an HWC/HW uint8 array."""
    import numpy as np
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (str, Path)):
        from aipaint.imageutil import read_image_file

        return read_image_file(value, f"the {what}").convert("RGB")
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
        return Image.fromarray(value).convert("RGB")
    raise ImageError(f"the {what} must be a PIL image, a path or a uint8 array, not {type(value).__name__}")


def image_hash(image: Image.Image) -> str:
    """The first 10 hex digits of the sha256 of the reference's RGB pixels and size (recorded in the PNG)."""
    digest = hashlib.sha256(f"{image.width}x{image.height}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:10]


@dataclass(frozen=True)
class ReferenceUnit:
    """One unit's options, validated (see the module docstring)."""

    index: int
    image: Image.Image
    mode: str = REFERENCE_ONLY
    weight: float = 1.0
    style_fidelity: float = 0.5
    control_mode: str = BALANCED
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    model: Any = None
    image_encoder: Any = None

    @classmethod
    def parse(cls, options: Mapping[str, Any], index: int) -> ReferenceUnit:
        options = dict(options)
        unknown = [k for k in options if k not in UNIT_KEYS]
        if unknown:
            raise InvalidParameter(f"Reference {index} option", unknown[0], f"valid options are {', '.join(UNIT_KEYS)}")
        if "mode" in options and "module" in options:
            raise InvalidParameter(f"Reference {index} mode", options["module"], "given twice, as 'mode' and 'module'")
        if "style_fidelity" in options and "threshold_a" in options:
            raise InvalidParameter(f"Reference {index} style_fidelity", options["threshold_a"],
                                   "given twice, as 'style_fidelity' and 'threshold_a'")
        if options.get("image") is None:
            raise InvalidParameter(f"Reference {index} image", None, "is required: the reference image (PIL image or path)")
        unit = cls(
            index=index,
            image=load_image(options["image"], f"reference {index} image"),
            mode=_choice(index, "mode", options.get("mode", options.get("module", REFERENCE_ONLY)), MODES),
            weight=_number(index, "weight", options.get("weight", 1.0), 0.0, 2.0),
            style_fidelity=_number(index, "style_fidelity", options.get("style_fidelity", options.get("threshold_a", 0.5)),
                                   0.0, 1.0),
            control_mode=_choice(index, "control_mode", options.get("control_mode", BALANCED), CONTROL_MODES),
            guidance_start=_number(index, "guidance_start", options.get("guidance_start", 0.0), 0.0, 1.0),
            guidance_end=_number(index, "guidance_end", options.get("guidance_end", 1.0), 0.0, 1.0),
            model=options.get("model") or None,
            image_encoder=options.get("image_encoder") or None,
        )
        if unit.guidance_start > unit.guidance_end:
            raise InvalidParameter(f"Reference {index} guidance_start", unit.guidance_start,
                                   f"must not exceed guidance_end ({unit.guidance_end:g})")
        if unit.mode in WEIGHT_FREE and (unit.model is not None or unit.image_encoder is not None):
            raise InvalidParameter(f"Reference {index} model", unit.model or unit.image_encoder,
                                   f"{unit.mode} uses no weights; give 'model'/'image_encoder' with mode 'ip-adapter'")
        return unit

    @property
    def effective_fidelity(self) -> float:
        """sd-webui-controlnet's rule: the control mode overrides the style fidelity."""
        return {PROMPT: 0.0, CONTROL: 1.0}.get(self.control_mode, self.style_fidelity)


# sd-webui-controlnet writes its units as "ControlNet N"; a reference has its own entry so that
# a ControlNet reader does not take it for a unit with a model to load.
INFOTEXT = FieldsCodec(
    "Reference {index}",
    (
        Field("Mode", "mode"),
        Field("Weight", "weight", float),
        Field("Style Fidelity", "style_fidelity", float),
        Field("Control Mode", "control_mode"),
        Field("Guidance Start", "guidance_start", float),
        Field("Guidance End", "guidance_end", float),
        Field("Model", "model"),
        Field("Image Encoder", "image_encoder"),
        Field("Image hash", None),
    ),
    required=("mode",),
)


def infotext_entry(unit: ReferenceUnit, model: str = "None", image_encoder: str = "None") -> dict[str, str]:
    return INFOTEXT.write({
        "mode": unit.mode, "weight": unit.weight, "style_fidelity": unit.style_fidelity,
        "control_mode": unit.control_mode, "guidance_start": unit.guidance_start, "guidance_end": unit.guidance_end,
        "model": model, "image_encoder": image_encoder, "Image hash": image_hash(unit.image),
    }, index=unit.index)


def units_from_params(params: Mapping[str, str]) -> list[dict[str, Any]]:
    """The reference units a PNG's parameters record, without their images (PNGs do not store them)."""
    found = []
    for options in INFOTEXT.read(params):
        for key in ("model", "image_encoder"):
            if options.get(key) in ("None", ""):
                options.pop(key, None)
        found.append(options)
    return found


def reference_latents(model: Any, image: Image.Image, width: int, height: int) -> torch.Tensor:
    """The reference covered and centre-cropped to the generation's size, encoded by the model's VAE."""
    import numpy as np
    import torch
    from PIL import ImageOps

    fitted = ImageOps.fit(image, (width, height), method=3)  # bicubic
    pixels = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        return model.encode(pixels)


@contextmanager
def activate(context: AdapterContext) -> Iterator[AdapterActivation]:
    """IP-Adapter units first (loading them replaces attention processors), then reference-only."""
    import torch

    from aipaint.plugin.adapters import AdapterActivation
    from aipaint.plugin.kit.patches import AttributePatches, check_patchable_unet

    from .attention import (
        AttentionState,
        ReferenceOnly,
        alphas_cumprod,
        install_adain_hooks,
        install_processors,
    )

    request = context.request
    units = [ReferenceUnit.parse(u.options, i) for i, u in enumerate(context.units)]
    model = context.model
    check_patchable_unet(model, "a reference image")
    only = [u for u in units if u.mode in WEIGHT_FREE]
    if len(only) > 1:
        raise InvalidParameter(f"Reference {only[1].index} mode", only[1].mode,
                               "only one weight-free (reference-only / reference-adain) unit per generation")
    contributors: list[LoopContributor] = []
    infotext: dict[str, str] = {}
    unet = model.unet
    with ExitStack() as stack:
        saved = dict(unet.attn_processors)
        stack.callback(unet.set_attn_processor, saved)
        adapters = [u for u in units if u.mode == IP_ADAPTER]
        if adapters:
            from .ip_adapter import activate_ip_adapters

            contributor, names = activate_ip_adapters(model, adapters, request, stack)
            contributors.append(contributor)
            for unit, (weights, encoder) in zip(adapters, names, strict=True):
                infotext.update(infotext_entry(unit, weights, encoder))
        for unit in only:
            state = AttentionState(attention=unit.mode != REFERENCE_ADAIN, adain=unit.mode != REFERENCE_ONLY,
                                   weight=unit.weight, style_fidelity=unit.effective_fidelity)
            processors: list[Any] = install_processors(unet, state) if state.attention else []
            if state.adain:
                hooks, handles = install_adain_hooks(unet, state)
                processors += hooks
                for handle in handles:
                    stack.callback(handle.remove)
            reference = reference_latents(model, unit.image, int(request.width), int(request.height))
            generator = torch.Generator("cpu").manual_seed((int(request.seed) * 7919 + 104729) % (2**63))
            contributor_only = ReferenceOnly(
                state=state, processors=processors, reference=reference, alphas=alphas_cumprod(model.scheduler_config),
                batch_size=int(request.batch_size), total_steps=int(request.steps), guidance_start=unit.guidance_start,
                guidance_end=unit.guidance_end, generator=generator,
            )
            patches = stack.enter_context(AttributePatches())
            patches.set(model, "unet_call", contributor_only.call_through(model.unet_call))
            contributors.append(contributor_only)
            infotext.update(infotext_entry(unit))
        yield AdapterActivation(contributors=contributors, infotext=infotext)
