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
unchanged at every step, as A1111 does. Nothing here raises on any input string; reading a
text takes time linear in its length, and each step's text is rendered once.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from aipaint.errors import InvalidParameter
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
    """Emphasis brackets around an edit or alternation: kept verbatim (parse_attention resolves them)."""

    nodes: tuple[_Node, ...]


# A span (start, end) is text used as written: plain text, escapes, and brackets with no edit or
# alternation inside. Holding positions, not copies, keeps deep nesting linear.
_Span = tuple[int, int]
_Node = _Span | _Edit | _Alternate | _Group

# lark's SIGNED_NUMBER, then the closing bracket of an edit.
_RE_WHEN = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*\]")
# Runs of text used as written: at the top level, and inside brackets (a backslash escapes the
# next character, except a newline). Each character can match only one way: linear.
_RE_TOP_RUN = re.compile(r"(?:[^(\[|\\]|\\[^\n])*")
_RE_INNER_RUN = re.compile(r"(?:[^()\[\]:|\\]|\\[^\n])*")
_RE_OPENER = re.compile(r"\\.|[(\[]", re.S)


class _Unparseable(Exception):
    pass


class _Reader:
    """A reader for the language of A1111's lark grammar, choosing bracket constructs over
    literal brackets where both parse (as lark resolves it).

    A bracket construct's extent depends only on where it starts (inside brackets there is
    no stray bracket), so constructs are computed once per position, and reading takes time
    linear in the text's length. At the top level a bracket that opens no valid construct is
    a literal character, as in the grammar's ``/[][():]/+`` rule.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.constructs: dict[int, tuple[_Node, int] | None] = {}

    def top(self) -> tuple[_Node, ...]:
        # Read every construct from right to left: each one only looks at constructs that
        # start after it, so they are already known and deep nesting needs no recursion.
        text, constructs = self.text, self.constructs
        for start in reversed([m.start() for m in _RE_OPENER.finditer(text) if m.group() in "(["]):
            constructs[start] = self._construct(start)
        nodes, span_start, i = [], 0, 0
        while True:
            i = _RE_TOP_RUN.match(text, i).end()
            if i == len(text):
                break
            if text[i] in "|\\":  # "|" outside brackets, or a backslash before a newline or at the end
                raise _Unparseable
            found = constructs[i]
            if found is None:
                i += 1  # a literal bracket
                continue
            node, end = found
            if node.__class__ is not tuple:
                if span_start < i:
                    nodes.append((span_start, i))
                nodes.append(node)
                span_start = end
            i = end
        if span_start < i:
            nodes.append((span_start, i))
        return tuple(nodes)

    def inner(self, i: int) -> tuple[tuple[_Node, ...], int] | None:
        """A ``prompt`` inside brackets: its nodes and the position of the first ``)]:|`` (or
        the end of the text) after them; None when it holds something the grammar refuses."""
        text, constructs, nodes, span_start = self.text, self.constructs, [], i
        while True:
            i = _RE_INNER_RUN.match(text, i).end()
            char = text[i : i + 1]
            if char in ")]:|":  # also true for "" at the end of the text
                break
            if char == "\\":  # before a newline or at the end
                return None
            found = constructs[i]
            if found is None:
                return None  # inside brackets there is no stray bracket
            node, end = found
            if node.__class__ is not tuple:
                if span_start < i:
                    nodes.append((span_start, i))
                nodes.append(node)
                span_start = end
            i = end
        if span_start < i:
            nodes.append((span_start, i))
        return tuple(nodes), i

    def _construct(self, i: int) -> tuple[_Node, int] | None:
        text = self.text
        first = self.inner(i + 1)
        if first is None:
            return None
        body, k = first
        closer = text[k : k + 1]
        if text[i] == "(":
            if closer == ")":
                return _group(i, k + 1, body)
            if closer == ":":
                second = self.inner(k + 1)
                if second is not None and text[second[1] : second[1] + 1] == ")":
                    return _group(i, second[1] + 1, body, k, second[0])
            return None
        if closer == "]":
            return _group(i, k + 1, body)
        if closer == "|":
            options = [body]
            while True:
                option = self.inner(k + 1)
                if option is None:
                    return None
                options.append(option[0])
                k = option[1]
                if text[k : k + 1] == "]":
                    return _Alternate(tuple(options)), k + 1
                if text[k : k + 1] != "|":
                    return None
        if closer == ":":
            when = _RE_WHEN.match(text, k + 1)
            if when:  # [to:when]
                return _Edit((), body, float(when.group(1))), when.end()
            second = self.inner(k + 1)
            if second is not None and text[second[1] : second[1] + 1] == ":":
                when = _RE_WHEN.match(text, second[1] + 1)
                if when:  # [from:to:when]
                    return _Edit(body, second[0], float(when.group(1))), when.end()
        return None


def _verbatim(nodes: tuple[_Node, ...]) -> bool:
    # inner() joins neighbouring spans, so text used as written is at most one span
    return len(nodes) <= 1 and (not nodes or nodes[0].__class__ is tuple)


def _group(
    start: int, end: int, body: tuple[_Node, ...], colon: int = -1, second: tuple[_Node, ...] = ()
) -> tuple[_Node, int]:
    """Brackets from ``start`` to ``end`` around ``body`` (and ``second`` after the ``:`` at
    ``colon``): a span when nothing inside them changes per step."""
    if _verbatim(body) and _verbatim(second):
        return (start, end), end
    nodes: tuple[_Node, ...] = ((start, start + 1), *body)
    if colon >= 0:
        nodes += ((colon, colon + 1), *second)
    return _Group((*nodes, (end - 1, end))), end


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


@lru_cache(maxsize=512)
def _boundaries(text: str, steps: int) -> tuple[tuple[int, ...], bool]:
    """The sorted steps at which the text's edits switch, and whether it has an alternation.

    Worked out once per text and step count, so each step only looks up its boundary.
    """
    tree = _schedule_tree(text)
    whens: set[int] = set()
    alternates = False
    pending = list(tree or ())
    while pending:  # a loop, not recursion: nesting depth is up to the user
        node = pending.pop()
        if isinstance(node, _Edit):
            whens.add(_when_step(node.when, steps))
            pending.extend(node.before + node.after)
        elif isinstance(node, _Alternate):
            alternates = True
            for option in node.options:
                pending.extend(option)
        elif isinstance(node, _Group):
            pending.extend(node.nodes)
    return tuple(sorted(whens)), alternates


def _boundary(text: str, step: int, steps: int) -> int:
    """The first of A1111's boundary steps at or after ``step`` (``steps`` itself is always one)."""
    whens, alternates = _boundaries(text, steps)
    best = steps
    later = bisect.bisect_left(whens, step)
    if later < len(whens):
        best = min(best, whens[later])
    if alternates:  # an alternation makes every step 1…steps a boundary
        best = min(best, max(step, 1))
    return best


