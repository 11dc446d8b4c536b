"""ADetailer-style face fix and model-based face restoration.

Face fix: detect faces → for each, a mask (the box, dilated) → crop the mask's box plus
padding at the inpaint size's aspect → inpaint the crop at that (higher) resolution with
its own prompt, strength and steps → scale back and paste through a mask feathered
inward. Pixels outside every face mask are returned unchanged, bit for bit.

Face restoration: a GFPGAN / CodeFormer / RestoreFormer model (weights through spandrel)
redraws each face crop at its native 512 px; the result is blended in with a visibility
(A1111's "GFPGAN visibility").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from aipaint_plugins.facefix.detect import DEFAULT_DETECTOR, Detection, detector_name, get_detector
from aipaint_plugins.facefix.masks import box_mask, crop_region, feather, mask_bbox, paste

from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.plugin.kit.diffusion import generation_settings, inpaint
from aipaint.plugin.kit.options import number, option_bool

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.pipeline import Pipeline

@dataclass(frozen=True)
class FaceFixSettings:
    """ADetailer's knobs, with its defaults (confidence 0.3, dilation 4, blur 4, padding 32, strength 0.4)."""

    detector: Any = DEFAULT_DETECTOR
    confidence: float = 0.3
    max_faces: int = 0  # 0: all
    mask_dilation: int = 4
    mask_blur: int = 4
    padding: int = 32
    denoising_strength: float = 0.4
    inpaint_width: int | None = None
    inpaint_height: int | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> FaceFixSettings:
        size = {}
        for name in ("inpaint_width", "inpaint_height"):
            if options.get(name) is not None:
                size[name] = number(options, name, 512, 16, 4096, integer=True)
                if size[name] % 8:
                    raise InvalidParameter(name, size[name], "must be a multiple of 8")
        return cls(
            detector=options.get("detector") or DEFAULT_DETECTOR,
            confidence=number(options, "confidence", 0.3, 0.0, 1.0),
            max_faces=number(options, "max_faces", 0, 0, 1000, integer=True),
            mask_dilation=number(options, "mask_dilation", 4, -512, 512, integer=True),
            mask_blur=number(options, "mask_blur", 4, 0, 256, integer=True),
            padding=number(options, "padding", 32, 0, 1024, integer=True),
            denoising_strength=number(options, "denoising_strength", 0.4, 0.0, 1.0, low_open=True),
            **size,
        )


@dataclass
class FaceFixReport:
    """What face fix did: the detections it acted on and each face's mask."""

    detections: list[Detection]
    masks: list[np.ndarray]

    @property
    def union(self) -> np.ndarray | None:
        return np.logical_or.reduce(self.masks) if self.masks else None


def detect_faces(image: Image.Image, detector: Any = DEFAULT_DETECTOR, confidence: float = 0.3,
                 max_faces: int = 0) -> tuple[list[Detection], str]:
    """Detections at or above ``confidence``, best first (at most ``max_faces`` when > 0)."""
    chosen = get_detector(detector)
    found = [d for d in chosen(image) if d.score >= confidence]
    found.sort(key=lambda d: -d.score)
    if max_faces:
        found = found[:max_faces]
    return found, detector_name(chosen)


