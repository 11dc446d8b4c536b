"""Parse time of every parser of user text on its worst-shaped inputs, at 10 KB, 100 KB and 1 MB.

The parsers: A1111 infotext (``Infotext.from_text``, ``generation_kwargs``), the A1111 prompt
language (``parse_prompt``, emphasis and BREAK, editing and alternation per step), the
Midjourney front end, ``--post`` chains, ``--controlnet`` units and the ControlNet entries of
PNG parameters, and model ids. The shapes are the ones that made the old code (A1111's
patterns) quadratic, and others that make the most work for the new code: the most tokens,
pieces, brackets or entries per byte.

For each shape it prints the CPU time (``time.process_time``) of one parse at each size (the
best of ``--repeats``; typed errors, where a shape is refused, count as parses), the growth
from 100 KB to 1 MB (10 for linear time, 100 for quadratic), and at 10 KB the time of the
pattern or algorithm it replaced, measured in the same run, where the old code differs.
CPU time, not wall time, because the machines it runs on are shared.

Usage: python benchmarks/parsers.py [--repeats 3] [--sizes 10000,100000,1000000] [--no-reference]
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable

from aipaint_plugins.controlnet.cli import parse_controlnet_option
from aipaint_plugins.controlnet.units import units_from_params

from aipaint.errors import AipaintError
from aipaint.infotext import Infotext, generation_kwargs
from aipaint.models.loading import resolve_source
from aipaint.plugin.postprocess import PostStep
from aipaint.prompt import (
    distinct_schedule,
    parse_attention_segments,
    parse_midjourney,
    parse_prompt,
    prompt_at_step,
    schedule,
)

# --- the code each parser replaced (A1111's patterns and algorithm), for the reference column ---
_A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_A1111_SUBPROMPT_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
_A1111_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_OLD_MJ_WEIGHT = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+))(?=\s|$)")
_A1111_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:", re.X)


def a1111_attention(text: str) -> list[list]:
    """A1111's parse_prompt_attention with its BREAK split (modules/prompt_parser.py)."""
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _A1111_ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_A1111_BREAK.split(token)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def a1111_prompt(text: str) -> list:
    body = _A1111_EXTRA_NETWORK.sub("", text)
    return [_A1111_SUBPROMPT_WEIGHT.search(part).groups() for part in re.split(r"\bAND\b", body)]


def old_mj_weights(text: str) -> list:
    return [_OLD_MJ_WEIGHT.match(part) for part in text.split("::")[1:]]


# --- the parses ------------------------------------------------------------------------------
def step_text(text: str) -> object:
    """The text in force at one step of 20, read afresh (the tree is cached per text)."""
    schedule._schedule_tree.cache_clear()
    schedule._boundaries.cache_clear()
    schedule._render_variant.cache_clear()
    return prompt_at_step(parse_prompt(text), 3, 20)


def whole_schedule(text: str) -> object:
    schedule._schedule_tree.cache_clear()
    schedule._boundaries.cache_clear()
    schedule._render_variant.cache_clear()
    return distinct_schedule(parse_prompt(text), 20)


