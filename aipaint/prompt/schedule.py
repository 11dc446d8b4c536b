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
from aipaint.prompt._collector import without_collector
from aipaint.prompt.parser import ParsedPrompt, parse_attention_segments

if TYPE_CHECKING:
    from aipaint.prompt.encode import Tokenizer

__all__ = ["describe", "distinct_schedule", "prompt_at_step"]

StepPrompt = tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class _Edit:
    before: tuple[_Node, ...]
    after: tuple[_Node, ...]
    when: float  # the number as written; turned into a step by _when_step


@dataclass(frozen=True, slots=True)
class _Alternate:
    options: tuple[tuple[_Node, ...], ...]


# A span (start, end) is text used as written: plain text, escapes, and emphasis or plain brackets
# (those around an edit or alternation too: the spans before and after it hold their characters).
# Holding positions, not copies, keeps deep nesting linear.
_Span = tuple[int, int]
_Node = _Span | _Edit | _Alternate

# lark's SIGNED_NUMBER, then the closing bracket of an edit.
_RE_WHEN = re.compile(r"\s*([+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+))\s*\]")
# A bracket with no other special character inside: an alternation [a|b|…], or an edit [to:when] /
# [from:to:when]. The usual constructs, read at once (what the token loop would make of them, faster).
_PLAIN = r"[^()\[\]:|\\]*"
_RE_SIMPLE_ALTERNATION = re.compile(rf"\[{_PLAIN}(?:\|{_PLAIN})+\]")
_RE_SIMPLE_EDIT = re.compile(rf"\[({_PLAIN}):(?:({_PLAIN}):)?" + _RE_WHEN.pattern)
_NOT_SIMPLE_AFTER = frozenset(("", "[", "]", "(", ")", "\\"))  # no simple construct starts "[" + one of these
READ_SIMPLE_AT_ONCE = True  # off only in the test that checks both ways read alike
# The characters that matter to the grammar; a backslash escapes the next one, except a newline.
_RE_SPECIAL = re.compile(r"[()\[\]:|]|\\[^\n]|\\")


@dataclass(frozen=True, slots=True)
class _Tree:
    """A text read as schedule syntax: its nodes, and what its boundaries depend on."""

    nodes: tuple[_Node, ...]
    whens: tuple[float, ...]  # each distinct "when" of its edits, as written
    alternates: bool  # whether it holds an alternation
    arities: tuple[int, ...]  # each distinct number of options of its alternations


# An open bracket is a tuple of plain values, which the cycle collector leaves alone (walking a
# million open brackets again and again tripled the time of a megabyte of "["): its kind ("("
# or "["), where it starts, its state ("" in the first part, ":" after a colon, "|" in an
# alternation), where its current part starts, and where its parts, its children and its
# current part's children begin in the reader's two stacks. Those hold the parts read so far
# and the (start, end, node) of each edit or alternation completed inside an open bracket;
# only the innermost bracket adds to them, so each bracket's are at their top.
_KIND, _START, _STATE, _PART_START, _PARTS, _CHILDREN, _PART_CHILDREN = range(7)
_Frame = tuple[str, int, str, int, int, int, int]