def face_fix(
    pipe: Pipeline,
    image: Image.Image,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    *,
    request: Any = None,
    settings: FaceFixSettings | None = None,
    **params: Any,
) -> tuple[Image.Image, dict[str, str], FaceFixReport]:
    """Inpaint every detected face; returns (image, infotext entries, report).

    ``prompt``/``negative_prompt``/``params`` (steps, seed, cfg_scale, sampler, …) default to
    ``request``'s. With no face found the image comes back unchanged.
    """
    from PIL import Image

    settings = settings or FaceFixSettings()
    prompt_text, negative, gen = generation_settings(
        {"prompt": prompt, "negative_prompt": negative_prompt, **params}, request, what="face fix"
    )
    image = image.convert("RGB")
    detections, name = detect_faces(image, settings.detector, settings.confidence, settings.max_faces)
    info = {
        "ADetailer model": name,
        "ADetailer confidence": f"{settings.confidence:g}",
        "ADetailer dilate erode": str(settings.mask_dilation),
        "ADetailer mask blur": str(settings.mask_blur),
        "ADetailer denoising strength": f"{settings.denoising_strength:g}",
        "ADetailer inpaint only masked": "True",
        "ADetailer inpaint padding": str(settings.padding),
    }
    if prompt is not None:
        info["ADetailer prompt"] = prompt
    if negative_prompt is not None:
        info["ADetailer negative prompt"] = negative_prompt
    report = FaceFixReport(detections, [])
    if not detections:
        return image, info, report
    defaults = pipe.model.defaults
    inpaint_w = settings.inpaint_width or defaults.width
    inpaint_h = settings.inpaint_height or defaults.height
    if settings.inpaint_width or settings.inpaint_height:
        info["ADetailer use inpaint width height"] = "True"
        info["ADetailer inpaint width"] = str(inpaint_w)
        info["ADetailer inpaint height"] = str(inpaint_h)
    current = np.asarray(image).copy()
    for detection in detections:
        mask = box_mask(image.size, detection.box, settings.mask_dilation)
        bbox = mask_bbox(mask)
        if bbox is None:
            continue
        report.masks.append(mask)
        x0, y0, x1, y1 = crop_region(bbox, image.size, settings.padding, inpaint_w / inpaint_h)
        crop = Image.fromarray(current[y0:y1, x0:x1]).resize((inpaint_w, inpaint_h), Image.Resampling.LANCZOS)
        crop_mask = Image.fromarray(mask[y0:y1, x0:x1].astype(np.uint8) * 255).resize((inpaint_w, inpaint_h), Image.Resampling.NEAREST)
        result = inpaint(pipe, crop, crop_mask, prompt_text, negative, what="face fix",
                         denoising_strength=settings.denoising_strength, mask_blur=settings.mask_blur,
                         width=inpaint_w, height=inpaint_h, **gen)
        redrawn = np.asarray(result.images[0].convert("RGB").resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS))
        alpha = feather(mask[y0:y1, x0:x1], settings.mask_blur)
        current[y0:y1, x0:x1] = paste(current[y0:y1, x0:x1], redrawn, alpha)
    return Image.fromarray(current), info, report


# --- face restoration -------------------------------------------------------------------------

Restorer = Callable[[Any], Any]  # NCHW [0, 1] tensor at restore_size -> same


def load_restorer(name: str | Path, *, allow_pickle: bool = False, device: str = "cpu") -> tuple[Restorer, str]:
    """A face-restoration model by name (a file inside the upscaler folder, or a zoo id; never
    outside the folder), or an explicit weights file given as a :class:`~pathlib.Path`."""
    from aipaint.plugin.kit.image_models import load_image_model, resolve_weights

    path = resolve_weights(name, kind="face restorer")
    model = load_image_model(path, allow_pickle=allow_pickle, device=device)
    if model.purpose != "FaceSR":
        raise InvalidParameter(
            "restorer", name, f"is a {model.architecture} model for {model.purpose}, not face restoration",
            "give GFPGAN, CodeFormer or RestoreFormer weights",
        )
    return model, model.architecture


