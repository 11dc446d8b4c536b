"""Prompt editing ``[from:to:when]`` and alternation ``[a|b]``, resolved per sampling step.

The grammar and the step rules are A1111's (``get_learned_conditioning_prompt_schedules``
and the denoiser's step counter):

* ``when`` below 1 is a fraction of the steps, otherwise a step number;
  ``when = min(steps, int(value * steps if value < 1 else value))``.
* A1111 collects "boundary" steps (``steps``, every ``when``, and 1…steps when there is an
  alternation), renders the text at each boundary ``b`` (an edit shows ``from`` while
  ``b <= when``; an alternation shows option ``(b - 1) % n``), and at 0-based sampling
  step ``s`` uses the text of the first boundary ``b >= s``. So ``[a:b:5]`` keeps ``a`` for
  steps 0…5 (six steps) and ``[x|y]`` gives x, x, y, x, y, … — kept as is, for
  compatibility.

Text the grammar cannot read (``a|b`` outside brackets, a trailing backslash) is used
unchanged at every step, as A1111 does. Nothing here raises on any input string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from aipaint.prompt.parser import ParsedPrompt, parse_attention_segments

if TYPE_CHECKING:
    from aipaint.prompt.encode import Tokenizer

__all__ = ["describe", "distinct_schedule", "prompt_at_step"]

StepPrompt = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class _Edit:
    before: tuple[_Node, ...]
    after: tuple[_Node, ...]
    when: float  # the number as written; turned into a step by _when_step


@dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple[_Node, ...], ...]


@dataclass(frozen=True)
class _Group:
    """Emphasis brackets: kept verbatim (they are resolved later, by parse_attention)."""

    nodes: tuple[_Node, ...]


_Node = str | _Edit | _Alternate | _Group

# lark's SIGNED_NUMBER, then the closing bracket of an edit.
_RE_WHEN = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*\]")


class _Unparseable(Exception):
    pass


class _Reader:
    """A reader for the language of A1111's lark grammar, choosing bracket constructs over
    literal brackets where both parse (as lark resolves it).

    A bracket construct's extent depends only on where it starts (inside brackets there is
    no stray bracket), so constructs are computed once per position. At the top level a bracket that opens no valid construct is a literal character, as
    in the grammar's ``/[][():]/+`` rule.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.constructs: dict[int, tuple[_Node, int] | None] = {}

    def top(self) -> tuple[_Node, ...]:
        # Read every construct from right to left: each one only looks at constructs that
        # start after it, so they are already known and deep nesting needs no recursion.
        for start in reversed(self._bracket_positions()):
            self.constructs[start] = self._construct(start)
        text, items, plain, i = self.text, [], [], 0
        while i < len(text):
            char = text[i]
            if char in "([":
                found = self.constructs[i]
                if found is not None:
                    self._flush(plain, items)
                    items.append(found[0])
                    i = found[1]
                    continue
            elif char == "|":
                raise _Unparseable
            elif char == "\\":
                i = self._escape(i, plain)
                continue
            plain.append(char)
            i += 1
        self._flush(plain, items)
        return tuple(items)

    def _bracket_positions(self) -> list[int]:
        """Where an unescaped ``(`` or ``[`` stands (a backslash escapes the next character)."""
        positions, i = [], 0
        while i < len(self.text):
            if self.text[i] == "\\":
                i += 2
                continue
            if self.text[i] in "([":
                positions.append(i)
            i += 1
        return positions

    def _escape(self, i: int, plain: list[str]) -> int:
        if i + 1 >= len(self.text) or self.text[i + 1] == "\n":
            raise _Unparseable
        plain.append(self.text[i : i + 2])
        return i + 2

    @staticmethod
    def _flush(plain: list[str], items: list[_Node]) -> None:
        if plain:
            items.append("".join(plain))
            plain.clear()

    def inner(self, i: int) -> tuple[tuple[_Node, ...], int] | None:
        """A ``prompt`` inside brackets: runs to the first ``)]:|`` or the end of the text."""
        text, items, plain = self.text, [], []
        while i < len(text):
            char = text[i]
            if char in "([":
                found = self.constructs[i]
                if found is None:
                    return None
                self._flush(plain, items)
                items.append(found[0])
                i = found[1]
            elif char in ")]:|":
                break
            elif char == "\\":
                if i + 1 >= len(text) or text[i + 1] == "\n":
                    return None
                plain.append(text[i : i + 2])
                i += 2
            else:
                plain.append(char)
                i += 1
        self._flush(plain, items)
        return tuple(items), i

    def _at(self, i: int) -> str:
        return self.text[i] if i < len(self.text) else ""

    def _construct(self, i: int) -> tuple[_Node, int] | None:
        first = self.inner(i + 1)
        if first is None:
            return None
        body, k = first
        closer = self._at(k)
        if self.text[i] == "(":
            if closer == ")":
                return _Group(("(",) + body + (")",)), k + 1
            if closer == ":":
                second = self.inner(k + 1)
                if second is not None and self._at(second[1]) == ")":
                    return _Group(("(",) + body + (":",) + second[0] + (")",)), second[1] + 1
            return None
        if closer == "]":
            return _Group(("[",) + body + ("]",)), k + 1
        if closer == "|":
            options = [body]
            while True:
                option = self.inner(k + 1)
                if option is None:
                    return None
                options.append(option[0])
                k = option[1]
                if self._at(k) == "]":
                    return _Alternate(tuple(options)), k + 1
                if self._at(k) != "|":
                    return None
        if closer == ":":
            when = _RE_WHEN.match(self.text, k + 1)
            if when:  # [to:when]
                return _Edit((), body, float(when.group(1))), when.end()
            second = self.inner(k + 1)
            if second is not None and self._at(second[1]) == ":":
                when = _RE_WHEN.match(self.text, second[1] + 1)
                if when:  # [from:to:when]
                    return _Edit(body, second[0], float(when.group(1))), when.end()
        return None


