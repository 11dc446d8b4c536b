"""The built-in recipes: each an everyday job made of the installed plugins' steps.

Every recipe works through the public API only: ``aipaint.Pipeline``'s modes and the
post-processors by their registered names (``facefix``, ``face-restore``, ``upscale``,
``lineart``, ``sticker``, ``qr``), so a missing plugin is an ``UnknownName`` naming what is
installed, never an import error. Steps the recipes do themselves (cropping, denoising an old
photo, keeping its tones when colourising, typesetting, contact sheets) are plain image work.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from aipaint_plugins.recipes.registry import MAX_SEED, replace_images, single, with_steps
from PIL import Image

from aipaint.errors import AipaintWarning, InvalidParameter, UnsupportedFeature

if TYPE_CHECKING:
    from aipaint.api.result import Result
    from aipaint.pipeline import Pipeline

# Settings most recipes share. 0 (size) and "" (sampler) mean the model's own.
COMMON: dict[str, Any] = {"prompt": "", "negative_prompt": "", "seed": -1, "steps": 0, "cfg_scale": 0.0,
                          "sampler": "", "width": 0, "height": 0}
COMMON_RANGES: dict[str, tuple[float, float]] = {"seed": (-1, MAX_SEED), "steps": (0, 150), "cfg_scale": (0, 30),
                                                 "width": (0, 4096), "height": (0, 4096)}
COMMON_HELP = {"prompt": "what to paint", "negative_prompt": "what to keep out", "seed": "-1: a random one (recorded)",
               "steps": "sampling steps (0: the model's)", "cfg_scale": "how closely to follow the prompt (0: the model's)",
               "sampler": "a sampler name (aipaint samplers); empty: the model's", "width": "0: the model's size",
               "height": "0: the model's size"}
UPSCALE = {"upscale": 1.0, "upscaler": "Lanczos"}
UPSCALE_RANGES = {"upscale": (1, 8)}
UPSCALE_HELP = {"upscale": "final upscale factor (1: none)", "upscaler": "a pixel or model upscaler (aipaint upscale --list)"}

# Brand presets for the ad recipe: a palette, a mood and the words a brand keeps out.
BRANDS: dict[str, dict[str, Any]] = {
    "fresh": {"palette": ["#2e9e5b", "#ffffff", "#f5d547"], "mood": "bright, clean, energetic, natural light",
              "negative": "dark, gloomy, cluttered, text, watermark"},
    "luxury": {"palette": ["#111111", "#c9a227", "#f4efe6"], "mood": "elegant, minimal, premium, soft studio light",
               "negative": "cheap, busy, cartoon, neon, text, watermark"},
    "playful": {"palette": ["#ff4f79", "#3ec1d3", "#ffd23f"], "mood": "fun, bold, colourful, friendly",
                "negative": "dull, grey, corporate, text, watermark"},
    "tech": {"palette": ["#0b3d91", "#00c2ff", "#ffffff"], "mood": "modern, sleek, futuristic, crisp",
             "negative": "rustic, vintage, messy, text, watermark"},
}
AD_SHOTS = ("hero shot, centred", "close-up detail", "wide scene, lots of space", "flat lay, top view",
            "lifestyle scene", "minimal composition")


# --- shared steps --------------------------------------------------------------------------

def native_size(pipe: Pipeline) -> tuple[int, int]:
    """The loaded model's own picture size (its defaults; 512x512 for a model that declares none)."""
    defaults = getattr(pipe.model, "defaults", None)
    return (getattr(defaults, "width", 512) or 512, getattr(defaults, "height", 512) or 512)


def target_size(pipe: Pipeline, s: dict[str, Any]) -> tuple[int, int]:
    width, height = native_size(pipe)
    return s["width"] or width, s["height"] or height


def params(pipe: Pipeline, s: dict[str, Any], *, seed_offset: int = 0) -> dict[str, Any]:
    """The generation settings of a request: seed and size, and steps, CFG and sampler where given
    (0 and "" leave the model's own)."""
    width, height = target_size(pipe, s)
    out = {"seed": (s["seed"] + seed_offset) % (MAX_SEED + 1), "width": width, "height": height}
    if s["steps"]:
        out["steps"] = s["steps"]
    if s["cfg_scale"]:
        out["cfg_scale"] = s["cfg_scale"]
    if s["sampler"]:
        out["sampler"] = s["sampler"]
    return out