def _read(text: str) -> _Tree | None:
    """The text as A1111's lark grammar reads it, choosing bracket constructs over literal
    brackets where both parse (as lark resolves it); None when the grammar cannot read it.

    One pass over the characters that matter, with a stack of open brackets. A construct's
    extent depends only on where it starts, and inside brackets there is no stray bracket: so
    when a bracket cannot be completed, neither can any bracket around it, and all of them
    become literal text at the top level, keeping the constructs completed inside them.
    """
    top: list[tuple[int, int, _Node]] = []  # (start, end, node) of the top level's edits and alternations
    whens: list[float] = []
    alternates = False
    arities: dict[int, None] = {}
    stack: list[_Frame] = []
    parts: list[tuple[_Node, ...]] = []
    children: list[tuple[int, int, _Node]] = []
    skip_to = 0

    def part(frame: _Frame, end: int) -> tuple[_Node, ...]:
        """The current part of the innermost bracket: spans between its children, up to ``end``."""
        position = frame[_PART_START]
        if len(children) == frame[_PART_CHILDREN]:  # text used as written: one span (the usual case, made fast)
            return ((position, end),) if position < end else ()
        nodes: list[_Node] = []
        for start, stop, node in children[frame[_PART_CHILDREN] :]:
            if position < start:
                nodes.append((position, start))
            nodes.append(node)
            position = stop
        if position < end:
            nodes.append((position, end))
        return tuple(nodes)

    def next_part(frame: _Frame, separator: int, state: str) -> None:
        parts.append(part(frame, separator))
        stack[-1] = (frame[_KIND], frame[_START], state, separator + 1, frame[_PARTS], frame[_CHILDREN], len(children))

    def complete(frame: _Frame, end: int, node: _Node | None) -> None:
        """The innermost bracket made ``node`` (None: text used as written), ending at ``end``."""
        stack.pop()
        del parts[frame[_PARTS] :], children[frame[_CHILDREN] :]
        if node is not None:
            (children if stack else top).append((frame[_START], end, node))

    def keep_as_written(frame: _Frame) -> None:
        """The innermost bracket closed as emphasis (or plain brackets): its characters stay as
        written (parse_attention resolves them) and the edits and alternations completed inside it
        become its parent's, so the text between them, brackets included, is the parent's too."""
        stack.pop()
        del parts[frame[_PARTS] :]
        if not stack:
            top.extend(children)
            children.clear()

    def fail() -> bool:
        """Every open bracket fails; False when that leaves a ``|`` at the top level."""
        if any(frame[_STATE] == "|" for frame in stack):
            return False
        top.extend(children)
        stack.clear()
        parts.clear()
        children.clear()
        return True

    for token in _RE_SPECIAL.finditer(text):
        position = token.start()
        if position < skip_to:
            continue
        char = text[position]
        if char == "[" and READ_SIMPLE_AT_ONCE and text[position + 1 : position + 2] not in _NOT_SIMPLE_AFTER:
            simple = _RE_SIMPLE_ALTERNATION.match(text, position)
            if simple:
                options, start = [], position + 1
                while True:
                    bar = text.find("|", start, simple.end() - 1)
                    stop = simple.end() - 1 if bar < 0 else bar
                    options.append(((start, stop),) if start < stop else ())
                    if bar < 0:
                        break
                    start = bar + 1
                alternates = True
                arities[len(options)] = None
                (children if stack else top).append((position, simple.end(), _Alternate(tuple(options))))
                skip_to = simple.end()
                continue
            simple = _RE_SIMPLE_EDIT.match(text, position)
            if simple:
                first, second = simple.span(1), simple.span(2)
                spans = [((a, b),) if a < b else () for a, b in (first, second) if a >= 0]
                before, after = ((), spans[0]) if len(spans) == 1 else spans
                whens.append(float(simple.group(3)))
                (children if stack else top).append((position, simple.end(), _Edit(before, after, whens[-1])))
                skip_to = simple.end()
                continue
        if char == "(" or char == "[":
            count = len(children)
            stack.append((char, position, "", position + 1, len(parts), count, count))
            continue
        if char == "\\":
            if token.end() > position + 1:  # an escaped character
                continue
            return None  # before a newline or at the end: nowhere valid
        if not stack:
            if char == "|":
                return None
            continue  # ")", "]" or ":" at the top level is text
        frame = stack[-1]
        state = frame[_STATE]
        if frame[_KIND] == "(":
            if char == ")":
                keep_as_written(frame)
                continue
            if char == ":" and not state:
                next_part(frame, position, ":")
                continue
        elif char == "]" and state != ":":
            if state == "|":
                alternates = True
                options = (*parts[frame[_PARTS] :], part(frame, position))
                arities[len(options)] = None
                complete(frame, position + 1, _Alternate(options))
            else:
                keep_as_written(frame)
            continue
        elif char == "|" and state != ":":
            next_part(frame, position, "|")
            continue
        elif char == ":" and state != "|":
            when = _RE_WHEN.match(text, position + 1)
            if when:  # [to:when] or [from:to:when]
                before_and_after = (*parts[frame[_PARTS] :], part(frame, position))
                before, after = ((), *before_and_after) if len(before_and_after) == 1 else before_and_after
                whens.append(float(when.group(1)))
                complete(frame, when.end(), _Edit(before, after, whens[-1]))
                skip_to = when.end()
                continue
            if not state:
                next_part(frame, position, ":")
                continue
        if char == "|" or not fail():  # the token ends every open bracket; a "|" would be at the top level
            return None
    if stack and not fail():
        return None
    nodes, position = [], 0
    for start, end, node in top:
        if position < start:
            nodes.append((position, start))
        nodes.append(node)
        position = end
    if position < len(text):
        nodes.append((position, len(text)))
    return _Tree(tuple(nodes), tuple(dict.fromkeys(whens)), alternates, tuple(arities))


