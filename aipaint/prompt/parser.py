"""The A1111 prompt language, parsed once into plain data.

``parse_prompt`` turns a prompt string into a :class:`ParsedPrompt`: comment lines
dropped, ``<lora:…>`` tags (and other ``<kind:…>`` extra-network tags) pulled out, the
text split into ``AND`` sub-prompts with their weights. ``parse_negative_prompt`` reads a
negative prompt, which (as in A1111) has neither tags nor sub-prompts. Each sub-prompt's text still
holds its emphasis, editing and alternation syntax; :mod:`aipaint.prompt.schedule`
resolves editing and alternation per step and :func:`parse_attention` resolves emphasis.

``parse_prompt`` and ``parse_negative_prompt`` never raise: text the grammar cannot read is
kept as plain text, and odd tags are reported in :attr:`ParsedPrompt.warnings`. Emphasis
raises :class:`~aipaint.errors.InvalidParameter` where A1111 would compute a useless weight
(see :func:`parse_attention`). Every function here takes time linear in the text's length.
"""

from __future__ import annotations

import array
import itertools
import math
import re
from dataclasses import dataclass, field
from operator import itemgetter

from aipaint.errors import AipaintWarning, InvalidParameter, shown
from aipaint.prompt._collector import without_collector

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
# A1111's parse_prompt_attention reads the text as tokens: escapes, brackets, ":weight)" closers,
# runs of plain text and lone ":"s. Only the first three kinds do anything, so they are found
# here by one split and everything between them is plain text (the same pieces A1111 makes,
# joined where it splits plain text at a ":"; equal weights are merged at the end either way).
_RE_ATTENTION = re.compile(r"(\\[()\[\]\\]?|[()\[\]]|:\s*([+-]?[.\d]+)\s*\))")
_RE_BREAK_WORD = re.compile(r"\bBREAK\b")
_RE_SPACES = re.compile(r"\s*")
_ROUND_MULTIPLIER = 1.1
_SQUARE_MULTIPLIER = 1 / 1.1
_BREAK = object()  # marks a BREAK in the working list; never weighted
_SHORT_RANGE = 16  # ranges up to this many items are multiplied without numpy

#: At most this many ``(`` and ``[`` may be open at once. Each piece of text is multiplied once per
#: bracket around it, so the bound keeps emphasis linear in the prompt's length; 100 is far
#: beyond any prompt written on purpose (1.1 ** 100 is about 13,780).
MAX_EMPHASIS_DEPTH = 100
#: Emphasis weights (brackets and ``:weight`` multiplied together) must lie in ±this. Larger
#: ones make no picture (a weight of 10 already ruins one), and infinite or NaN ones, which
#: deep nesting or a long ``:999…`` reach, turned the whole image black.
MAX_EMPHASIS_WEIGHT = 1000.0


def _split_breaks(piece: str) -> list[str]:
    """``piece`` split at each ``BREAK`` (a word of its own) and the whitespace around it, as
    A1111's split at ``_RE_BREAK_WORD`` with ``\\s*`` on both sides, in linear time (that pattern
    retries a long run of spaces from each of them)."""
    parts, start = [], 0
    for match in _RE_BREAK_WORD.finditer(piece):
        parts.append(piece[start : match.start()].rstrip())
        start = _RE_SPACES.match(piece, match.end()).end()
    parts.append(piece[start:])
    return parts


def _apply_multipliers(count: int, multiplied: list[tuple[int, int, float]]) -> list[float]:
    """The weight of each of ``count`` items after each ``(start, end, multiplier)`` in order.

    Multiplying in A1111's order gives its weights to the last bit. Each item lies in at most
    ``MAX_EMPHASIS_DEPTH`` ranges, so the work is linear; long ranges are multiplied by numpy
    (through a view of the same memory), short ones directly, which is faster for them.
    """
    weights = array.array("d", [1.0]) * count
    vector = None
    for start, end, multiplier in multiplied:
        if end - start <= _SHORT_RANGE:
            for i in range(start, end):
                weights[i] *= multiplier
        else:
            if vector is None:
                import numpy

                vector = numpy.frombuffer(weights, dtype=numpy.float64)
            vector[start:end] *= multiplier
    return weights.tolist()


def _attention_items(text: str, split_breaks: bool) -> tuple[list, list[float]]:
    """A1111's emphasis algorithm: the pieces (``str`` or ``_BREAK``) and their weights."""
    items: list = []
    multiplied: list[tuple[int, int, float]] = []  # (first item, end, multiplier), in A1111's order
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def add_plain(piece: str) -> None:
        if not split_breaks or "BREAK" not in piece:
            items.append(piece)
            return
        for i, part in enumerate(_split_breaks(piece)):
            if i > 0:
                items.append(_BREAK)
            items.append(part)

    tokens = _RE_ATTENTION.split(text)  # plain, token, weight, plain, token, weight, …, plain
    for plain, token, weight in zip(tokens[0::3], tokens[1::3], tokens[2::3]):
        if plain:
            add_plain(plain)
        if token == "(" or token == "[":
            if len(round_brackets) + len(square_brackets) >= MAX_EMPHASIS_DEPTH:
                raise InvalidParameter(
                    "emphasis", text, f"at most {MAX_EMPHASIS_DEPTH} brackets ( and [ may be open at once",
                    "write a bracket meant as text as \\( or \\[",
                )
            (round_brackets if token == "(" else square_brackets).append(len(items))
        elif token[0] == "\\":
            items.append(token[1:])
        elif weight is not None and round_brackets:
            try:
                multiplier = float(weight)
            except ValueError:  # "(a:1.2.3)": A1111 crashes here; keep ":1.2.3" as text and close normally
                add_plain(token[:-1])
                multiplier = _ROUND_MULTIPLIER
            multiplied.append((round_brackets.pop(), len(items), multiplier))
        elif token == ")" and round_brackets:
            multiplied.append((round_brackets.pop(), len(items), _ROUND_MULTIPLIER))
        elif token == "]" and square_brackets:
            multiplied.append((square_brackets.pop(), len(items), _SQUARE_MULTIPLIER))
        else:
            add_plain(token)
    if tokens[-1]:
        add_plain(tokens[-1])

    end = len(items)
    multiplied += [(position, end, _ROUND_MULTIPLIER) for position in round_brackets]
    multiplied += [(position, end, _SQUARE_MULTIPLIER) for position in square_brackets]
    return items, _apply_multipliers(end, multiplied)