def chosen(s: dict[str, Any], *names: str) -> dict[str, Any]:
    """The settings among ``names`` the user set (0 and "" mean the model's own, so are left out)."""
    return {name: s[name] for name in names if s[name]}


def open_input(value: Any, name: str) -> Image.Image:
    """An input image (a path or a PIL image) as RGB; a missing one is an error naming the setting."""
    if value is None or value == "":
        raise InvalidParameter(name, None, "is required: give the picture to work on", f"{name}=PATH")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    from aipaint.plugin.kit.diffusion import open_image

    return open_image(value)


def cover_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` cropped to ``size``'s aspect around its centre, then resized to ``size``."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    crop_w, crop_h = round(width / scale), round(height / scale)
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.Resampling.LANCZOS)


def styled(pipe: Pipeline, s: dict[str, Any], prompt: str, negative: str) -> tuple[str, str]:
    """``prompt`` with the saved style ``s["style"]`` (plugins' styles and the user's styles file)."""
    if not s.get("style"):
        return prompt, negative
    from aipaint.plugin.kit.folders import aipaint_home
    from aipaint.prompt.styles import apply_styles, load_styles, merged_styles

    path = Path(s.get("styles_file") or os.environ.get("AIPAINT_STYLES_FILE") or aipaint_home() / "styles.csv")
    user = load_styles(path) if path.is_file() else {}
    return apply_styles(prompt, negative, [s["style"]], merged_styles(user, pipe.host, f"styles file {path.name!r}"))


def upscale_step(s: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("upscale", {"upscaler": s["upscaler"], "scale": s["upscale"]})] if s["upscale"] > 1 else []


def post(result: Result, pipe: Pipeline, steps: list[tuple[str, dict[str, Any]]]) -> Result:
    """The post-processors ``steps`` (by registered name) on every picture of ``result``."""
    if not steps:
        return result
    from aipaint.engine.postprocessing import postprocess_result

    return postprocess_result(result, steps, pipe)


def on_picture(pipe: Pipeline, image: Image.Image, steps: list[tuple[str, dict[str, Any]]],
               prompt: str, negative: str, seed: int, what: str) -> Result:
    """The post-processors ``steps`` on a bare picture, as a one-image :class:`Result`."""
    from aipaint.engine.postprocessing import run_postprocessors
    from aipaint.infotext import Infotext
    from aipaint.plugin.postprocess import merge_infotext

    started = time.perf_counter()
    info: dict[str, str] = {"Seed": str(seed)}
    if steps:
        output = run_postprocessors(image, steps, pipe)
        image, info = output.image, {**info, **output.infotext}
    text = merge_infotext(Infotext(prompt, negative, {}).to_text(), info)
    return single([image], [text], [seed], None, {what: time.perf_counter() - started})


def name_of(step: tuple[str, dict[str, Any]]) -> str:
    name, options = step
    shown = {k: v for k, v in options.items() if k not in ("prompt", "negative_prompt", "seed", "steps", "cfg_scale")}
    return f"{name}({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else name


def face_steps(s: dict[str, Any], prompt: str) -> list[tuple[str, dict[str, Any]]]:
    """ADetailer face fix (a face inpainted again) and, with restorer weights, face restoration."""
    steps: list[tuple[str, dict[str, Any]]] = []
    if s.get("face_fix", True):
        steps.append(("facefix", {"prompt": s.get("face_prompt") or prompt, "denoising_strength": s["face_strength"],
                                  "seed": s["seed"], **chosen(s, "steps", "cfg_scale", "sampler")}))
    if s.get("restorer"):
        steps.append(("face-restore", {"restorer": s["restorer"]}))
    return steps


# --- the recipes -----------------------------------------------------------------------------

def avatar(pipe: Pipeline, s: dict[str, Any]) -> Result:
    size = target_size(pipe, s)
    portrait = cover_crop(open_input(s["image"], "image"), size)
    prompt, negative = styled(pipe, s, s["prompt"], s["negative_prompt"])
    result = pipe.img2img(portrait, prompt, negative, denoising_strength=s["denoising_strength"], **params(pipe, s))
    chain = face_steps(s, prompt) + upscale_step(s)
    result = post(result, pipe, chain)
    return with_steps(result, ["crop square", f"img2img(strength={s['denoising_strength']})"] + [name_of(c) for c in chain])


def character(pipe: Pipeline, s: dict[str, Any]) -> Result:
    if not s["character"].strip():
        raise InvalidParameter("character", s["character"], "is required: describe the character once",
                               'character="a small red robot with round eyes"')
    if not s["scenes"]:
        raise InvalidParameter("scenes", s["scenes"], "must name at least one scene", 'scenes="in a park;at the beach"')
    if s["reference"]:
        adapter = s["reference_adapter"]
        if adapter not in pipe.host.registry.adapters:
            raise UnsupportedFeature(
                f"a reference image needs a reference-image adapter ({adapter!r}), and none is installed; "
                "keep the character with a LoRA instead: lora=NAME (train one with aipaint train lora)")
    tag = f" <lora:{s['lora']}:{s['lora_weight']:g}>" if s["lora"] else ""
    if not tag and not s["reference"]:
        import warnings

        warnings.warn("character: no lora or reference given, so only the description and the shared seed keep "
                      "the character the same across scenes", AipaintWarning, stacklevel=2)
    options = {"lora": {"folder": s["lora_dir"]}} if s["lora_dir"] else {}
    adapters = ()
    if s["reference"]:
        from aipaint.plugin.adapters import AdapterUnit

        unit = {"image": open_input(s["reference"], "reference"), "weight": s["reference_weight"]}
        if s["reference_mode"]:
            unit["mode"] = s["reference_mode"]
        adapters = (AdapterUnit(s["reference_adapter"], unit),)
    images, infotexts, seeds, first = [], [], [], None
    for scene in s["scenes"]:
        prompt = f"{s['character']}, {scene}{tag}"
        result = pipe.txt2img(prompt, s["negative_prompt"], options=options, adapters=adapters, **params(pipe, s))
        result = post(result, pipe, upscale_step(s))
        first = first or result
        images += result.images
        infotexts += result.infotexts
        seeds += result.seeds
    steps = [f"txt2img x{len(s['scenes'])} scenes, one seed" + (f", LoRA {s['lora']}" if s["lora"] else "")
             + (f", reference via {s['reference_adapter']}" if s["reference"] else "")]
    return with_steps(single(images, infotexts, seeds, first.request), steps + [name_of(c) for c in upscale_step(s)])


def lineart(pipe: Pipeline, s: dict[str, Any]) -> Result:
    if not s["prompt"].strip():
        raise InvalidParameter("prompt", s["prompt"], "is required: say what the drawing shows and its colours")
    drawing = cover_crop(open_input(s["image"], "image"), target_size(pipe, s))
    colour = ("lineart", {"prompt": s["prompt"], "negative_prompt": s["negative_prompt"], "seed": s["seed"],
                          **chosen(s, "steps", "cfg_scale", "sampler"), "denoising_strength": s["denoising_strength"],
                          "controlnet": s["controlnet"]})
    chain = [colour] + upscale_step(s)
    result = on_picture(pipe, drawing, chain, s["prompt"], s["negative_prompt"], s["seed"], "lineart")
    return with_steps(result, ["fit to size"] + [name_of(c) for c in chain])


def stylize(pipe: Pipeline, s: dict[str, Any]) -> Result:
    picture = cover_crop(open_input(s["image"], "image"), target_size(pipe, s))
    prompt, negative = styled(pipe, s, s["prompt"], s["negative_prompt"])
    if not prompt.strip():
        raise InvalidParameter("prompt", s["prompt"], "is required (or a style=NAME that gives one)")
    result = pipe.img2img(picture, prompt, negative, denoising_strength=s["denoising_strength"], **params(pipe, s))
    result = post(result, pipe, upscale_step(s))
    return with_steps(result, ["fit to size", f"img2img(strength={s['denoising_strength']}"
                               + (f", style={s['style']}" if s["style"] else "") + ")"] + [name_of(c) for c in upscale_step(s)])


def denoise(image: Image.Image, strength: float) -> Image.Image:
    """OpenCV's non-local means (colour): film grain and scan noise out, edges kept."""
    if strength <= 0:
        return image
    import cv2

    array = cv2.fastNlMeansDenoisingColored(np.asarray(image.convert("RGB")), None, strength, strength, 7, 21)
    return Image.fromarray(array)


def keep_tones(original: Image.Image, coloured: Image.Image) -> Image.Image:
    """The colours of ``coloured`` under the tones (luma) of ``original``: colourising never moves a
    photo's light and shade."""
    luma = original.convert("YCbCr").resize(coloured.size, Image.Resampling.LANCZOS).getchannel("Y")
    _, cb, cr = coloured.convert("YCbCr").split()
    return Image.merge("YCbCr", (luma, cb, cr)).convert("RGB")


def old_photo(pipe: Pipeline, s: dict[str, Any]) -> Result:
    photo = cover_crop(open_input(s["image"], "image"), target_size(pipe, s))
    names = []
    photo = denoise(photo, s["denoise"])
    if s["denoise"] > 0:
        names.append(f"denoise(h={s['denoise']:g})")
    prompt = s["prompt"] or "an old photograph, restored, sharp, clear faces"
    if s["colourise"]:
        coloured = pipe.img2img(photo, s["colour_prompt"], s["negative_prompt"],
                                denoising_strength=s["colour_strength"], **params(pipe, s)).image
        photo = keep_tones(photo, coloured)
        names.append(f"colourise(img2img strength={s['colour_strength']}, tones kept)")
    chain = face_steps(s, prompt) + upscale_step(s)
    result = on_picture(pipe, photo, chain, prompt, s["negative_prompt"], s["seed"], "old-photo")
    return with_steps(result, ["fit to size"] + names + [name_of(c) for c in chain])


def retouch(pipe: Pipeline, s: dict[str, Any]) -> Result:
    picture = open_input(s["image"], "image")
    mask = open_input(s["mask"], "mask").convert("L")
    if mask.size != picture.size:
        raise InvalidParameter("mask", f"{mask.width}x{mask.height}", f"must be the picture's size ({picture.width}x{picture.height})")
    if not np.asarray(mask).any():
        raise InvalidParameter("mask", "(all black)", "has nothing to repaint: paint the part to change white")
    if not s["prompt"].strip():
        raise InvalidParameter("prompt", s["prompt"], "is required: say what the masked part should show")
    fit = target_size(pipe, s) if s["width"] or s["height"] else None
    kwargs = params(pipe, s)
    if fit is None:
        kwargs.pop("width"), kwargs.pop("height")  # the picture's own size
    result = pipe.inpaint(picture, mask, s["prompt"], s["negative_prompt"], denoising_strength=s["denoising_strength"],
                          mask_blur=s["mask_blur"], inpaint_full_res=s["only_masked"], **kwargs)
    result = post(result, pipe, upscale_step(s))
    return with_steps(result, [f"inpaint(strength={s['denoising_strength']}, blur={s['mask_blur']}"
                               + (", only masked" if s["only_masked"] else "") + ")"] + [name_of(c) for c in upscale_step(s)])


def hex_rgb(colour: str) -> tuple[int, int, int]:
    from PIL import ImageColor

    try:
        return ImageColor.getrgb(colour)[:3]
    except ValueError:
        raise InvalidParameter("palette", colour, "must hold colour names or #rrggbb values") from None


def brand_preset(s: dict[str, Any]) -> dict[str, Any]:
    """The brand: a preset by name or a JSON file, with the settings given over it."""
    import json

    preset: dict[str, Any] = {"palette": [], "mood": "", "negative": ""}
    brand = s["brand"]
    if brand and Path(brand).suffix.lower() == ".json":
        try:
            loaded = json.loads(Path(brand).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidParameter("brand", brand, f"cannot be read as a JSON brand file ({exc})") from None
        if not isinstance(loaded, dict):
            raise InvalidParameter("brand", brand, "must hold a JSON object with palette, mood, negative")
        preset.update({k: loaded[k] for k in ("palette", "mood", "negative") if k in loaded})
    elif brand:
        if brand not in BRANDS:
            from aipaint.errors import UnknownName

            raise UnknownName("brand", brand, [*BRANDS, "(a .json file with palette, mood, negative)"])
        preset.update(BRANDS[brand])
    for key in ("palette", "mood", "negative"):
        if s[key]:
            preset[key] = s[key]
    if not isinstance(preset["palette"], list) or not all(isinstance(c, str) for c in preset["palette"]):
        raise InvalidParameter("palette", preset["palette"], "must be a list of colours")
    for colour in preset["palette"]:
        hex_rgb(colour)
    return preset


def colour_words(palette: list[str]) -> str:
    """A palette as words a text encoder knows: each colour's nearest basic colour name."""
    names = {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128), "red": (220, 30, 30),
             "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 160, 70), "blue": (30, 70, 200),
             "cyan": (40, 200, 230), "purple": (130, 50, 160), "pink": (250, 110, 160), "brown": (120, 75, 35),
             "gold": (200, 160, 40), "navy": (15, 40, 110), "cream": (245, 238, 225)}
    words = []
    for colour in palette:
        rgb = np.array(hex_rgb(colour))
        word = min(names, key=lambda n: float(np.sum((np.array(names[n]) - rgb) ** 2)))
        if word not in words:
            words.append(word)
    return " and ".join(words)


def ad(pipe: Pipeline, s: dict[str, Any]) -> Result:
    if not s["description"].strip():
        raise InvalidParameter("description", s["description"], "is required: what the ad shows")
    brand = brand_preset(s)
    parts = [s["description"], f"for {s['audience']}" if s["audience"] else "", brand["mood"],
             f"{colour_words(brand['palette'])} colour palette" if brand["palette"] else ""]
    base = ", ".join(p for p in parts if p)
    negative = ", ".join(p for p in (brand["negative"], s["negative_prompt"]) if p)
    images, infotexts, seeds, first = [], [], [], None
    for index in range(s["variants"]):
        shot = AD_SHOTS[index % len(AD_SHOTS)] if s["vary_shots"] else ""
        prompt = f"{base}, {shot}" if shot else base
        result = pipe.txt2img(prompt, negative, **params(pipe, s, seed_offset=index))
        result = post(result, pipe, upscale_step(s))
        first = first or result
        images += result.images
        infotexts += result.infotexts
        seeds += result.seeds
    steps = [f"brand({s['brand'] or 'custom'}: palette {', '.join(brand['palette'])}; mood {brand['mood']})",
             f"txt2img x{s['variants']} (seed +1 each" + (", shots varied)" if s["vary_shots"] else ")")]
    return with_steps(single(images, infotexts, seeds, first.request), steps + [name_of(c) for c in upscale_step(s)]
                      + ["contact sheet"])


def variations(pipe: Pipeline, s: dict[str, Any]) -> Result:
    picture = open_input(s["image"], "image")
    capabilities = getattr(pipe.model, "capabilities", frozenset())
    if "variations" in capabilities and s["method"] in ("auto", "image-prompt"):
        result = pipe.variations(picture, s["prompt"], s["negative_prompt"], batch_size=s["count"],
                                 **{k: v for k, v in params(pipe, s).items() if k not in ("width", "height")})
        how = f"image-prompt variations x{s['count']}"
    elif s["method"] == "image-prompt":
        raise UnsupportedFeature(f"{pipe.model.name if hasattr(pipe.model, 'name') else 'this model'} takes no image "
                                 "prompts; use method=img2img (or auto), or an unCLIP model")
    else:
        fitted = cover_crop(picture, target_size(pipe, s))
        result = pipe.img2img(fitted, s["prompt"], s["negative_prompt"], denoising_strength=s["denoising_strength"],
                              batch_size=s["count"], **params(pipe, s))
        how = f"img2img variations x{s['count']} (strength={s['denoising_strength']}, one seed each)"
    result = post(result, pipe, upscale_step(s))
    return with_steps(result, [how] + [name_of(c) for c in upscale_step(s)] + ["contact sheet"])


def sticker(pipe: Pipeline, s: dict[str, Any]) -> Result:
    if not s["prompt"].strip():
        raise InvalidParameter("prompt", s["prompt"], "is required: say what the sticker shows")
    prompt = f"{s['prompt']}, {s['look']}" if s["look"] else s["prompt"]
    result = pipe.txt2img(prompt, s["negative_prompt"], **params(pipe, s))
    cut = ("sticker", {"outline_width": s["outline_width"], "outline_colour": s["outline_colour"],
                       "tolerance": s["tolerance"]})
    chain = upscale_step(s) + [cut]
    result = post(result, pipe, chain)
    return with_steps(result, ["txt2img"] + [name_of(c) for c in chain])


def cover(pipe: Pipeline, s: dict[str, Any]) -> Result:
    from aipaint_plugins.recipes.layout import typeset_cover

    if not s["prompt"].strip():
        raise InvalidParameter("prompt", s["prompt"], "is required: say what the cover shows")
    if not s["title"].strip():
        raise InvalidParameter("title", s["title"], "is required: the cover's title")
    result = pipe.txt2img(s["prompt"], s["negative_prompt"], **params(pipe, s))
    result = post(result, pipe, upscale_step(s))
    typeset = [typeset_cover(image, s["title"], s["lines"], font=s["font"] or None, band=s["band"],
                             fraction=s["fraction"], colour=s["colour"]) for image in result.images]
    entries = {"Cover layout": f"{typeset[0].band}, box {','.join(map(str, typeset[0].box))}",
               "Cover font": typeset[0].font}
    result = replace_images(result, [t.image for t in typeset], entries)
    return with_steps(result, ["txt2img"] + [name_of(c) for c in upscale_step(s)]
                      + [f"typeset(title, {len(s['lines'])} lines, band={typeset[0].band})"])


def qr(pipe: Pipeline, s: dict[str, Any]) -> Result:
    if not s["payload"]:
        raise InvalidParameter("payload", s["payload"], "is required: the text or URL the code carries")
    if not s["prompt"].strip():
        raise InvalidParameter("prompt", s["prompt"], "is required: say what the art shows")
    result = pipe.txt2img(s["prompt"], s["negative_prompt"], **params(pipe, s))
    width = result.image.width
    scale = max(s["upscale"], s["min_size"] / width)
    chain = ([("upscale", {"upscaler": s["upscaler"], "scale": round(scale, 4)})] if scale > 1 else []) + [
        ("qr", {"payload": s["payload"], "safety": s["safety"]})]
    result = post(result, pipe, chain)
    return with_steps(result, ["txt2img"] + [name_of(c) if c[0] != "qr" else "qr(verified with real decoders)"
                                             for c in chain])


# --- what registers them -----------------------------------------------------------------------

FACE = {"face_fix": True, "face_strength": 0.4, "face_prompt": "", "restorer": ""}
FACE_RANGES = {"face_strength": (0.01, 1)}
FACE_HELP = {"face_fix": "inpaint faces again (ADetailer; no face found: untouched)",
             "face_strength": "face fix denoising strength", "face_prompt": "face fix prompt (default: the prompt)",
             "restorer": "face restoration weights (GFPGAN, CodeFormer; aipaint upscale --list), empty: none"}

RECIPES: list[dict[str, Any]] = [
    dict(name="avatar", run=avatar, summary="portrait photo -> stylised avatar: img2img in a style, face fix, upscale",
         inputs=("image",),
         defaults={"image": None, **COMMON, "prompt": "a stylised portrait, digital painting, vivid colours",
                   "style": "", "styles_file": "", "denoising_strength": 0.55, **FACE, **UPSCALE, "upscale": 2.0},
         ranges={**COMMON_RANGES, **FACE_RANGES, **UPSCALE_RANGES, "denoising_strength": (0.01, 1)},
         help={**COMMON_HELP, **FACE_HELP, **UPSCALE_HELP, "image": "the portrait", "style": "a saved style (aipaint styles)",
               "styles_file": "styles.csv (default: $AIPAINT_STYLES_FILE, else $AIPAINT_HOME/styles.csv)",
               "denoising_strength": "how far from the photo (0.3 close, 0.8 loose)"}),
    dict(name="character", run=character, sheet=True,
         summary="one character kept across scenes: a LoRA or a reference image, one seed for every scene",
         inputs=("reference",),
         defaults={**COMMON, "character": "", "scenes": ["standing, full body, plain background", "sitting, side view",
                                                        "walking outdoors"],
                   "lora": "", "lora_weight": 0.8, "lora_dir": "", "reference": None, "reference_adapter": "reference",
                   "reference_mode": "reference-only", "reference_weight": 0.7, **UPSCALE},
         ranges={**COMMON_RANGES, **UPSCALE_RANGES, "lora_weight": (-4, 4), "reference_weight": (0, 2)},
         help={**COMMON_HELP, **UPSCALE_HELP, "character": "the character, described once", "scenes": "one picture per scene",
               "lora": "a LoRA of the character (the LoRA folder)", "lora_weight": "its weight",
               "lora_dir": "the LoRA folder (default: the LoRA plugin's)", "reference": "a picture of the character",
               "reference_adapter": "the adapter that takes it",
               "reference_mode": "the adapter's mode (reference-only needs no weights; ip-adapter needs them)", "reference_weight": "its weight"}),
    dict(name="lineart", run=lineart, summary="line drawing -> coloured picture that keeps its lines",
         inputs=("image",),
         defaults={"image": None, **COMMON, "denoising_strength": 0.8, "controlnet": "auto", **UPSCALE},
         ranges={**COMMON_RANGES, **UPSCALE_RANGES, "denoising_strength": (0.01, 1)},
         help={**COMMON_HELP, **UPSCALE_HELP, "image": "the drawing (dark lines on light paper)",
               "denoising_strength": "how much paint", "controlnet": "auto, none or a lineart ControlNet's name"}),
    dict(name="stylize", run=stylize, summary="picture -> the same picture in another style (img2img)",
         inputs=("image",),
         defaults={"image": None, **COMMON, "style": "", "styles_file": "", "denoising_strength": 0.6, **UPSCALE},
         ranges={**COMMON_RANGES, **UPSCALE_RANGES, "denoising_strength": (0.01, 1)},
         help={**COMMON_HELP, **UPSCALE_HELP, "image": "the picture", "style": "a saved style (aipaint styles)",
               "styles_file": "styles.csv", "denoising_strength": "how far from the picture"}),
    dict(name="old-photo", run=old_photo,
         summary="old photo -> restored: denoise, optional colourise, face fix/restoration, upscale",
         inputs=("image",),
         defaults={"image": None, **COMMON, "denoise": 6.0, "colourise": False,
                   "colour_prompt": "a colour photograph, natural colours", "colour_strength": 0.45, **FACE,
                   **UPSCALE, "upscale": 2.0},
         ranges={**COMMON_RANGES, **FACE_RANGES, **UPSCALE_RANGES, "denoise": (0, 30), "colour_strength": (0.01, 1)},
         help={**COMMON_HELP, **FACE_HELP, **UPSCALE_HELP, "image": "the scanned photo",
               "denoise": "non-local-means strength (0: off)", "colourise": "add colour, keeping the photo's tones",
               "colour_prompt": "what colours to paint", "colour_strength": "colourising img2img strength"}),
    dict(name="retouch", run=retouch, summary="repaint the white part of a mask (inpaint), the rest untouched",
         inputs=("image", "mask"),
         defaults={"image": None, "mask": None, **COMMON, "denoising_strength": 0.75, "mask_blur": 4,
                   "only_masked": False, **UPSCALE},
         ranges={**COMMON_RANGES, **UPSCALE_RANGES, "denoising_strength": (0.01, 1), "mask_blur": (0, 64)},
         help={**COMMON_HELP, **UPSCALE_HELP, "image": "the picture", "mask": "white: repaint; black: keep",
               "denoising_strength": "how much to change", "mask_blur": "soft edge in px",
               "only_masked": "inpaint the masked area at full resolution", "width": "0: the picture's size",
               "height": "0: the picture's size"}),
    dict(name="ad", run=ad, sheet=True,
         summary="brand preset (palette, mood, negative words) + description + audience -> variants and a contact sheet",
         defaults={**COMMON, "description": "", "audience": "", "brand": "fresh", "palette": [], "mood": "",
                   "negative": "", "variants": 4, "vary_shots": True, **UPSCALE},
         ranges={**COMMON_RANGES, **UPSCALE_RANGES, "variants": (1, 16)},
         help={**COMMON_HELP, **UPSCALE_HELP, "description": "what the ad shows", "audience": "who it speaks to",
               "brand": f"a preset ({', '.join(BRANDS)}) or a .json file with palette, mood, negative",
               "palette": "colours over the preset's (a;b;c)", "mood": "mood words over the preset's",
               "negative": "words to keep out, over the preset's", "variants": "how many pictures",
               "vary_shots": "vary the framing between variants"}),
    dict(name="variations", run=variations, sheet=True,
         summary="picture -> pictures like it (image prompts where the model takes them, else img2img over seeds)",
         inputs=("image",),
         defaults={"image": None, **COMMON, "count": 4, "method": "auto", "denoising_strength": 0.6, **UPSCALE},
         ranges={**COMMON_RANGES, **UPSCALE_RANGES, "count": (1, 16), "denoising_strength": (0.01, 1)},
         help={**COMMON_HELP, **UPSCALE_HELP, "image": "the picture", "count": "how many",
               "method": "auto, image-prompt (unCLIP) or img2img", "denoising_strength": "img2img: how far from it"}),
    dict(name="sticker", run=sticker, summary="prompt -> die-cut sticker: generated, cut out, outlined, transparent",
         defaults={**COMMON, "look": "sticker, flat colours, on a white background", "outline_width": 8,
                   "outline_colour": "white", "tolerance": 40.0, **UPSCALE},
         ranges={**COMMON_RANGES, **UPSCALE_RANGES, "outline_width": (0, 512), "tolerance": (0, 442)},
         help={**COMMON_HELP, **UPSCALE_HELP, "look": "words added to the prompt", "outline_width": "px",
               "outline_colour": "a name, #rrggbb or r,g,b", "tolerance": "background colour tolerance"}),
    dict(name="cover", run=cover, summary="prompt + title + lines -> a cover, the type set where the subject is not",
         defaults={**COMMON, "title": "", "lines": [], "font": "", "band": "auto", "fraction": 0.4, "colour": "auto",
                   **UPSCALE, "upscale": 2.0},
         ranges={**COMMON_RANGES, **UPSCALE_RANGES, "fraction": (0.1, 0.6)},
         help={**COMMON_HELP, **UPSCALE_HELP, "title": "the title", "lines": "smaller lines under it (a;b)",
               "font": "a .ttf/.otf file (default: the system's sans, else Pillow's)",
               "band": "auto (where the subject is not), top, bottom, left or right",
               "fraction": "the text band's share of the picture", "colour": "auto (black or white) or a colour"}),
    dict(name="qr", run=qr, summary="payload + prompt -> QR-code art that real decoders read",
         defaults={**COMMON, "payload": "", "min_size": 256, "safety": 0.1, **UPSCALE},
         ranges={**COMMON_RANGES, **UPSCALE_RANGES, "min_size": (64, 4096), "safety": (0, 0.9)},
         help={**COMMON_HELP, **UPSCALE_HELP, "payload": "the text or URL", "min_size": "upscale to at least this (px)",
               "safety": "code contribution above the least that decodes"}),
]


def register_builtin(register: Callable[..., None]) -> None:
    for recipe in RECIPES:
        register(**recipe)


__all__ = ["BRANDS", "RECIPES", "register_builtin"]
