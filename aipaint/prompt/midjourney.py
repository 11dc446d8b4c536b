"""A Midjourney-style front end: ``cat::2 dog::1 --ar 16:9 --no blur --seed 7``.

It rewrites the prompt into the A1111 language, so both front ends end in the same
:class:`ParsedPrompt`:

* ``a::w b::v`` multi-prompts become ``AND`` sub-prompts. As in Midjourney the weights are
  relative: they are divided by their sum (``cat::3 dog::1`` → ``cat :0.75 AND dog :0.25``),
  which keeps the total guidance at the request's ``cfg_scale``; the sum must be positive.
* ``--no a, b`` becomes the negative prompt; ``--ar W:H`` (or ``--aspect``) a width and
  height of about ``base_size²`` pixels in multiples of 8 (:meth:`MidjourneyPrompt.size_for`
  scales it to a model's default size instead); ``--seed N`` the seed; and ``--steps N``
  (an aipaint extension) the step count.
* Every other option raises :class:`UnsupportedPromptOption`, naming it and what to use instead.

A1111 syntax inside the text (emphasis, editing, ``<lora:…>``) passes through unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from aipaint.errors import AipaintError, InvalidParameter, shown
from aipaint.prompt.parser import ParsedPrompt, parse_negative_prompt, parse_prompt

__all__ = ["MidjourneyPrompt", "UnsupportedPromptOption", "parse_midjourney"]

SUPPORTED_OPTIONS = ("--ar", "--aspect", "--no", "--seed", "--steps")
MAX_SEED = 2**32 - 1

# Midjourney options aipaint cannot honour, with what to do instead.
_UNSUPPORTED_HINTS = {
    "chaos": "use different seeds (or a batch) for more varied results",
    "c": "use different seeds (or a batch) for more varied results",
    "stylize": "use cfg_scale instead (a lower cfg_scale follows the prompt less literally)",
    "s": "use cfg_scale instead (a lower cfg_scale follows the prompt less literally)",
    "quality": "use --steps N (or the steps parameter) to trade time for detail",
    "q": "use --steps N (or the steps parameter) to trade time for detail",
    "version": "choose the model with the model parameter",
    "v": "choose the model with the model parameter",
    "niji": "choose an anime-style model with the model parameter",
    "style": "describe the style in the prompt or add a style LoRA (<lora:name:weight>)",
    "weird": "there is no equivalent; describe the unusual look in the prompt or try another sampler",
    "w": "there is no equivalent; describe the unusual look in the prompt or try another sampler",
    "iw": "use img2img with denoising_strength instead of an image weight",
    "stop": "use fewer --steps instead",
    "repeat": "use a batch (batch_size, or --batch-size N on the command line) instead",
    "r": "use a batch (batch_size, or --batch-size N on the command line) instead",
    "seeds": "use --seed N",
    "sameseed": "use --seed N",
    "cref": "a link in the prompt is not fetched; pass the character's picture with --reference IMAGE (the reference "
    "plugin, docs/reference.md), train a LoRA of it, or start from the image with img2img",
    "sref": "a link in the prompt is not fetched; pass the style's picture with --reference IMAGE (the reference "
    "plugin, docs/reference.md), or add a style LoRA (<lora:name:weight>)",
    "tile": "seamless tiling is not available",
}


class UnsupportedPromptOption(AipaintError):
    """A Midjourney ``--option`` that aipaint has no equivalent for."""

    def __init__(self, option: str, hint: str) -> None:
        self.option = option
        self.hint = hint
        named = option if len(option) <= 40 else shown(option)  # an option name can be as long as the prompt
        super().__init__(f"the prompt option {named} is not supported: {hint}")


@dataclass(frozen=True)
class MidjourneyPrompt:
    """The Midjourney-style prompt, translated: ``prompt`` and ``negative`` are A1111 syntax.

    ``width`` and ``height`` are ``aspect`` at the ``base_size`` given to :func:`parse_midjourney`.
    """

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    aspect: tuple[int, int] | None = None

    def size_for(self, default_width: int, default_height: int) -> tuple[int, int]:
        """The size for a model whose default is ``default_width`` × ``default_height``: that
        size itself without ``--ar``, else the aspect ratio at about the same number of pixels."""
        if self.aspect is None:
            return default_width, default_height
        return aspect_size(*self.aspect, round(math.sqrt(default_width * default_height)))

    @property
    def parsed(self) -> ParsedPrompt:
        return parse_prompt(self.prompt)

    @property
    def parsed_negative(self) -> ParsedPrompt:
        return parse_negative_prompt(self.negative)


# "--name" or "—name" (phones turn "--" into an em dash, and Midjourney accepts it) at a word start.
_RE_OPTION = re.compile(r"(?:(?<=\s)|^)(?:--|\u2014)([A-Za-z][\w-]*)")
# "\d+(?:\.\d*)?" rather than "\d+\.?\d*": the latter splits a run of digits between its two
# quantifiers in every way before failing, quadratic in the run's length.
_RE_LEADING_WEIGHT = re.compile(r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))(?=\s|$)")
_RE_ASPECT = re.compile(r"(\d+)\s*:\s*(\d+)")
MAX_ASPECT = 10_000  # each side of --ar; beyond it the size is a strip of 8 pixels anyway


def _split_options(text: str) -> tuple[str, list[tuple[str, str]]]:
    matches = list(_RE_OPTION.finditer(text))
    if not matches:
        return text, []
    body = text[: matches[0].start()]
    options = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        options.append((match.group(1).lower(), text[match.end() : end].strip()))
    return body, options


def _multi_prompt(body: str) -> str:
    """``a::2 b::1`` → ``a :0.6667 AND b :0.3333``; a body without ``::`` is returned stripped."""
    parts = body.split("::")
    if len(parts) == 1:
        return body.strip()
    texts, weights = [parts[0]], []
    for part in parts[1:]:
        match = _RE_LEADING_WEIGHT.match(part)
        weights.append(float(match.group(1)) if match else 1.0)
        texts.append(part[match.end() :] if match else part)
    weights.append(1.0)  # the last text has no "::" after it
    pairs = [(t.strip(), w) for t, w in zip(texts, weights) if t.strip()]
    total = sum(w for _, w in pairs)
    if not pairs:
        return ""
    if total <= 0 or not math.isfinite(total):
        raise InvalidParameter(
            "prompt",
            body,
            "the ::weights of a multi-prompt must add up to a positive number",
            "to push a concept away use --no, or a small negative weight beside larger positive ones",
        )
    if len(pairs) == 1:
        return pairs[0][0]
    return " AND ".join(f"{text} :{round(weight / total, 4):g}" for text, weight in pairs)


def _in_range(digits: str, low: int, high: int) -> bool:
    # Digits are counted before int() converts them: int() of a long run takes quadratic time
    # and refuses more than 4300 digits with a ValueError.
    return bool(re.fullmatch(r"\d+", digits)) and len(digits.lstrip("0")) <= len(str(high)) and low <= int(digits) <= high


def _whole_number(option: str, value: str, low: int, high: int) -> int:
    if not _in_range(value, low, high):
        raise InvalidParameter(option, value, f"a whole number from {low} to {high}")
    return int(value)


def aspect_size(ratio_w: int, ratio_h: int, base_size: int = 512) -> tuple[int, int]:
    """Width and height in multiples of 8 with about ``base_size²`` pixels and the given aspect ratio."""
    width = math.sqrt(base_size * base_size * ratio_w / ratio_h)
    height = width * ratio_h / ratio_w
    return max(8, round(width / 8) * 8), max(8, round(height / 8) * 8)


def parse_midjourney(text: str, base_size: int = 512) -> MidjourneyPrompt:
    """Translate a Midjourney-style prompt. Raises :class:`UnsupportedPromptOption` or
    :class:`aipaint.errors.InvalidParameter` for options it cannot honour or read."""
    body, options = _split_options(text)
    negatives: list[str] = []
    found: dict[str, str] = {}
    width = height = seed = steps = aspect = None
    for name, value in options:
        option = f"--{name}"
        if name == "no":
            if not value:
                raise InvalidParameter(
                    option, value, "a list of things to leave out, e.g. --no text, watermark"
                )
            negatives.append(value)
            continue
        if name in ("ar", "aspect", "seed", "steps"):
            key = "ar" if name == "aspect" else name
            if key in found:
                raise InvalidParameter(option, value, "given once", f"it was already given as {shown(found[key])}")
            found[key] = value
            if key == "ar":
                match = _RE_ASPECT.fullmatch(value)
                if not match or not all(_in_range(side, 1, MAX_ASPECT) for side in match.groups()):
                    raise InvalidParameter(option, value, f"W:H with whole numbers from 1 to {MAX_ASPECT}, e.g. --ar 16:9")
                aspect = int(match.group(1)), int(match.group(2))
                width, height = aspect_size(*aspect, base_size)
            elif key == "seed":
                seed = _whole_number(option, value, 0, MAX_SEED)
            else:
                steps = _whole_number(option, value, 1, 1000)
            continue
        hint = _UNSUPPORTED_HINTS.get(name)
        if hint is None:
            hint = "unknown option; supported options are " + ", ".join(SUPPORTED_OPTIONS)
        raise UnsupportedPromptOption(option, hint)
    return MidjourneyPrompt(_multi_prompt(body), ", ".join(negatives), width, height, seed, steps, aspect)