@lru_cache(maxsize=512)
def _schedule_tree(text: str) -> tuple[_Node, ...] | None:
    """The parsed tree, or None when the text is not valid schedule syntax (then it is plain)."""
    if "[" not in text:  # no edit or alternation possible; the text is used as written
        return None
    try:
        return _Reader(text).top()
    except _Unparseable:
        return None


def _when_step(when: float, steps: int) -> int:
    value = when * steps if when < 1 else when
    if value >= steps:  # also catches inf
        return steps
    return max(int(value), -1)  # anything below 0 acts the same; -1 also absorbs -inf


def _boundary(nodes: tuple[_Node, ...], step: int, steps: int) -> int:
    """The first of A1111's boundary steps at or after ``step`` (``steps`` itself is always one)."""
    best, pending = steps, list(nodes)
    while pending:  # a loop, not recursion: nesting depth is up to the user
        node = pending.pop()
        if isinstance(node, _Edit):
            when = _when_step(node.when, steps)
            if when >= step:
                best = min(best, when)
            pending.extend(node.before + node.after)
        elif isinstance(node, _Alternate):
            best = min(best, max(step, 1))  # an alternation makes every step 1…steps a boundary
            for option in node.options:
                pending.extend(option)
        elif isinstance(node, _Group):
            pending.extend(node.nodes)
    return best


def _render(nodes: tuple[_Node, ...], boundary: int, steps: int) -> str:
    out: list[str] = []
    pending = list(reversed(nodes))
    while pending:
        node = pending.pop()
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            pending.extend(reversed(node.before if boundary <= _when_step(node.when, steps) else node.after))
        elif isinstance(node, _Alternate):
            pending.extend(reversed(node.options[(boundary - 1) % len(node.options)]))
        else:
            pending.extend(reversed(node.nodes))
    return "".join(out)


