"""The A1111 prompt language, parsed once into plain data.

``parse_prompt`` turns a prompt string into a :class:`ParsedPrompt`: comment lines
dropped, ``<lora:…>`` tags (and other ``<kind:…>`` extra-network tags) pulled out, the
text split into ``AND`` sub-prompts with their weights. ``parse_negative_prompt`` reads a
negative prompt, which (as in A1111) has neither tags nor sub-prompts. Each sub-prompt's text still
holds its emphasis, editing and alternation syntax; :mod:`aipaint.prompt.schedule`
resolves editing and alternation per step and :func:`parse_attention` resolves emphasis.

Nothing here raises on any input string: text the grammar cannot read is kept as plain
text, and odd tags are reported in :attr:`ParsedPrompt.warnings`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from aipaint.errors import AipaintWarning

__all__ = [
    "ExtraNetworkRef",
    "LoraRef",
    "ParsedPrompt",
    "PromptWarning",
    "SubPrompt",
    "WeightedText",
    "parse_attention",
    "parse_attention_segments",
    "parse_negative_prompt",
    "parse_prompt",
]

LORA_TAG_KINDS = ("lora", "lyco")


class PromptWarning(AipaintWarning):
    """Issued when a generation uses a prompt with :attr:`ParsedPrompt.warnings`: part of it was
    kept as plain text instead of read as syntax (a malformed ``<lora:…>`` tag; ``AND`` or a
    tag in the negative prompt). The message says which part."""


@dataclass(frozen=True)
class LoraRef:
    """A ``<lora:name:…>`` tag. ``te_weight`` None means "the same as ``unet_weight``"."""

    name: str
    unet_weight: float = 1.0
    te_weight: float | None = None
    kind: str = "lora"  # "lora" or "lyco": the tag it came from, for routing to adapters

    @property
    def text_encoder_weight(self) -> float:
        return self.unet_weight if self.te_weight is None else self.te_weight


@dataclass(frozen=True)
class ExtraNetworkRef:
    """Any other ``<kind:arg:…>`` tag (e.g. ``<hypernet:name:0.5>``), removed from the text as A1111 does.

    An adapter whose ``prompt_tags`` name the kind receives it; with none, a generation warns
    that the tag is ignored (A1111 skips unknown kinds too)."""

    kind: str
    args: tuple[str, ...]

    @property
    def tag(self) -> str:
        """The tag as written (the kind in lower case)."""
        return f"<{self.kind}:{':'.join(self.args)}>"


@dataclass(frozen=True)
class WeightedText:
    """A piece of prompt text and its emphasis weight."""

    text: str
    weight: float


@dataclass(frozen=True)
class SubPrompt:
    """One ``AND`` part: its text (with editing/alternation/emphasis syntax) and its guidance weight."""

    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt parsed into data. Equality compares meaning (``source`` and ``warnings`` are not compared)."""

    source: str = field(compare=False)
    loras: tuple[LoraRef, ...] = ()
    subprompts: tuple[SubPrompt, ...] = (SubPrompt(""),)
    extra_networks: tuple[ExtraNetworkRef, ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)


# --- emphasis ----------------------------------------------------------------------------
# The token pattern of A1111's parse_prompt_attention: escapes, brackets, ":weight)" closers,
# runs of plain text, and a lone ":".
_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND_MULTIPLIER = 1.1
_SQUARE_MULTIPLIER = 1 / 1.1
_BREAK = object()  # marks a BREAK in the working list; never weighted


def _attention_items(text: str, split_breaks: bool) -> list:
    """A1111's emphasis algorithm; returns ``[text, weight]`` lists and ``_BREAK`` markers."""
    res: list = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for item in res[start:]:
            if item is not _BREAK:
                item[1] *= multiplier

    def add_plain(piece: str) -> None:
        parts = _RE_BREAK.split(piece) if split_breaks else [piece]
        for i, part in enumerate(parts):
            if i > 0:
                res.append(_BREAK)
            res.append([part, 1.0])

    for match in _RE_ATTENTION.finditer(text):
        token = match.group(0)
        weight = match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            try:
                multiplier = float(weight)
            except ValueError:  # "(a:1.2.3)": A1111 crashes here; keep ":1.2.3" as text and close normally
                add_plain(token[:-1])
                multiplier = _ROUND_MULTIPLIER
            multiply_range(round_brackets.pop(), multiplier)
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), _ROUND_MULTIPLIER)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), _SQUARE_MULTIPLIER)
        else:
            add_plain(token)

    for position in round_brackets:
        multiply_range(position, _ROUND_MULTIPLIER)
    for position in square_brackets:
        multiply_range(position, _SQUARE_MULTIPLIER)
    return res


def _merge(items: list[list]) -> list[WeightedText]:
    """Merge runs of equal weight (as A1111 does, empty pieces included), then drop empty pieces."""
    merged: list[list] = []
    for text, weight in items:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [WeightedText(text, weight) for text, weight in merged if text]


def parse_attention(text: str) -> list[WeightedText]:
    """Emphasis only: ``(a)`` ×1.1, ``[a]`` ÷1.1, ``(a:1.3)``, nesting multiplies, ``\\(`` is literal.

    Matches A1111's ``parse_prompt_attention`` (``BREAK`` is left as text here; see
    :func:`parse_attention_segments`). Never raises; an empty result is ``[WeightedText("", 1.0)]``.

    >>> parse_attention("an (important) word")
    [WeightedText(text='an ', weight=1.0), WeightedText(text='important', weight=1.1), WeightedText(text=' word', weight=1.0)]
    """
    pieces = _merge(_attention_items(text, split_breaks=False))
    return pieces or [WeightedText("", 1.0)]