def _merge(items: list[str], weights: list[float]) -> list[WeightedText]:
    """Merge runs of equal weight (as A1111 does, empty pieces included), then drop empty pieces.

    Raises :class:`~aipaint.errors.InvalidParameter` for a piece whose weight is not a finite
    number within ±``MAX_EMPHASIS_WEIGHT``.
    """
    pieces = []
    for weight, run in itertools.groupby(zip(items, weights), key=itemgetter(1)):
        text = "".join(map(itemgetter(0), run))
        if text:
            pieces.append(WeightedText(text, weight))
    for piece in pieces:
        if not abs(piece.weight) <= MAX_EMPHASIS_WEIGHT:  # also catches NaN
            raise InvalidParameter(
                "emphasis", piece.text, f"its weight comes to {piece.weight:g}, and must be a finite number from "
                f"-{MAX_EMPHASIS_WEIGHT:g} to {MAX_EMPHASIS_WEIGHT:g}", "nested brackets and :weights multiply"
            )
    return pieces


@without_collector
def parse_attention(text: str) -> list[WeightedText]:
    """Emphasis only: ``(a)`` ×1.1, ``[a]`` ÷1.1, ``(a:1.3)``, nesting multiplies, ``\\(`` is literal.

    Matches A1111's ``parse_prompt_attention`` (``BREAK`` is left as text here; see
    :func:`parse_attention_segments`). An empty result is ``[WeightedText("", 1.0)]``. Raises
    :class:`~aipaint.errors.InvalidParameter` only where A1111 would give a useless weight: more
    than ``MAX_EMPHASIS_DEPTH`` brackets open at once, or a weight outside ±``MAX_EMPHASIS_WEIGHT``.

    >>> parse_attention("an (important) word")
    [WeightedText(text='an ', weight=1.0), WeightedText(text='important', weight=1.1), WeightedText(text=' word', weight=1.0)]
    """
    pieces = _merge(*_attention_items(text, split_breaks=False))
    return pieces or [WeightedText("", 1.0)]


@without_collector
def parse_attention_segments(text: str) -> list[list[WeightedText]]:
    """Like :func:`parse_attention`, split at each ``BREAK`` (upper case, a word of its own).

    Emphasis spans a BREAK (``(a BREAK b)`` weights both ``a`` and ``b``); a segment may be empty.
    """
    items, weights = _attention_items(text, split_breaks=True)
    ends = [index for index, item in enumerate(items) if item is _BREAK] + [len(items)]
    starts = [0] + [end + 1 for end in ends[:-1]]
    return [_merge(items[start:end], weights[start:end]) for start, end in zip(starts, ends)]


# --- whole prompt ----------------------------------------------------------------------------
_RE_COMMENT_LINE = re.compile(r"^[ \t]*#")
_RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_RE_AND = re.compile(r"\bAND\b")
# A1111 reads a sub-prompt's weight with ^((?:\s|.)*?)(?:\s*:\s*NUMBER)?\s*$, which retries the
# rest of the text after each character (quadratic); _subprompt_weight finds the same number.
_RE_SUBPROMPT_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def _tags_end(text: str) -> int:
    """Where the part of ``text`` that can hold ``<kind:args>`` tags ends: after its last ``>``.

    Searching only up to there keeps each ``<kind:`` that no ``>`` follows from scanning to the
    end of the text (many of them made the search quadratic).
    """
    return text.rfind(">") + 1


def _subprompt_weight(part: str) -> tuple[str, str | None]:
    """A sub-prompt's text and its trailing ``:weight`` as written (None when it has none)."""
    body = part.rstrip()
    colon = body.rfind(":")  # a weight is all that follows the last colon
    if colon >= 0:
        number = body[colon + 1 :].lstrip()
        if _RE_SUBPROMPT_NUMBER.fullmatch(number):
            return body[:colon], number
    return part, None


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


@without_collector
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

    uncommented = _remove_comment_lines(text)
    end = _tags_end(uncommented)
    body = _RE_EXTRA_NETWORK.sub(extract, uncommented[:end]) + uncommented[end:]
    subprompts = []
    for part in _RE_AND.split(body):
        part_text, weight = _subprompt_weight(part)
        value = float(weight) if weight is not None else 1.0
        if not math.isfinite(value):
            warnings.append(f"sub-prompt weight {shown(weight)} is not a finite number; 1.0 used")
            value = 1.0
        subprompts.append(SubPrompt(part_text.strip(), value))
    return ParsedPrompt(text, tuple(loras), tuple(subprompts), tuple(others), tuple(warnings))


@without_collector
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
    for match in _RE_EXTRA_NETWORK.finditer(body, 0, _tags_end(body)):
        warnings.append(
            f"{match.group(0)} in the negative prompt is plain text, as in A1111: tags take effect only in the prompt"
        )
    return ParsedPrompt(text, subprompts=(SubPrompt(body.strip()),), warnings=tuple(warnings))
