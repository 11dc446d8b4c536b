"""Colouring a line drawing while keeping its lines.

The drawing is painted by a lineart ControlNet (``controlnet=NAME``, when the ControlNet
adapter is installed) or by img2img from the drawing itself. Then the lines are
*multiplied* back over the colours, as an inker's layer in multiply mode: the drawing's
paper (normalised to white) leaves the colours alone, its lines darken them to their own
darkness. So every line of the drawing is at least as dark in the result as in the input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from aipaint.errors import ImageError, UnsupportedFeature

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.pipeline import Pipeline


def line_layer(drawing: Image.Image, paper: float | None = None) -> np.ndarray:
    """The drawing as a multiply layer: float (H, W) in [0, 1], 1 on the paper, 0 on black lines.

    ``paper`` is the paper's grey level (0–255); by default the 90th percentile of the
    drawing's luminance, so off-white scans still count as white.
    """
    grey = np.asarray(drawing.convert("L"), dtype=np.float32)
    level = float(np.percentile(grey, 90)) if paper is None else float(paper)
    if level <= 0:
        raise ImageError("the line drawing is entirely black: expected dark lines on light paper")
    return np.clip(grey / level, 0.0, 1.0)


def multiply_lines(colours: Image.Image, drawing: Image.Image, paper: float | None = None) -> Image.Image:
    """``colours`` with the drawing's lines multiplied back over them."""
    from PIL import Image

    if colours.size != drawing.size:
        colours = colours.resize(drawing.size, Image.Resampling.LANCZOS)
    layer = line_layer(drawing, paper)
    out = np.asarray(colours.convert("RGB"), dtype=np.float32) * layer[..., None]
    return Image.fromarray(np.clip(np.floor(out), 0, 255).astype(np.uint8))


def colour_lineart(
    pipe: Pipeline,
    drawing: Image.Image,
    prompt: str,
    negative_prompt: str = "",
    *,
    denoising_strength: float = 0.8,
    controlnet: str | None = "auto",
    controlnet_weight: float = 1.0,
    paper: float | None = None,
    **params: Any,
) -> tuple[list[Image.Image], dict[str, str], Any]:
    """Colour ``drawing``; returns (images, infotext entries, the generation's Result).

    ``controlnet``: ``"auto"`` (default) uses an installed ControlNet whose name contains
    "lineart" and img2img when there is none (``Lineart`` in the PNG says which);
    ``None`` forces img2img; a name forces that ControlNet.
    """
    from PIL import Image, ImageOps

    from aipaint.plugin.kit.diffusion import choose_controlnet, img2img

    controlnet = choose_controlnet(pipe, controlnet, ("lineart", "line_art", "line-art"))
    drawing = drawing.convert("RGB")
    width, height = drawing.width - drawing.width % 8, drawing.height - drawing.height % 8
    if (width, height) != drawing.size:
        drawing = drawing.resize((width, height), Image.Resampling.LANCZOS)
    params = {"width": width, "height": height, **params}
    if controlnet:
        from aipaint.plugin.adapters import AdapterUnit

        if "controlnet" not in pipe.host.registry.adapters:
            raise UnsupportedFeature(f"controlnet={controlnet!r} needs the ControlNet adapter plugin, which is not installed")
        # Lineart ControlNets take white lines on black, as their preprocessors produce.
        unit = AdapterUnit("controlnet", {"model": controlnet, "image": ImageOps.invert(drawing), "weight": controlnet_weight})
        result = pipe.txt2img(prompt, negative_prompt, adapters=(unit,), **params)
        info = {"Lineart": f"controlnet {controlnet}, lines multiplied"}
    else:
        result = img2img(pipe, drawing, prompt, negative_prompt, what="line-art colouring",
                         denoising_strength=denoising_strength, **params)
        # Under its own key: in a post-processor chain, "Denoising strength" is the generation's.
        info = {"Lineart": "img2img, lines multiplied", "Lineart denoising strength": f"{denoising_strength:g}"}
    images = [multiply_lines(image, drawing, paper) for image in result.images]
    return images, info, result


LINEART_CONTROLNET_KEY = "Lineart ControlNet"
"""The post-processor's record of its ControlNet unit, written as the ControlNet adapter writes
its ``ControlNet 0``: under its own key, so that neither replaces a unit of the generation the
chain ran after, and ``--from-png`` does not take it for one."""


def run_lineart(image: Image.Image, options: dict[str, Any], pipe: Pipeline | None) -> Any:
    """The ``lineart`` post-processor: the incoming image is the drawing.

    Its output keeps the image's own parameters (the chain merges into them), so the colouring
    generation's ControlNet unit, recorded in that generation's parameters, is carried over
    under :data:`LINEART_CONTROLNET_KEY`.
    """
    from aipaint.infotext import Infotext
    from aipaint.plugin.kit.diffusion import generation_settings
    from aipaint.plugin.kit.options import number
    from aipaint.plugin.postprocess import PostProcessOutput

    if pipe is None:
        raise UnsupportedFeature("line-art colouring paints with a model: load one first")
    prompt, negative, params = generation_settings(options, options.get("request"), what="line-art colouring")
    images, info, result = colour_lineart(
        pipe, image, prompt, negative,
        denoising_strength=number(options, "denoising_strength", 0.8, 0.0, 1.0, low_open=True),
        controlnet=options.get("controlnet", "auto"),
        paper=None if options.get("paper") is None else number(options, "paper", 255, 1, 255),
        **params,
    )
    unit = Infotext.from_text(result.infotexts[0]).params.get("ControlNet 0")
    if unit is not None:
        info[LINEART_CONTROLNET_KEY] = unit
    return PostProcessOutput(images[0], info)