def parse_attention_segments(text: str) -> list[list[WeightedText]]:
    """Like :func:`parse_attention`, split at each ``BREAK`` (upper case, a word of its own).

    Emphasis spans a BREAK (``(a BREAK b)`` weights both ``a`` and ``b``); a segment may be empty.
    """
    segments: list[list] = [[]]
    for item in _attention_items(text, split_breaks=True):
        if item is _BREAK:
            segments.append([])
        else:
            segments[-1].append(item)
    return [_merge(segment) for segment in segments]


# --- whole prompt ----------------------------------------------------------------------------
_RE_COMMENT_LINE = re.compile(r"^[ \t]*#")
_RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_RE_AND = re.compile(r"\bAND\b")
_RE_SUBPROMPT_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def _remove_comment_lines(text: str) -> str:
    return "\n".join(line for line in text.split("\n") if not _RE_COMMENT_LINE.match(line))


def _lora_from_args(kind: str, args: list[str]) -> tuple[LoraRef, bool]:
    """A1111's reading of ``<lora:name:te:unet>`` (positional) and ``te=``/``unet=`` (named).

    Returns the reference and whether some argument (``dyn``, a fourth value) was ignored.
    Raises ValueError for a tag it cannot read (the caller keeps that tag as text).
    """
    positional: list[str] = []
    named: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep:
            named[key.strip()] = value.strip()
        else:
            positional.append(arg.strip())
    if not positional or not positional[0]:
        raise ValueError("a LoRA tag needs a name")
    unknown = set(named) - {"te", "unet", "dyn"}
    if unknown:
        raise ValueError(f"unknown LoRA option {sorted(unknown)[0]!r}")
    te = float(positional[1]) if len(positional) > 1 else 1.0
    te = float(named.get("te", te))
    unet = float(positional[2]) if len(positional) > 2 else te
    unet = float(named.get("unet", unet))
    if not (math.isfinite(te) and math.isfinite(unet)):
        raise ValueError("LoRA weights must be finite numbers")
    ignored = len(positional) > 3 or "dyn" in named
    return LoraRef(positional[0], unet, None if te == unet else te, kind), ignored


def parse_prompt(text: str) -> ParsedPrompt:
    """Parse an A1111 prompt into a :class:`ParsedPrompt`. Never raises.

    Order as in A1111: drop lines starting with ``#``; extract ``<kind:…>`` tags; split at
    ``AND``; read a trailing ``:weight`` on each part.
    """
    if not isinstance(text, str):
        text = str(text)
    loras: list[LoraRef] = []
    others: list[ExtraNetworkRef] = []
    warnings: list[str] = []

    def extract(match: re.Match[str]) -> str:
        kind = match.group(1).lower()
        args = match.group(2).split(":")
        if kind in LORA_TAG_KINDS:
            try:
                lora, ignored = _lora_from_args(kind, args)
            except ValueError as error:
                warnings.append(f"{match.group(0)} was kept as text: {error}")
                return match.group(0)
            loras.append(lora)
            if ignored:
                warnings.append(f"{match.group(0)}: only the name, te and unet weights are used")
        else:
            others.append(ExtraNetworkRef(kind, tuple(args)))
        return ""

    body = _RE_EXTRA_NETWORK.sub(extract, _remove_comment_lines(text))
    subprompts = []
    for part in _RE_AND.split(body):
        match = _RE_SUBPROMPT_WEIGHT.search(part)
        # The pattern always matches a single line; guard anyway so no input can raise.
        part_text, weight = (match.group(1), match.group(2)) if match else (part, None)
        value = float(weight) if weight is not None else 1.0
        if not math.isfinite(value):
            warnings.append(f"sub-prompt weight {weight!r} is not a finite number; 1.0 used")
            value = 1.0
        subprompts.append(SubPrompt(part_text.strip(), value))
    return ParsedPrompt(text, tuple(loras), tuple(subprompts), tuple(others), tuple(warnings))


def parse_negative_prompt(text: str) -> ParsedPrompt:
    """Parse a negative prompt as A1111 reads one: comment lines dropped, nothing else taken apart.

    A1111 splits at ``AND`` and extracts ``<kind:…>`` tags only in the prompt; in the negative
    prompt both stay words of its one text (editing, alternation and emphasis still apply).
    So does aipaint, and each is noted in :attr:`ParsedPrompt.warnings`, since it rarely
    means what was intended. Never raises.
    """
    if not isinstance(text, str):
        text = str(text)
    body = _remove_comment_lines(text)
    warnings = []
    if _RE_AND.search(body):
        warnings.append("AND in the negative prompt is plain text, as in A1111: only the prompt has AND sub-prompts")
    for match in _RE_EXTRA_NETWORK.finditer(body):
        warnings.append(
            f"{match.group(0)} in the negative prompt is plain text, as in A1111: tags take effect only in the prompt"
        )
    return ParsedPrompt(text, subprompts=(SubPrompt(body.strip()),), warnings=tuple(warnings))