def _text_at_step(text: str, step: int, steps: int) -> str:
    tree = _schedule_tree(text)
    if tree is None:
        return text
    return _render(tree, _boundary(tree, step, steps), steps)


def prompt_at_step(parsed: ParsedPrompt, step: int, steps: int) -> StepPrompt:
    """The ``(text, weight)`` of each ``AND`` sub-prompt in force at 0-based ``step`` of ``steps``.

    The texts keep their emphasis syntax (encode them with :class:`PromptEncoder`). ``steps``
    below 1 counts as 1 and ``step`` is clamped to ``0…steps-1``; never raises.
    """
    steps = max(int(steps), 1)
    step = min(max(int(step), 0), steps - 1)
    return tuple((_text_at_step(sub.text, step, steps), sub.weight) for sub in parsed.subprompts)


def distinct_schedule(parsed: ParsedPrompt, steps: int) -> list[tuple[int, StepPrompt]]:
    """``(first step, pairs)`` each time the texts change, starting with step 0.

    Lets a pipeline encode each distinct text once: the pairs of entry ``i`` are in force
    from its step up to the next entry's step.
    """
    steps = max(int(steps), 1)
    schedule: list[tuple[int, StepPrompt]] = []
    for step in range(steps):
        pairs = prompt_at_step(parsed, step, steps)
        if not schedule or schedule[-1][1] != pairs:
            schedule.append((step, pairs))
    return schedule


def _format_weight(weight: float) -> str:
    return f"{weight:.4g}"


def _format_steps(steps: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → "0-2, 5, 7-8"."""
    runs: list[list[int]] = []
    for step in steps:
        if runs and step == runs[-1][1] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def describe(parsed: ParsedPrompt, tokenizer: Tokenizer | Any | None = None, steps: int = 20) -> str:
    """A human-readable explanation of a parsed prompt: LoRAs and other tags, sub-prompts and
    their weights, which text is in force at which steps, emphasis weights and, given a
    tokenizer, the prompt tokens used in each 75-token chunk."""
    steps = max(int(steps), 1)
    lines = [f"Prompt: {parsed.source!r}"]
    for lora in parsed.loras:
        lines.append(
            f"{'LyCORIS' if lora.kind == 'lyco' else 'LoRA'} {lora.name!r}: UNet weight {_format_weight(lora.unet_weight)}, "
            f"text-encoder weight {_format_weight(lora.text_encoder_weight)}"
        )
    for network in parsed.extra_networks:
        lines.append(
            f"Tag {network.tag}: needs a plugin that handles {network.kind!r} tags (without one it is ignored, with a warning)"
        )
    for warning in parsed.warnings:
        lines.append(f"Warning: {warning}")

    per_step = [prompt_at_step(parsed, step, steps) for step in range(steps)]
    for index, sub in enumerate(parsed.subprompts):
        lines.append(
            f"Sub-prompt {index + 1} of {len(parsed.subprompts)}, guidance weight {_format_weight(sub.weight)}:"
        )
        texts: dict[str, list[int]] = {}
        for step, pairs in enumerate(per_step):
            texts.setdefault(pairs[index][0], []).append(step)
        for text, in_force in texts.items():
            when = "all steps" if len(texts) == 1 else f"steps {_format_steps(in_force)} of 0-{steps - 1}"
            lines.append(f"  {when}: {text!r}")
            for number, segment in enumerate(parse_attention_segments(text)):
                pieces = " | ".join(f"{piece.text!r} x{_format_weight(piece.weight)}" for piece in segment)
                lines.append("    " + ("BREAK, then " if number else "") + (pieces or "(empty)"))
            if tokenizer is not None:
                from aipaint.prompt.encode import tokenize_chunks

                counts = [chunk.length for chunk in tokenize_chunks(tokenizer, text)]
                lines.append("    tokens per chunk: " + ", ".join(f"{count}/75" for count in counts))
    return "\n".join(lines)
