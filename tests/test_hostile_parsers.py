"""Hostile text for every parser of user text: only aipaint's typed errors, in linear time.

Three kinds of test. Properties over any text (hypothesis): a parse returns or raises an
``AipaintError``, within a deadline; and on short texts it finds what A1111's own patterns and
algorithm find (kept here as references: they are quadratic, which is why they were
replaced). Regressions for each worst shape found: a megabyte parses within a generous
CPU-time bound (the old code took hours on most of them; ``benchmarks/parsers.py`` has the
times). And the command line's answer to each hostile input listed in ``docs/bad-input.md``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from datetime import timedelta
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from aipaint.cli.main import main
from aipaint.errors import AipaintError, DownloadError, InvalidParameter, ModelLoadError
from aipaint.infotext import Infotext, _entries, _entries_only, generation_kwargs
from aipaint.models import loading
from aipaint.models.loading import resolve_source
from aipaint.plugin.postprocess import PostStep, merge_infotext
from aipaint.prompt import (
    describe,
    distinct_schedule,
    parse_attention,
    parse_attention_segments,
    parse_midjourney,
    parse_negative_prompt,
    parse_prompt,
    prompt_at_step,
)
from aipaint.prompt.midjourney import _RE_LEADING_WEIGHT
from aipaint.prompt.parser import MAX_EMPHASIS_DEPTH, MAX_EMPHASIS_WEIGHT, _split_breaks, _subprompt_weight

MEGABYTE = 1_000_000
CPU_SECONDS = 2.0  # for one megabyte; the parsers take well under half of it, the old code hours

# --- A1111's code, the reference on short texts -----------------------------------------------
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
A1111_SUBPROMPT_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
OLD_MJ_WEIGHT = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+))(?=\s|$)")
A1111_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")


def a1111_attention(text: str) -> list[tuple[str, float]]:
    """modules/prompt_parser.py's parse_prompt_attention (BREAK left as text), merged as it merges."""
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in A1111_ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            start = round_brackets.pop()
            try:
                multiplier = float(weight)
            except ValueError:  # A1111 crashes on "(a:1.2.3)"; aipaint keeps the text and closes normally
                res.append([token[:-1], 1.0])
                multiplier = 1.1
            multiply_range(start, multiplier)
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            res.append([token, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    merged: list[list] = []
    for text_, weight_ in res:
        if merged and merged[-1][1] == weight_:
            merged[-1][0] += text_
        else:
            merged.append([text_, weight_])
    return [(t, w) for t, w in merged if t]


def a1111_entries_only(line: str) -> list[tuple[str, str]]:
    found, position = [], 0
    while position < len(line):
        match = A1111_PARAM.match(line, position)
        if match is None or match.end() == position:
            return []
        found.append((match[1], match[2]))
        position = match.end()
    return found


# --- strategies ------------------------------------------------------------------------------
_SYNTAX = st.sampled_from(
    ["(", ")", "[", "]", ":", "|", "\\", " ", "\n", "\t", ",", '"', "<", ">", "#", "=", "-", "/", "_", ".", "e",
     "a", "B", "1", "9", "0.5", "1e400", "٣", "\u00a0", "\x1c", "é", "AND", "BREAK", "<lora:x:0.5>", "<a:b>",
     "--ar ", "--seed ", "--steps ", "--no ", "::", "Steps: ", "Size: ", "Seed: ", "x", "inf", "nan", "999999999999"]
)
TEXT = st.one_of(st.text(max_size=80), st.lists(_SYNTAX, max_size=40).map("".join))
# Each example is small, so the deadline is far above what one takes; a parse that went
# super-linear on some shape would still be caught by the regressions below.
QUICK = settings(max_examples=150, deadline=timedelta(milliseconds=500), suppress_health_check=[HealthCheck.too_slow])


def returns_or_raises_typed(parse: Callable[[object], object], subject: object) -> object:
    try:
        return parse(subject)
    except AipaintError as error:
        assert "\n" not in str(error), "one line"
        assert len(str(error)) < 600, "a message about long input must cut it"
        return error


# --- properties: typed errors only, A1111's results ------------------------------------------
@QUICK
@given(text=TEXT)
def test_infotext_reads_any_text_and_numbers_fail_typed(text):
    info = Infotext.from_text(text)  # never raises
    returns_or_raises_typed(generation_kwargs, info)
    returns_or_raises_typed(lambda i: i.size(), info)


@QUICK
@given(line=TEXT.map(lambda t: t.replace("\n", " ")))
def test_infotext_entries_are_a1111s(line):
    assert _entries(line) == A1111_PARAM.findall(line)
    assert _entries_only(line) == a1111_entries_only(line)


@QUICK
@given(text=TEXT, steps=st.integers(min_value=-2, max_value=30))
def test_prompt_language_reads_any_text_and_fails_typed(text, steps):
    parsed = parse_prompt(text)  # never raises
    parse_negative_prompt(text)
    returns_or_raises_typed(parse_attention, text)
    returns_or_raises_typed(parse_attention_segments, text)
    returns_or_raises_typed(lambda p: distinct_schedule(p, steps), parsed)
    returns_or_raises_typed(lambda p: describe(p, steps=steps), parsed)
    for step in (0, max(steps, 1) - 1):
        prompt_at_step(parsed, step, steps)  # never raises


@QUICK
@given(text=TEXT)
def test_emphasis_is_a1111s_and_refuses_only_what_a1111_cannot_weigh(text):
    expected = a1111_attention(text)  # these texts open at most 40 brackets: below MAX_EMPHASIS_DEPTH
    try:
        pieces = [(p.text, p.weight) for p in parse_attention(text) if p.text]
    except InvalidParameter:
        assert any(not abs(w) <= MAX_EMPHASIS_WEIGHT for _, w in expected)
        return
    assert pieces == expected


@QUICK
@given(text=TEXT)
def test_break_and_subprompt_weights_are_a1111s(text):
    assert _split_breaks(text) == A1111_BREAK.split(text)
    expected = A1111_SUBPROMPT_WEIGHT.search(text)
    body, weight = _subprompt_weight(text)
    assert (body.strip(), weight) == (expected.group(1).strip(), expected.group(2))


@QUICK
@given(text=TEXT)
def test_midjourney_reads_any_text_and_fails_typed(text):
    returns_or_raises_typed(parse_midjourney, text)
    for part in text.split("::"):
        old, new = OLD_MJ_WEIGHT.match(part), _RE_LEADING_WEIGHT.match(part)
        assert (old and old.group(1)) == (new and new.group(1))


@QUICK
@given(text=TEXT)
def test_option_text_fails_typed(text):
    from aipaint_plugins.controlnet.cli import parse_controlnet_option
    from aipaint_plugins.controlnet.units import units_from_params

    returns_or_raises_typed(PostStep.parse, text)
    returns_or_raises_typed(parse_controlnet_option, text)
    returns_or_raises_typed(units_from_params, {"ControlNet 0": text, text: text})


@settings(max_examples=60, deadline=timedelta(seconds=1), suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT)
def test_model_ids_fail_typed(text):
    offline = DownloadError("offline")
    with mock.patch.object(loading.zoo, "download_from_hub", side_effect=offline):
        returns_or_raises_typed(resolve_source, text)


# --- regressions: each worst shape, a megabyte, linear time ----------------------------------
def repeat(unit: str, head: str = "", tail: str = "", size: int = MEGABYTE) -> str:
    return head + unit * ((size - len(head) - len(tail)) // len(unit)) + tail


def step_text(text: str) -> object:
    return prompt_at_step(parse_prompt(text), 3, 20)


WORST_SHAPES = {
    # reported: minutes to hours before
    "infotext 'a a a'": (Infotext.from_text, repeat(" a", "a")),
    "infotext numbers": (lambda t: generation_kwargs(Infotext.from_text(t)), repeat("9", "a\nSteps: ", ", Seed: 1")),
    "prompt ' '*n+'x'": (parse_prompt, repeat(" ", tail="x")),
    "BREAK ' '*n+'x'": (parse_attention_segments, repeat(" ", tail="x")),
    "emphasis '(a'": (parse_attention, repeat("(a")),
    "emphasis '[a:b'": (parse_attention, repeat("[a:b")),
    "schedule '[a:b'": (step_text, repeat("[a:b")),
    "midjourney --ar 999…:1": (parse_midjourney, repeat("9", "a --ar ", ":1")),
    # found since
    "infotext ',a'": (Infotext.from_text, repeat(",a")),
    "infotext 'k: \"a,'": (Infotext.from_text, repeat('k: "a,')),
    "prompt '<a:'": (parse_prompt, repeat("<a:")),
    "prompt 'a :1 AND '": (parse_prompt, repeat("a :1 AND ")),
    "emphasis '\\\\'": (parse_attention, repeat("\\\\")),
    "emphasis 'BREAK '": (parse_attention_segments, repeat("BREAK ")),
    "schedule '['": (step_text, repeat("[")),
    "schedule nested": (step_text, "[" * (MEGABYTE // 2) + "]" * (MEGABYTE // 2)),
    "midjourney 'a::111…x'": (parse_midjourney, repeat("1", "a::", "x")),
    "--post": (PostStep.parse, repeat("a=1,", "x:")),
    "model id": (resolve_source, repeat("a/")),
}


@pytest.mark.parametrize("name", list(WORST_SHAPES))
def test_a_megabyte_of_the_worst_shape_parses_in_linear_time(name):
    parse, text = WORST_SHAPES[name]
    started = time.process_time()
    returns_or_raises_typed(parse, text)
    assert time.process_time() - started < CPU_SECONDS


# --- the answers, one per hostile input ------------------------------------------------------
def png_with_parameters(path, text: str):
    info = PngInfo()
    info.add_text("parameters", text, zip=True)
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_png_with_a_500k_character_parameters_line(tmp_path, capsys):
    """The issue's 632-byte PNG: info read it for hours, and so did upscale, facefix (through
    merge_infotext) and generate --from-png."""
    text = "a" + " a" * 250_000
    png = png_with_parameters(tmp_path / "x.png", text)
    started = time.process_time()
    code, out, _ = run(capsys, "info", "--json", png)
    assert code == 0 and json.loads(out)["prompt"] == text
    merged = merge_infotext(text, {"Postprocess upscaler": "Lanczos"})
    assert Infotext.from_text(merged).params["Postprocess upscaler"] == "Lanczos"
    assert time.process_time() - started < CPU_SECONDS
    code, _, err = run(capsys, "generate", "--from-png", png, "-o", tmp_path / "out.png")
    assert code == 2 and "must be at most 20000 characters" in err and not (tmp_path / "out.png").exists()


def test_upscale_of_that_png_keeps_its_prompt(tmp_path, capsys):
    text = "a" + " a" * 250_000
    png = png_with_parameters(tmp_path / "x.png", text)
    code, _, _ = run(capsys, "upscale", png, "--upscaler", "Lanczos", "--scale", "2", "-o", tmp_path / "up.png")
    assert code == 0 and Image.open(tmp_path / "up.png").size == (64, 64)
    assert Infotext.from_text(Image.open(tmp_path / "up.png").text["parameters"]).prompt == text


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ("Steps: inf, Seed: 1", "invalid Steps='inf': must be a number; this one is infinite, NaN or too large"),
        ("Steps: 2, Seed: 1e400", "invalid Seed='1e400': must be a number; this one is infinite"),
        ("Steps: " + "9" * 5000 + ", Seed: 1", "invalid Steps='99999"),
        ("Steps: 2, Seed: 1, Size: " + "9" * 5000 + "x32", "each number at most 9 digits"),
        ("Steps: 2, CFG scale: nan, Seed: 1", "invalid CFG scale='nan'"),
    ],
)
def test_infotext_numbers_that_overflow_are_typed_errors(tmp_path, capsys, entries, message):
    png = png_with_parameters(tmp_path / "n.png", "a cat\n" + entries + ", Sampler: Euler")
    code, _, err = run(capsys, "generate", "--from-png", png, "-o", tmp_path / "out.png")
    assert code == 2 and message in err and len(err) < 300
    assert err.startswith("aipaint: error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a --ar " + "9" * 400 + ":1", "W:H with whole numbers from 1 to 10000"),
        ("a --ar " + "9" * 5000 + ":1", "W:H with whole numbers from 1 to 10000"),
        ("a --ar 1:" + "9" * 5000, "W:H with whole numbers from 1 to 10000"),
        ("a --seed " + "9" * 5000, "a whole number from 0 to 4294967295"),
        ("a --steps " + "9" * 5000, "a whole number from 1 to 1000"),
        ("a::" + "9" * 400 + " b", "the ::weights of a multi-prompt must add up to a positive number"),
    ],
)
def test_midjourney_numbers_are_typed_errors(capsys, text, message):
    with pytest.raises(InvalidParameter, match=re.escape(message)):
        parse_midjourney(text)
    code, _, err = run(capsys, "prompt", "--mj", "--no-tokens", text)
    assert code == 2 and message in err and len(err) < 400


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("(red:" + "9" * 400 + ")", "invalid emphasis='red': its weight comes to inf"),
        ("((red:0):" + "9" * 400 + ")", "invalid emphasis='red': its weight comes to nan"),
        ("(" * 8000 + "red", f"at most {MAX_EMPHASIS_DEPTH} brackets ( and [ may be open at once"),
        ("[" * 8000 + "red", f"at most {MAX_EMPHASIS_DEPTH} brackets ( and [ may be open at once"),
        ("(" * 73 + "red", "its weight comes to 1051.15"),  # 1.1 ** 73: the first nesting above 1000
        ("(red:-1001)", "its weight comes to -1001"),
    ],
)
def test_emphasis_weights_that_make_no_picture_are_typed_errors(capsys, prompt, message):
    with pytest.raises(InvalidParameter, match=re.escape(message)):
        parse_attention(prompt)
    code, _, err = run(capsys, "prompt", "--no-tokens", prompt)
    assert code == 2 and message in err and len(err) < 400