@lru_cache(maxsize=512)
@without_collector
def _schedule_tree(text: str) -> _Tree | None:
    """The parsed text, or None when it is not valid schedule syntax (then it is plain)."""
    if "[" not in text:  # no edit or alternation possible; the text is used as written
        return None
    return _read(text)


def _when_step(when: float, steps: int) -> int:
    value = when * steps if when < 1 else when
    if value >= steps:  # also catches inf
        return steps
    return max(int(value), -1)  # anything below 0 acts the same; -1 also absorbs -inf


@lru_cache(maxsize=512)
def _boundaries(text: str, steps: int) -> tuple[tuple[int, ...], bool]:
    """The sorted steps at which the text's edits switch, and whether it has an alternation."""
    tree = _schedule_tree(text)
    if tree is None:
        return (), False
    return tuple(sorted({_when_step(when, steps) for when in tree.whens})), tree.alternates


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


def _render(text: str, tree: _Tree, variant: tuple[tuple[bool, ...], tuple[int, ...]]) -> str:
    """The text with each edit showing its "before" part where ``variant[0]`` says so (one flag
    per distinct "when"), and each alternation of ``k`` options its option ``variant[1]`` gives
    for ``k`` (one index per distinct arity)."""
    out: list[str] = []
    append = out.append
    shows_before = dict(zip(tree.whens, variant[0]))
    pick = dict(zip(tree.arities, variant[1]))
    stack = [iter(tree.nodes)]  # iterators, not copies: deep nesting stays linear, and no recursion
    while stack:
        for node in stack[-1]:
            kind = type(node)
            if kind is tuple:
                append(text[node[0] : node[1]])
                continue
            if kind is _Edit:
                branch = node.before if shows_before[node.when] else node.after
            else:
                branch = node.options[pick[len(node.options)]]
            if len(branch) == 1 and type(branch[0]) is tuple:  # the usual case: one span, no need to descend
                append(text[branch[0][0] : branch[0][1]])
                continue
            stack.append(iter(branch))
            break
        else:
            stack.pop()
    return "".join(out)


@lru_cache(maxsize=16)
@without_collector
def _render_variant(text: str, variant: tuple[tuple[bool, ...], tuple[int, ...]]) -> str:
    tree = _schedule_tree(text)
    assert tree is not None  # only called for texts with a tree
    return _render(text, tree, variant)


def _text_at_step(text: str, step: int, steps: int) -> str:
    """The text in force at ``step``. What it shows depends on the step only through each edit's
    side and each alternation's option, so steps that agree on those share one rendering (an
    alternation ``[a|b]`` over 20 steps is rendered twice, not 20 times)."""
    tree = _schedule_tree(text)
    if tree is None:
        return text
    boundary = _boundary(text, step, steps)
    variant = (
        tuple(boundary <= _when_step(when, steps) for when in tree.whens),
        tuple((boundary - 1) % arity for arity in tree.arities),
    )
    return _render_variant(text, variant)


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
    from aipaint.api.request import STEPS_RANGE

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


@without_collector
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