def restore_faces(
    image: Image.Image,
    restorer: Restorer | str | Path,
    *,
    visibility: float = 1.0,
    detector: Any = DEFAULT_DETECTOR,
    confidence: float = 0.3,
    max_faces: int = 0,
    mask_dilation: int = 4,
    mask_blur: int = 4,
    padding: int = 32,
    restore_size: int = 512,
    allow_pickle: bool = False,
) -> tuple[Image.Image, dict[str, str], FaceFixReport]:
    """Restore every detected face with a model and blend it in at ``visibility`` (0–1)."""
    import torch
    from PIL import Image

    from aipaint.plugin.kit.image_models import pil_to_tensor, tensor_to_pil

    visibility = number({"visibility": visibility}, "visibility", 1.0, 0.0, 1.0)
    if isinstance(restorer, (str, Path)):
        model, name = load_restorer(restorer, allow_pickle=allow_pickle)
    else:
        model, name = restorer, detector_name(restorer)
    image = image.convert("RGB")
    detections, _ = detect_faces(image, detector, confidence, max_faces)
    report = FaceFixReport(detections, [])
    current = np.asarray(image).copy()
    for detection in detections:
        mask = box_mask(image.size, detection.box, mask_dilation)
        bbox = mask_bbox(mask)
        if bbox is None:
            continue
        report.masks.append(mask)
        x0, y0, x1, y1 = crop_region(bbox, image.size, padding, 1.0)
        crop = Image.fromarray(current[y0:y1, x0:x1]).resize((restore_size, restore_size), Image.Resampling.LANCZOS)
        with torch.inference_mode():
            tensor = pil_to_tensor(crop)
            dtype = getattr(getattr(model, "descriptor", None), "dtype", torch.float32)
            out = model(tensor.to(dtype))
        restored = np.asarray(tensor_to_pil(out).resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS))
        alpha = feather(mask[y0:y1, x0:x1], mask_blur) * visibility
        current[y0:y1, x0:x1] = paste(current[y0:y1, x0:x1], restored, alpha)
    info = {"Face restoration": name, "Face restoration visibility": f"{visibility:g}"}
    return Image.fromarray(current), info, report


def _restorer_option(value: Any) -> Restorer | str | Path:
    """A callable or a Path (from Python code) as given; anything else is a name in the folder."""
    return value if callable(value) or isinstance(value, Path) else str(value)


def run_facefix(image: Image.Image, options: dict[str, Any], pipe: Pipeline | None) -> Any:
    """The ``facefix`` post-processor (ADetailer), optionally followed by restoration."""
    from aipaint.plugin.postprocess import PostProcessOutput

    if pipe is None:
        raise UnsupportedFeature("face fix inpaints faces with a model: load one, or use 'face-restore' with restorer weights")
    settings = FaceFixSettings.from_options(options)
    gen = {k: options[k] for k in ("steps", "cfg_scale", "sampler", "schedule", "seed", "clip_skip") if options.get(k) is not None}
    out, info, _ = face_fix(pipe, image, options.get("prompt"), options.get("negative_prompt"),
                            request=options.get("request"), settings=settings, **gen)
    if options.get("restorer"):
        out, extra, _ = restore_faces(
            out, _restorer_option(options["restorer"]), visibility=number(options, "restore_visibility", 1.0, 0.0, 1.0),
            detector=settings.detector, confidence=settings.confidence, max_faces=settings.max_faces,
            mask_dilation=settings.mask_dilation, mask_blur=settings.mask_blur, padding=settings.padding,
            allow_pickle=option_bool(options, "allow_pickle"),
        )
        info.update(extra)
    return PostProcessOutput(out, info)


def run_restore(image: Image.Image, options: dict[str, Any], pipe: Pipeline | None) -> Any:
    """The ``face-restore`` post-processor: restoration only, no diffusion model needed."""
    from aipaint.plugin.postprocess import PostProcessOutput

    if not options.get("restorer"):
        from aipaint.plugin.kit.image_models import upscaler_dir

        raise InvalidParameter("restorer", None, "face restoration needs weights",
                               f"put GFPGAN/CodeFormer/RestoreFormer weights in {upscaler_dir()} and pass restorer=NAME")
    settings = FaceFixSettings.from_options({k: v for k, v in options.items() if k in FaceFixSettings.__dataclass_fields__})
    out, info, _ = restore_faces(
        image, _restorer_option(options["restorer"]),
        visibility=number(options, "visibility", 1.0, 0.0, 1.0), detector=settings.detector,
        confidence=settings.confidence, max_faces=settings.max_faces, mask_dilation=settings.mask_dilation,
        mask_blur=settings.mask_blur, padding=settings.padding, allow_pickle=option_bool(options, "allow_pickle"),
    )
    return PostProcessOutput(out, info)