def test_emphasis_weights_within_bounds_are_a1111s():
    assert [(p.text, p.weight) for p in parse_attention("(" * 72 + "red")] == [("red", a1111_attention("(" * 72 + "red")[0][1])]
    assert parse_attention("(red:-1000) [" + "[" * 98 + "x")[0].weight == -1000
    assert parse_attention("((red:0):2)")[0].weight == 0.0  # zero is a weight, as in A1111
    assert math.isclose(parse_attention("[" * MAX_EMPHASIS_DEPTH + "x")[0].weight, 1.1**-MAX_EMPHASIS_DEPTH)


def test_an_emphasis_error_stops_a_generation_with_exit_2(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "(red:" + "9" * 400 + ")", "--steps", "1", "-o", tmp_path / "o.png")
    assert code == 2 and "its weight comes to inf" in err and not (tmp_path / "o.png").exists()


def test_prompt_command_checks_steps_and_length_before_any_work(capsys, monkeypatch):
    import aipaint.cli.inspect as inspect_cli

    def refuse(args):
        raise AssertionError("the model was loaded before the checks")

    monkeypatch.setattr(inspect_cli, "load_pipeline", refuse)  # --mj would load the model
    started = time.process_time()
    code, _, err = run(capsys, "prompt", "a", "--no-tokens", "--steps", "1000000000")
    assert code == 2 and "invalid steps=1000000000: must be from 1 to 1000" in err
    code, _, err = run(capsys, "prompt", "a" * 20_001, "--mj")
    assert code == 2 and "invalid prompt='<20001 characters>': must be at most 20000 characters" in err
    # a schedule of 10^9 steps would take minutes: the refusal came first (the bound leaves room for the
    # command line's own start, which grows with every plugin's commands)
    assert time.process_time() - started < 5.0
    with pytest.raises(InvalidParameter, match="must be a whole number from 1 to 1000"):
        describe(parse_prompt("a"), steps=1001)


