"""A1111's "parameters" text: written into every PNG, and read back from any A1111 PNG.

The format, as the web UI writes it::

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

Values that contain a comma, a colon or a newline are JSON-quoted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aipaint.errors import InvalidParameter

# A1111 reads entries with findall() of  \s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)
# (modules/infotext_utils.py), which takes time quadratic in a line's length: a run of key
# characters without a colon after it is scanned again from each of its characters. Here the
# same pattern is tried only where a key can start, and a failed run is skipped whole, which
# finds the same entries in linear time (each part of the pattern can match a character in
# only one way, so a single try is linear too).
_ENTRY = re.compile(r'(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_WORD = re.compile(r"\w")
_SPACES = re.compile(r"\s*")
_KEY_REST = re.compile(r"[\w \-/]*")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_MAX_SIZE_DIGITS = 9  # int() of a long digit string takes quadratic time; no image is that wide


def _entries(line: str) -> list[tuple[str, str]]:
    """Every ``(key, value)`` A1111's pattern finds in a line (which holds no newline)."""
    found, position = [], 0
    while True:
        start = _WORD.search(line, position)
        if start is None:
            return found
        match = _ENTRY.match(line, start.start())
        if match is None:  # the key run has no colon after it (or is one character): nor has any later start in it
            position = _KEY_REST.match(line, start.start() + 1).end()
            continue
        found.append((match[1], match[2]))
        position = match.end()


def _entries_only(line: str) -> list[tuple[str, str]]:
    """The ``Key: value`` entries of a line that holds nothing else, or [] when anything else is in it."""
    found, position = [], 0
    while position < len(line):
        match = _ENTRY.match(line, _SPACES.match(line, position).end())
        if match is None:
            return []
        found.append((match[1], match[2]))
        position = match.end()
    return found


def quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass
class Infotext:
    prompt: str
    negative_prompt: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def to_text(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {quote(v)}" for k, v in self.params.items() if v is not None and v != ""))
        return "\n".join(lines)

    @classmethod
    def from_text(cls, text: str) -> Infotext:
        """Parse A1111 infotext. Never raises on odd input; unknown keys are kept.

        As in A1111, the last line holds the parameters when at least three entries are
        found in it (so a prompt such as "style: ink, sketch" stays a prompt). A text that
        starts with an empty prompt line says it has no prompt: there a last line made of
        nothing but entries is the parameters whatever their number (what a post-processor
        writes on an image without parameters). So is such a line after a prompt when it
        ends with aipaint's ``Version`` entry (a post-processor's record on a PNG that held
        only a prompt).
        """
        no_prompt = text.startswith(("\n", "\r\n"))
        lines = text.strip().split("\n")
        params: dict[str, str] = {}
        last = lines[-1] if lines else ""
        found = _entries(last)
        short = False  # fewer than three entries, taken as parameters all the same
        if len(found) < 3:
            entries = _entries_only(last)
            aipaint_record = len(lines) > 1 and any(k.strip() == "Version" and v.strip().startswith("aipaint ") for k, v in entries)
            if entries and (no_prompt or aipaint_record):
                found, short = entries, True
        if len(found) >= 3 or short:
            params = {k.strip(): unquote(v.strip()) for k, v in found}
            lines = lines[:-1]
        prompt_lines: list[str] = []
        negative_lines: list[str] = []
        in_negative = False
        for line in lines:
            if line.startswith("Negative prompt:"):
                in_negative = True
                line = line[len("Negative prompt:") :].lstrip()
            (negative_lines if in_negative else prompt_lines).append(line)
        return cls("\n".join(prompt_lines), "\n".join(negative_lines), params)

    def size(self) -> tuple[int, int] | None:
        """``Size`` as ``(width, height)``; None when absent or not ``WIDTHxHEIGHT`` (as in A1111).

        Raises :class:`~aipaint.errors.InvalidParameter` for a size with absurdly long numbers.
        """
        return _read_size("Size", self.params.get("Size", ""))


def _read_size(key: str, text: str) -> tuple[int, int] | None:
    match = _SIZE.match(text)
    if match is None:
        return None
    if len(match[1]) > _MAX_SIZE_DIGITS or len(match[2]) > _MAX_SIZE_DIGITS:
        raise InvalidParameter(key, text, f"must be WIDTHxHEIGHT in pixels, each number at most {_MAX_SIZE_DIGITS} digits")
    return int(match[1]), int(match[2])


def _read_number(key: str, text: str, kind: type) -> int | float:
    try:
        value = float(text)  # A1111 writes "20" but also "20.0"; float() is linear in the text's length
    except ValueError as exc:
        raise InvalidParameter(key, text, f"is not a valid {kind.__name__}") from exc
    if not math.isfinite(value):
        raise InvalidParameter(key, text, "must be a number; this one is infinite, NaN or too large for a float")
    return int(value) if kind is int else value


def build_params(values: Mapping[str, Any]) -> dict[str, str]:
    return {k: format_number(v) for k, v in values.items() if v is not None and v != ""}


def read_png_parameters(path: str | Path) -> str | None:
    """The ``parameters`` text of a PNG (A1111 writes a tEXt/iTXt chunk), or None."""
    from aipaint.imageutil import read_image_file

    value = read_image_file(path, "image").info.get("parameters")
    return str(value) if value is not None else None


_INFOTEXT_FIELDS: dict[str, tuple[str, type]] = {
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "Schedule type": ("schedule", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Clip skip": ("clip_skip", int),
    "Guidance rescale": ("guidance_rescale", float),
    "Skip Early CFG": ("skip_early_cfg", float),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Denoising strength": ("denoising_strength", float),
    "Resize mode": ("resize_mode", str),
    "Mask blur": ("mask_blur", int),
    "Masked content": ("inpainting_fill", str),
    "Masked area padding": ("inpaint_full_res_padding", int),
    "Outpaint left": ("outpaint_left", int),
    "Outpaint top": ("outpaint_top", int),
    "Outpaint right": ("outpaint_right", int),
    "Outpaint bottom": ("outpaint_bottom", int),
    "Outpaint fill": ("outpaint_fill", str),
}
# Keys whose presence with one value turns an option on.
_INFOTEXT_FLAGS: dict[str, tuple[str, str]] = {
    "Mask mode": ("inpainting_mask_invert", "Inpaint not masked"),
    "Inpaint area": ("inpaint_full_res", "Only masked"),
    "Img2img exact steps": ("img2img_exact_steps", "True"),
}


def generation_kwargs(info: Infotext) -> dict[str, Any]:
    """Request fields recorded in an infotext (what ``--from-png`` regenerates from).

    A1111 wrote samplers such as "DPM++ 2M Karras" before it had a separate schedule
    type; those are split here. An outpainted image's ``Size`` is the canvas it was painted
    on, which outpainting works out from the image and the ``Outpaint`` sides, so it gives
    no width and height.
    """
    kwargs: dict[str, Any] = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}
    for key, (name, kind) in _INFOTEXT_FIELDS.items():
        if key in info.params:
            value = info.params[key]
            kwargs[name] = value if kind is str else _read_number(key, value, kind)
    sampler = kwargs.get("sampler")
    if sampler and "schedule" not in kwargs:
        for schedule in ("Karras", "Exponential"):
            if sampler.endswith(" " + schedule):
                kwargs["sampler"], kwargs["schedule"] = sampler[: -len(schedule) - 1], schedule
    size = info.size()
    if size and not any(key.startswith("Outpaint ") for key in info.params):
        kwargs["width"], kwargs["height"] = size
    emphasis = info.params.get("Emphasis")
    if emphasis in ("No norm", "Original"):
        kwargs["emphasis"] = "none" if emphasis == "No norm" else "a1111"
    for key, (name, on) in _INFOTEXT_FLAGS.items():
        if key in info.params:
            kwargs[name] = info.params[key] == on
    resize_from = _read_size("Seed resize from", info.params.get("Seed resize from", ""))
    if resize_from:
        kwargs["seed_resize_from_w"], kwargs["seed_resize_from_h"] = resize_from
    return kwargs