def repeat(unit: str, size: int, head: str = "", tail: str = "") -> str:
    return head + unit * max(1, (size - len(head) - len(tail)) // len(unit)) + tail


# (parser, shape, parse, make(size) -> text, reference or None). "[issue]" marks the shapes
# reported against the old code.
SHAPES: list[tuple[str, str, Callable[[str], object], Callable[[int], str], Callable[[str], object] | None]] = [
    ("infotext", "'a a a …' one line, no colon [issue]", Infotext.from_text,
     lambda n: repeat(" a", n, "a"), _A1111_PARAM.findall),
    ("infotext", "'k: v, ' many entries", Infotext.from_text, lambda n: repeat("k: v, ", n), _A1111_PARAM.findall),
    ("infotext", "'k: \"a,' quotes never closed", Infotext.from_text, lambda n: repeat('k: "a,', n), _A1111_PARAM.findall),
    ("infotext", "',a' one-letter keys", Infotext.from_text, lambda n: repeat(",a", n), _A1111_PARAM.findall),
    ("infotext", "'Steps: 999…' (refused)", lambda t: generation_kwargs(Infotext.from_text(t)),
     lambda n: repeat("9", n, "a\nSteps: ", ", Seed: 1, Size: 8x8"), None),
    ("infotext", "'Size: 999…x8' (refused)", lambda t: generation_kwargs(Infotext.from_text(t)),
     lambda n: repeat("9", n, "a\nSteps: 2, Seed: 1, Size: ", "x8"), None),
    ("prompt", "' '*n + 'x' (sub-prompt weight) [issue]", parse_prompt, lambda n: repeat(" ", n, "", "x"), a1111_prompt),
    ("prompt", "'a :1 AND ' many sub-prompts", parse_prompt, lambda n: repeat("a :1 AND ", n), a1111_prompt),
    ("prompt", "'<a:' tags never closed", parse_prompt, lambda n: repeat("<a:", n), a1111_prompt),
    ("emphasis", "' '*n + 'x' (BREAK) [issue]", parse_attention_segments, lambda n: repeat(" ", n, "", "x"),
     a1111_attention),
    ("emphasis", "'BREAK ' many segments", parse_attention_segments, lambda n: repeat("BREAK ", n), a1111_attention),
    ("emphasis", "'(a' unclosed (refused) [issue]", parse_attention_segments, lambda n: repeat("(a", n), a1111_attention),
    ("emphasis", "'[a:b' unclosed (refused) [issue]", parse_attention_segments, lambda n: repeat("[a:b", n),
     a1111_attention),
    ("emphasis", "'(a)[b]' most pieces", parse_attention_segments, lambda n: repeat("(a)[b]", n), a1111_attention),
    ("emphasis", "99 open, then '(a)[b]'", parse_attention_segments, lambda n: repeat("(a)[b]", n, "([" * 49 + "("),
     a1111_attention),
    ("emphasis", "'\\\\' escapes", parse_attention_segments, lambda n: repeat("\\\\", n), a1111_attention),
    ("emphasis", "'(a:1.1)' weights", parse_attention_segments, lambda n: repeat("(a:1.1)", n), a1111_attention),
    ("schedule", "'[a:b' unclosed [issue]", step_text, lambda n: repeat("[a:b", n), None),
    ("schedule", "'[a:b:0.5]' edits", step_text, lambda n: repeat("[a:b:0.5]", n), None),
    ("schedule", "'[a|b]' alternations", step_text, lambda n: repeat("[a|b]", n), None),
    ("schedule", "'[' unclosed", step_text, lambda n: repeat("[", n), None),
    ("schedule", "'[[…]]' nested", step_text, lambda n: "[" * (n // 2) + "]" * (n // 2), None),
    ("schedule", "nested edits '[[a:b:1]c:2]…'", step_text, lambda n: "[" * (n // 3) + "a:b:" + "1]" * (n // 3), None),
    ("schedule", "'[a:b:0.5]', each of 20 steps", whole_schedule, lambda n: repeat("[a:b:0.5]", n), None),
    ("schedule", "'[a|b]', 20 steps = 20 texts", whole_schedule, lambda n: repeat("[a|b]", n), None),
    ("midjourney", "'a::111…x' digit run", parse_midjourney, lambda n: repeat("1", n, "a::", "x"), old_mj_weights),
    ("midjourney", "'a ::1 ' many parts", parse_midjourney, lambda n: repeat("a ::1 ", n), old_mj_weights),
    ("midjourney", "'--ar 999…:1' (refused)", parse_midjourney, lambda n: repeat("9", n, "a --ar ", ":1"), None),
    ("midjourney", "'--seed 999…' (refused)", parse_midjourney, lambda n: repeat("9", n, "a --seed "), None),
    ("midjourney", "'--no x ' many options", parse_midjourney, lambda n: repeat(" --no x", n, "a"), None),
    ("--post", "'x:a=1,' many options", PostStep.parse, lambda n: repeat("a=1,", n, "x:"), None),
    ("--post", "'x:a=999…' (refused)", PostStep.parse, lambda n: repeat("9", n, "x:a="), None),
    ("--controlnet", "'m:i:k=1' many options", parse_controlnet_option, lambda n: repeat(":k=1", n, "m:i"), None),
    ("ControlNet PNG entry", "'Weight: 1, ' many fields", lambda t: units_from_params({"ControlNet 0": t}),
     lambda n: repeat("Weight: 1, ", n, "Model: m, "), None),
    ("model id", "'aaa…' (refused)", resolve_source, lambda n: repeat("a", n), None),
    ("model id", "'a/a/…' (refused)", resolve_source, lambda n: repeat("a/", n), None),
]


def cpu_time(parse: Callable[[str], object], text: str, repeats: int) -> tuple[float, str]:
    best, outcome = float("inf"), "ok"
    for _ in range(repeats):
        started = time.process_time()
        try:
            parse(text)
        except AipaintError as error:
            outcome = type(error).__name__
        best = min(best, time.process_time() - started)
    return best, outcome


def calibration() -> float:
    """CPU seconds for a million calls of a trivial Python function: how fast this machine runs
    Python at the moment, to compare tables made on different machines or under different load."""

    def noop(value: int) -> int:
        return value

    started = time.process_time()
    for value in range(1_000_000):
        noop(value)
    return time.process_time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="parses per size; the best is kept (default 3)")
    parser.add_argument("--sizes", default="10000,100000,1000000", help="input sizes in characters")
    parser.add_argument("--no-reference", action="store_true", help="skip the old code's times at the smallest size")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# CPU seconds per parse (best of {args.repeats}); load average {os.getloadavg()[0]:.1f} at the start; "
          f"a million Python calls took {min(calibration() for _ in range(3)):.3f} s")
    head = f"{'parser':<20} {'shape':<40}" + "".join(f"{s:>10,}" for s in sizes)
    print(head + f"{'growth':>8}  {'old at ' + format(sizes[0], ','):>14}  outcome")
    slowest, over_a_second = (0.0, ""), 0
    for name, shape, parse, make, reference in SHAPES:
        times, outcome = [], "ok"
        for size in sizes:
            seconds, outcome = cpu_time(parse, make(size), args.repeats)
            times.append(seconds)
        if times[-1] > slowest[0]:
            slowest = (times[-1], f"{name}: {shape}")
        over_a_second += times[-1] >= 1.0
        growth = f"{times[-1] / times[-2]:8.1f}" if len(times) > 1 and times[-2] > 0 else f"{'':8}"
        old = ""
        if reference is not None and not args.no_reference:
            old_seconds, _ = cpu_time(reference, make(sizes[0]), 1)
            old = f"{old_seconds:.3f} ({old_seconds / max(times[0], 1e-6):.2g}x)"
        print(f"{name:<20} {shape:<40}" + "".join(f"{t:10.4f}" for t in times) + f"{growth}  {old:>14}  {outcome}")
    print(f"# slowest parse at {sizes[-1]:,} characters: {slowest[0]:.3f} s ({slowest[1]}); "
          f"{over_a_second} of {len(SHAPES)} shapes took 1 s or more")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