def _render(text: str, nodes: tuple[_Node, ...], boundary: int, steps: int) -> str:
    out: list[str] = []
    pending = list(reversed(nodes))
    while pending:
        node = pending.pop()
        if isinstance(node, tuple):
            out.append(text[node[0] : node[1]])
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
    return _render(text, tree, _boundary(text, step, steps), steps)


def prompt_at_step(parsed: ParsedPrompt, step: int, steps: int) -> StepPrompt:
    """The ``(text, weight)`` of each ``AND`` sub-prompt in force at 0-based ``step`` of ``steps``.

    The texts keep their emphasis syntax (encode them with :class:`PromptEncoder`). ``steps``
    below 1 counts as 1 and ``step`` is clamped to ``0…steps-1``; never raises.
    """
    steps = max(int(steps), 1)
    step = min(max(int(step), 0), steps - 1)
    return tuple((_text_at_step(sub.text, step, steps), sub.weight) for sub in parsed.subprompts)


def _step_count(steps: int) -> int:
    """``steps`` as a number of steps to go through: below 1 counts as 1, and above the
    generation limit is an error (the work and the output grow with it)."""
    from aipaint.params import STEPS_RANGE

    steps = max(int(steps), 1)
    if steps > STEPS_RANGE[1]:
        raise InvalidParameter("steps", steps, f"must be a whole number from {STEPS_RANGE[0]} to {STEPS_RANGE[1]}")
    return steps


def _texts_per_step(parsed: ParsedPrompt, steps: int) -> list[StepPrompt]:
    """:func:`prompt_at_step` for each step, rendering a step's texts only when some
    sub-prompt's boundary moves (the texts depend on nothing else)."""
    per_step: list[StepPrompt] = []
    previous: tuple[int, ...] = ()
    for step in range(steps):
        boundaries = tuple(_boundary(sub.text, step, steps) for sub in parsed.subprompts)
        if not per_step or boundaries != previous:
            per_step.append(prompt_at_step(parsed, step, steps))
        else:
            per_step.append(per_step[-1])
        previous = boundaries
    return per_step


def distinct_schedule(parsed: ParsedPrompt, steps: int) -> list[tuple[int, StepPrompt]]:
    """``(first step, pairs)`` each time the texts change, starting with step 0.

    Lets a pipeline encode each distinct text once: the pairs of entry ``i`` are in force
    from its step up to the next entry's step. ``steps`` below 1 counts as 1; more than the
    generation limit (1000) raises :class:`~aipaint.errors.InvalidParameter`.
    """
    schedule: list[tuple[int, StepPrompt]] = []
    for step, pairs in enumerate(_texts_per_step(parsed, _step_count(steps))):
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
    tokenizer, the prompt tokens used in each 75-token chunk. ``steps`` as in :func:`distinct_schedule`."""
    steps = _step_count(steps)
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

    per_step = _texts_per_step(parsed, steps)
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
