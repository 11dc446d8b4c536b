"""The prompt language without a model: emphasis, editing/alternation, AND, comments, tags,
the Midjourney front end, and properties over arbitrary text."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aipaint.errors import AipaintError, InvalidParameter
from aipaint.prompt import (
    ExtraNetworkRef,
    LoraRef,
    SubPrompt,
    UnsupportedPromptOption,
    WeightedText,
    describe,
    distinct_schedule,
    parse_attention,
    parse_attention_segments,
    parse_midjourney,
    parse_negative_prompt,
    parse_prompt,
    prompt_at_step,
)


def pairs(text: str) -> list[tuple[str, float]]:
    return [(piece.text, piece.weight) for piece in parse_attention(text)]


def texts_by_step(prompt: str, steps: int) -> list[str]:
    parsed = parse_prompt(prompt)
    return [prompt_at_step(parsed, step, steps)[0][0] for step in range(steps)]


# --- emphasis -------------------------------------------------------------------------------
def test_a1111_example_exactly():
    assert pairs("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0),
        ("house", 1.5730000000000004),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641000000000006),
        (".", 1.1),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("((a))", [("a", 1.1 * 1.1)]),
        ("[[a]]", [("a", (1 / 1.1) * (1 / 1.1))]),
        ("((a:2))", [("a", 2 * 1.1)]),
        ("[(a:2)]", [("a", 2 / 1.1)]),
        ("(a : 1.5 )", [("a ", 1.5)]),
        ("(a:-1)", [("a", -1.0)]),
        ("[a:1.5]", [("a:1.5", 1 / 1.1)]),  # explicit weights only in round brackets
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
    ],
)
def test_emphasis_rules(text, expected):
    result = pairs(text)
    assert [t for t, _ in result] == [t for t, _ in expected]
    assert [w for _, w in result] == pytest.approx([w for _, w in expected])


def test_escapes_are_literal():
    assert pairs(r"\(literal\]") == [("(literal]", 1.0)]
    assert pairs(r"a \\ b") == [("a \\ b", 1.0)]
    assert pairs(r"(a\)b)") == [("a)b", 1.1)]
    assert pairs("a\\b") == [("ab", 1.0)]  # a lone backslash is dropped, as in A1111


def test_unbalanced_brackets_run_to_the_end():
    assert pairs("(unbalanced") == [("unbalanced", 1.1)]
    assert pairs("a [b") == [("a ", 1.0), ("b", 1 / 1.1)]
    assert pairs("a) b]") == [("a) b]", 1.0)]  # closers with nothing open are text


def test_bad_weight_number_does_not_raise():
    assert pairs("(a:1.2.3)") == [("a:1.2.3", 1.1)]
    assert pairs("x :1.5)") == [("x :1.5)", 1.0)]


def test_break_segments():
    assert parse_attention_segments("a BREAK b") == [[WeightedText("a", 1.0)], [WeightedText("b", 1.0)]]
    assert parse_attention_segments("(a BREAK b)") == [[WeightedText("a", 1.1)], [WeightedText("b", 1.1)]]
    assert len(parse_attention_segments("aBREAK break Break")) == 1
    assert parse_attention_segments("BREAK x") == [[], [WeightedText("x", 1.0)]]
    assert pairs("a BREAK b") == [("a BREAK b", 1.0)]  # parse_attention is emphasis only


# --- editing and alternation ---------------------------------------------------------------
def test_edit_to_when_uses_a1111_step_boundaries():
    # A1111 shows the "from" text while the 0-based step is <= when.
    assert texts_by_step("a [b:3]", 10) == ["a "] * 4 + ["a b"] * 6
    assert texts_by_step("a [b: 3 ] c", 10) == ["a  c"] * 4 + ["a b c"] * 6


def test_edit_from_to_with_fraction_and_step_number():
    assert texts_by_step("[cat:dog:0.5]", 10) == ["cat"] * 6 + ["dog"] * 4
    assert texts_by_step("[cat:dog:.25]", 20) == ["cat"] * 6 + ["dog"] * 14
    assert texts_by_step("[cat:dog:7]", 10) == ["cat"] * 8 + ["dog"] * 2
    assert texts_by_step("a [b : c : 1] d", 4) == ["a b  d"] * 2 + ["a  c  d"] * 2


def test_edit_remove_and_nesting():
    assert texts_by_step("a[ in foreground::2]", 5) == ["a in foreground"] * 3 + ["a"] * 2
    assert texts_by_step("a[b:[c:d:2]:1]e", 4) == ["abe", "abe", "ace", "ade"]
    assert texts_by_step("[(a:2):3]", 5) == [""] * 4 + ["(a:2)"]


def test_edit_with_huge_or_negative_when_does_not_raise():
    assert texts_by_step("a [b:1e999] c", 3) == ["a  c"] * 3
    assert texts_by_step("[x:y:-3]", 3) == ["y"] * 3


def test_alternation_changes_every_step():
    assert texts_by_step("[a|(b:1.1)]", 6) == ["a", "a", "(b:1.1)", "a", "(b:1.1)", "a"]
    assert texts_by_step("[fe|]male", 5) == ["female", "female", "male", "female", "male"]
    assert texts_by_step("[fe|||]male", 6) == ["female", "female", "male", "male", "male", "female"]


def test_alternations_of_different_lengths_and_an_edit_keep_their_own_phase():
    # Steps that agree on every edit's side and every alternation's option share one rendering;
    # alternations of 3 and 2 options and an edit must still each follow A1111's step counter.
    assert texts_by_step("[a|b|c] [x|y] [p:q:3]", 7) == [
        "a x p", "a x p", "b y p", "c x p", "a y q", "b x q", "c y q",
    ]


def test_syntax_the_grammar_rejects_is_plain_text():
    for text in ("a|b", "a [unbalanced", "((a][:b:c", "x [a:b:c]", "[a|b] \\"):
        assert texts_by_step(text, 3) == [text] * 3
    assert texts_by_step("((a][:b:c [d:3]", 5) == ["((a][:b:c "] * 4 + ["((a][:b:c d"]


def test_step_out_of_range_is_clamped():
    parsed = parse_prompt("[a:b:2]")
    assert prompt_at_step(parsed, -5, 4) == (("a", 1.0),)
    assert prompt_at_step(parsed, 99, 4) == (("b", 1.0),)
    assert prompt_at_step(parsed, 0, 0) == (("a", 1.0),)


def test_distinct_schedule_lists_each_change_once():
    parsed = parse_prompt("a [red:blue:4] cat AND [x:y:2] :0.5")
    assert distinct_schedule(parsed, 8) == [
        (0, (("a red cat", 1.0), ("x", 0.5))),
        (3, (("a red cat", 1.0), ("y", 0.5))),
        (5, (("a blue cat", 1.0), ("y", 0.5))),
    ]
    assert distinct_schedule(parse_prompt("plain"), 30) == [(0, (("plain", 1.0),))]


# --- AND, comments, tags ----------------------------------------------------------------------
def test_and_weights():
    parsed = parse_prompt("a cat :1.2 AND a dog :0.8 AND a bird")
    assert parsed.subprompts == (SubPrompt("a cat", 1.2), SubPrompt("a dog", 0.8), SubPrompt("a bird", 1.0))
    assert parse_prompt("a cat :1.5").subprompts == (SubPrompt("a cat", 1.5),)
    assert parse_prompt("ANDROID and BRAND").subprompts == (SubPrompt("ANDROID and BRAND", 1.0),)
    assert parse_prompt("(a:1.2)").subprompts == (SubPrompt("(a:1.2)", 1.0),)


def test_and_parts_are_scheduled_separately():
    parsed = parse_prompt("[a:b:1] AND [c|d]")
    assert [prompt_at_step(parsed, s, 4) for s in range(4)] == [
        (("a", 1.0), ("c", 1.0)),
        (("a", 1.0), ("c", 1.0)),
        (("b", 1.0), ("d", 1.0)),
        (("b", 1.0), ("c", 1.0)),
    ]


def test_comment_lines_are_dropped():
    parsed = parse_prompt("# style notes\na cat\n   # another\nin a hat")
    assert parsed.subprompts == (SubPrompt("a cat\nin a hat", 1.0),)
    assert parse_prompt("a #1 fan").subprompts == (SubPrompt("a #1 fan", 1.0),)


def test_lora_tags():
    parsed = parse_prompt(
        "a cat <lora:film:0.7>, <lora:style:0.5:0.8> <lyco:ly:0.3> <lora:plain> AND dog <lora:x:te=0.2:unet=0.9>"
    )
    assert parsed.loras == (
        LoraRef("film", 0.7),
        LoraRef("style", unet_weight=0.8, te_weight=0.5),  # A1111 order: <lora:name:te:unet>
        LoraRef("ly", 0.3, kind="lyco"),
        LoraRef("plain", 1.0),
        LoraRef("x", unet_weight=0.9, te_weight=0.2),
    )
    assert parsed.subprompts == (SubPrompt("a cat ,", 1.0), SubPrompt("dog", 1.0))
    assert LoraRef("film", 0.7).text_encoder_weight == 0.7
    assert parse_prompt("<lora:a:0.5:0.5>").loras == (LoraRef("a", 0.5),)


def test_unreadable_lora_tag_stays_text_with_a_warning():
    parsed = parse_prompt("x <lora:film:strong>")
    assert parsed.loras == ()
    assert parsed.subprompts[0].text == "x <lora:film:strong>"
    assert "film" in parsed.warnings[0]


def test_other_tags_are_recorded_and_removed():
    parsed = parse_prompt("a <hypernet:anime:0.5> cat")
    assert parsed.extra_networks == (ExtraNetworkRef("hypernet", ("anime", "0.5")),)
    assert parsed.subprompts == (SubPrompt("a  cat", 1.0),)


def test_parsed_prompt_equality_ignores_source():
    assert parse_prompt("a cat :2 AND dog") == parse_prompt("a cat:2 AND  dog ")
    assert parse_prompt("a cat") != parse_prompt("a dog")


# --- negative prompts ------------------------------------------------------------------------------
def test_negative_prompt_keeps_and_and_tags_as_text():
    negative = parse_negative_prompt("# my usual negatives\nblurry AND ugly <lora:bad:1> :0.5\n")
    assert negative.subprompts == (SubPrompt("blurry AND ugly <lora:bad:1> :0.5"),)
    assert negative.loras == () and negative.extra_networks == ()
    assert any("AND in the negative prompt" in w for w in negative.warnings)
    assert any("<lora:bad:1> in the negative prompt" in w for w in negative.warnings)


def test_negative_prompt_still_schedules_edits():
    negative = parse_negative_prompt("[blurry:grainy:0.5]")
    assert prompt_at_step(negative, 0, 10) == (("blurry", 1.0),)
    assert prompt_at_step(negative, 9, 10) == (("grainy", 1.0),)
    assert parse_negative_prompt("blurry").warnings == ()


def test_midjourney_negative_is_a_negative_prompt():
    assert parse_midjourney("a cat --no text AND logos").parsed_negative.subprompts == (SubPrompt("text AND logos"),)


# --- Midjourney front end --------------------------------------------------------------------------
def test_midjourney_multi_prompt_matches_a1111():
    mj = parse_midjourney("a red cat::3 a blue dog::1 --no blurry, text --no watermark")
    assert mj.prompt == "a red cat :0.75 AND a blue dog :0.25"
    assert mj.negative == "blurry, text, watermark"
    assert mj.parsed == parse_prompt("a red cat :0.75 AND a blue dog :0.25")
    assert mj.parsed_negative == parse_prompt("blurry, text, watermark")


def test_midjourney_weights_default_and_plain_prompt():
    assert parse_midjourney("hot:: dog").prompt == "hot :0.5 AND dog :0.5"
    assert parse_midjourney("a (cat:1.2) <lora:x:0.5>").parsed == parse_prompt("a (cat:1.2) <lora:x:0.5>")
    assert parse_midjourney("cat::2").prompt == "cat"
    with pytest.raises(InvalidParameter, match="positive"):
        parse_midjourney("cat::-1 dog::0.5")


@pytest.mark.parametrize(
    ("ratio", "base", "size"),
    [
        ("1:1", 512, (512, 512)),
        ("16:9", 512, (680, 384)),
        ("2:3", 1024, (840, 1256)),
        ("9:16", 512, (384, 680)),
    ],
)
def test_midjourney_aspect_ratio(ratio, base, size):
    mj = parse_midjourney(f"a cat --ar {ratio}", base_size=base)
    assert (mj.width, mj.height) == size
    assert mj.width % 8 == 0 and mj.height % 8 == 0
    assert abs(mj.width * mj.height - base * base) / (base * base) < 0.03


@pytest.mark.parametrize(
    ("text", "default", "size"),
    [
        ("a cat --ar 16:9", (32, 32), (40, 24)),
        ("a cat --ar 16:9", (512, 512), (680, 384)),
        ("a cat --ar 1:1", (1024, 768), (888, 888)),
        ("a cat", (32, 48), (32, 48)),
    ],
)
def test_midjourney_size_for_a_model_default(text, default, size):
    mj = parse_midjourney(text)
    assert mj.size_for(*default) == size
    if mj.aspect:
        assert abs(size[0] * size[1] - default[0] * default[1]) / (default[0] * default[1]) < 0.1


def test_no_midjourney_hint_names_a_parameter_that_does_not_exist():
    from dataclasses import fields

    from aipaint.api.request import GenerationRequest
    from aipaint.prompt.midjourney import _UNSUPPORTED_HINTS

    parameters = {f.name for f in fields(GenerationRequest)}
    for hint in _UNSUPPORTED_HINTS.values():
        for word in re.findall(r"\b[a-z]+_[a-z_]+\b", hint):
            assert word in parameters, f"{hint!r} names {word!r}, which is no request parameter"


def test_midjourney_seed_steps_and_em_dash():
    mj = parse_midjourney("a cat \u2014ar 3:2 --seed 1234 --steps 30")
    assert (mj.width, mj.seed, mj.steps, mj.prompt) == (624, 1234, 30, "a cat")
    assert parse_midjourney("a cat").seed is None


@pytest.mark.parametrize(
    ("option", "hint"),
    [
        ("--stylize 250", "cfg_scale"),
        ("--chaos 50", "seed"),
        ("--q 2", "--steps"),
        ("--v 6", "model"),
        ("--repeat 4", "batch_size"),
        ("--tile", "not available"),
        ("--cref http://x/y.png", "img2img"),
        ("--foo", "supported options"),
    ],
)
def test_midjourney_unsupported_options_say_what_to_use(option, hint):
    with pytest.raises(UnsupportedPromptOption) as caught:
        parse_midjourney(f"a cat {option}")
    assert option.split()[0] in str(caught.value) and hint in str(caught.value)
    assert isinstance(caught.value, AipaintError)


@pytest.mark.parametrize(
    "options", ["--ar 16x9", "--ar 0:1", "--seed -1", "--seed x", "--no", "--ar 1:1 --aspect 2:1"]
)
def test_midjourney_bad_values(options):
    with pytest.raises(InvalidParameter):
        parse_midjourney(f"a cat {options}")


# --- describe and import weight ------------------------------------------------------------------------
def test_describe_explains_fragments_schedule_and_loras():
    text = describe(parse_prompt("a (cat:1.3) [dog:fox:5] <lora:film:0.6> AND b BREAK c :0.5"), steps=10)
    assert "LoRA 'film'" in text and "0.6" in text
    assert "'cat' x1.3" in text
    assert "steps 0-5 of 0-9: 'a (cat:1.3) dog'" in text and "steps 6-9 of 0-9" in text
    assert "guidance weight 0.5" in text and "BREAK, then 'c'" in text


def test_importing_the_prompt_package_does_not_import_torch():
    code = "import sys, aipaint.prompt; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- properties -------------------------------------------------------------------------------
_SYNTAX = st.sampled_from(
    [
        "(",
        ")",
        "[",
        "]",
        ":",
        "|",
        "\\",
        " ",
        "\n",
        "#",
        "<",
        ">",
        "a",
        "cat",
        "0.5",
        "1.2",
        "3",
        "-1",
        "e9",
        "AND",
        "BREAK",
        "lora:",
        "lyco:",
        "=",
        ",",
        "é",
        "猫",
        "\u2014",
        "\t",
    ]
)
_PROMPTS = st.one_of(st.text(max_size=60), st.lists(_SYNTAX, max_size=30).map("".join))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_PROMPTS, steps=st.integers(min_value=-2, max_value=25))
def test_parsing_never_raises(text, steps):
    parsed = parse_prompt(text)
    assert parsed.subprompts
    for step in range(-1, max(steps, 1) + 1):
        for part_text, weight in prompt_at_step(parsed, step, steps):
            assert isinstance(part_text, str) and isinstance(weight, float)
    assert parse_attention(text)
    assert parse_attention_segments(text)
    assert distinct_schedule(parsed, steps)[0][0] == 0
    assert describe(parsed, steps=3)


_NO_BRACKETS = st.text(alphabet=st.characters(blacklist_characters="()[]"), max_size=80)


def _without_escapes(text: str) -> str:
    return re.sub(r"\\(\\?)", r"\1", text)


@settings(max_examples=300, deadline=None)
@given(text=_NO_BRACKETS)
def test_fragments_give_back_bracket_free_text(text):
    pieces = parse_attention(text)
    assert "".join(piece.text for piece in pieces) == _without_escapes(text)
    assert all(piece.weight == 1.0 for piece in pieces)
    assert len(pieces) == 1


@settings(max_examples=200, deadline=None)
@given(text=_NO_BRACKETS.filter(lambda t: "AND" not in t and "<" not in t and "#" not in t and ":" not in t))
def test_plain_text_is_in_force_at_every_step(text):
    parsed = parse_prompt(text)
    assert distinct_schedule(parsed, 7) == [(0, ((text.strip(), 1.0),))]


# --- the cycle collector is paused while parsing, and given back as it was ------------------
def test_parsers_give_the_cycle_collector_back_as_they_found_it():
    import gc
    import threading

    from aipaint.prompt._collector import collector_paused

    assert gc.isenabled()
    parse_attention_segments("(a)[b] BREAK c")
    distinct_schedule(parse_prompt("[a|b] [c:d:2]"), 5)
    assert gc.isenabled()
    with pytest.raises(InvalidParameter):
        parse_attention("(" * 200 + "a")  # a typed error inside the paused region
    assert gc.isenabled()

    gc.disable()  # a caller that turned it off keeps it off
    try:
        parse_attention("(a)")
        assert not gc.isenabled()
    finally:
        gc.enable()

    # Two threads inside at once: the collector stays paused until the last one leaves.
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with collector_paused():
            inside.set()
            release.wait(5)

    worker = threading.Thread(target=hold)
    worker.start()
    inside.wait(5)
    parse_attention("(a)")  # enters and leaves while the other thread is inside
    assert not gc.isenabled()
    release.set()
    worker.join(5)
    assert gc.isenabled()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["a", "b", " ", "[", "]", "(", ")", ":", "|", "\\", "0.5", "3", " 2 ]", "[a|b]",
                                 "[x:y:2]", "[:1]", "[a|]", "(c:1.2)", "1e1"]), max_size=14).map("".join),
       st.integers(1, 9))
def test_plain_brackets_read_at_once_as_the_token_loop_reads_them(text, steps):
    from aipaint.prompt import schedule

    def texts() -> list:
        schedule._schedule_tree.cache_clear()
        schedule._boundaries.cache_clear()
        schedule._render_variant.cache_clear()
        parsed = parse_prompt(text)
        return [prompt_at_step(parsed, step, steps) for step in range(steps)]

    fast = texts()
    schedule.READ_SIMPLE_AT_ONCE = False
    try:
        assert texts() == fast
    finally:
        schedule.READ_SIMPLE_AT_ONCE = True