def test_a_20000_character_worst_prompt_prints_its_description_quickly(capsys):
    for prompt in (" " * 19_999 + "x", "[a:b" * 5000, "(a)[b]" * 3333):
        started = time.process_time()
        code, _, err = run(capsys, "prompt", prompt, "--no-tokens", "--steps", "4")
        assert time.process_time() - started < CPU_SECONDS, prompt[:10]
        assert code in (0, 2), err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("upscale:scale=inf", "invalid post option scale='inf': must be a finite number"),
        ("upscale:scale=" + "9" * 5000, "invalid post option scale="),
        ("upscale:scale", "option 'scale' is not key=value"),
        (":scale=2", "must be NAME or NAME:key=value"),
    ],
)
def test_post_chains_are_typed_errors_before_the_model_loads(tmp_path, capsys, option, message):
    code, _, err = run(capsys, "generate", "a", "--post", option, "-o", tmp_path / "o.png")
    assert code == 2 and message in err and len(err) < 400


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cn", "--controlnet expects MODEL:IMAGE"),
        ("cn:img.png:canny:heavy:x", "is neither PREPROCESSOR, WEIGHT nor KEY=VALUE"),
        ("cn:img.png:canny:1:" + "x" * 5000, "(5000 characters) is neither PREPROCESSOR"),
        ("cn:img.png:canny:heavy", "the weight must be a number, got 'heavy'"),
    ],
)
def test_controlnet_units_are_typed_errors(capsys, spec, message):
    from aipaint_plugins.controlnet.cli import parse_controlnet_option

    with pytest.raises(AipaintError, match=re.escape(message)):
        parse_controlnet_option(spec)


def test_a_model_name_too_long_for_a_path_is_not_found(tmp_path, capsys):
    for name in ("a" * 5000, "a/" * 3000, "x" * 300 + "/" + "y" * 1000):
        with pytest.raises(ModelLoadError, match=r"^no model '.*….*' \(\d+ characters\): it is not a zoo id"):
            resolve_source(name)
    with pytest.raises(ModelLoadError, match="^no model '~nobody-aipaint/x': it is not a zoo id"):
        resolve_source("~nobody-aipaint/x")  # Path.expanduser raises RuntimeError for an unknown user
    code, _, err = run(capsys, "generate", "a", "-m", "a" * 5000, "-o", tmp_path / "o.png")
    assert code == 2 and "(5000 characters): it is not a zoo id" in err and len(err) < 400


def test_controlnet_entries_of_a_png_with_a_huge_unit_number_are_ignored():
    from aipaint_plugins.controlnet.units import units_from_params

    assert units_from_params({"ControlNet " + "9" * 5000: "Model: m", "ControlNet 1": "Model: n"}) == [{"model": "n"}]
