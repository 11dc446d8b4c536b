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
from typing import TYPE_CHECKING, Any, Union

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


_Node = Union[str, _Edit, _Alternate, _Group]

# lark's SIGNED_NUMBER, then the closing bracket of an edit.
_RE_WHEN = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*\]")
_MAX_DEPTH = 100  # deeper bracket nesting is not read as syntax (the whole prompt stays plain)


class _Unparseable(Exception):
    pass


class _Reader:
    """Recursive descent over A1111's lark grammar.

    A bracket construct's extent depends only on where it starts (inside brackets there is
    no stray bracket), so constructs are memoised by position and the parse is linear.
    At the top level a bracket that opens no valid construct is a literal character, as
    in the grammar's ``/[][():]/+`` rule.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.constructs: dict[int, tuple[_Node, int] | None] = {}

    def top(self) -> tuple[_Node, ...]:
        text, items, plain, i = self.text, [], [], 0
        while i < len(text):
            char = text[i]
            if char in "([":
                found = self.construct(i, 0)
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

    def inner(self, i: int, depth: int) -> tuple[tuple[_Node, ...], int] | None:
        """A ``prompt`` inside brackets: runs to the first ``)]:|`` or the end of the text."""
        text, items, plain = self.text, [], []
        while i < len(text):
            char = text[i]
            if char in "([":
                found = self.construct(i, depth + 1)
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

    def construct(self, i: int, depth: int) -> tuple[_Node, int] | None:
        if i not in self.constructs:
            if depth > _MAX_DEPTH:
                raise _Unparseable
            self.constructs[i] = self._construct(i, depth)
        return self.constructs[i]

    def _at(self, i: int) -> str:
        return self.text[i] if i < len(self.text) else ""

    def _construct(self, i: int, depth: int) -> tuple[_Node, int] | None:
        first = self.inner(i + 1, depth)
        if first is None:
            return None
        body, k = first
        closer = self._at(k)
        if self.text[i] == "(":
            if closer == ")":
                return _Group(("(",) + body + (")",)), k + 1
            if closer == ":":
                second = self.inner(k + 1, depth)
                if second is not None and self._at(second[1]) == ")":
                    return _Group(("(",) + body + (":",) + second[0] + (")",)), second[1] + 1
            return None
        if closer == "]":
            return _Group(("[",) + body + ("]",)), k + 1
        if closer == "|":
            options = [body]
            while True:
                option = self.inner(k + 1, depth)
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
            second = self.inner(k + 1, depth)
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


def _boundaries(nodes: tuple[_Node, ...], steps: int, out: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Edit):
            out.add(_when_step(node.when, steps))
            _boundaries(node.before, steps, out)
            _boundaries(node.after, steps, out)
        elif isinstance(node, _Alternate):
            out.update(range(1, steps + 1))
            for option in node.options:
                _boundaries(option, steps, out)
        elif isinstance(node, _Group):
            _boundaries(node.nodes, steps, out)


def _render(nodes: tuple[_Node, ...], boundary: int, steps: int, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            _render(node.before if boundary <= _when_step(node.when, steps) else node.after, boundary, steps, out)
        elif isinstance(node, _Alternate):
            _render(node.options[(boundary - 1) % len(node.options)], boundary, steps, out)
        else:
            _render(node.nodes, boundary, steps, out)


def _text_at_step(text: str, step: int, steps: int) -> str:
    tree = _schedule_tree(text)
    if tree is None:
        return text
    bounds = {steps}
    _boundaries(tree, steps, bounds)
    boundary = min(b for b in bounds if b >= step)
    out: list[str] = []
    _render(tree, boundary, steps, out)
    return "".join(out)


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


def describe(parsed: ParsedPrompt, tokenizer: Tokenizer | Any | None = None, steps: int = 20) -> str:
    """A human-readable explanation of a parsed prompt: LoRAs, sub-prompts, what is in force
    at which steps, emphasis weights and, given a tokenizer, tokens used per 75-token chunk."""
    lines = [f"Prompt: {parsed.source!r}"]
    for lora in parsed.loras:
        lines.append(
            f"{lora.kind.upper() if lora.kind == 'lyco' else 'LoRA'} {lora.name!r}: "
            f"UNet weight {_format_weight(lora.unet_weight)}, text-encoder weight {_format_weight(lora.text_encoder_weight)}"
        )
    for network in parsed.extra_networks:
        lines.append(f"Extra network <{network.kind}:{':'.join(network.args)}> (needs a plugin that handles {network.kind!r})")
    for warning in parsed.warnings:
        lines.append(f"Warning: {warning}")

    schedule = distinct_schedule(parsed, steps)
    multi = len(parsed.subprompts) > 1
    for index, sub in enumerate(parsed.subprompts):
        if multi:
            lines.append(f"Sub-prompt {index + 1} (AND weight {_format_weight(sub.weight)}):")
        elif sub.weight != 1.0:
            lines.append(f"Guidance weight {_format_weight(sub.weight)}:")
        changes = [(start, pairs[index][0]) for start, pairs in schedule]
        changes = [c for i, c in enumerate(changes) if i == 0 or c[1] != changes[i - 1][1]]
        for n, (start, text) in enumerate(changes):
            end = changes[n + 1][0] - 1 if n + 1 < len(changes) else steps - 1
            indent = "  " if multi or sub.weight != 1.0 else ""
            when = f"steps {start}-{end} of {steps}" if len(changes) > 1 else "all steps"
            lines.append(f"{indent}{when}: {text!r}")
            segments = parse_attention_segments(text)
            for s, segment in enumerate(segments):
                prefix = f"{indent}  " + ("BREAK → " if s else "")
                pieces = " | ".join(f"{piece.text!r} ×{_format_weight(piece.weight)}" for piece in segment)
                lines.append(prefix + (pieces or "(empty)"))
            if tokenizer is not None:
                from aipaint.prompt.encode import tokenize_chunks

                counts = [chunk.length for chunk in tokenize_chunks(tokenizer, text)]
                lines.append(f"{indent}  tokens per chunk: " + ", ".join(f"{c}/75" for c in counts))
    return "\n".join(lines)
