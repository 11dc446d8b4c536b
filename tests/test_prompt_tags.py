"""Extra-network tags other than LoRA's: routed to the adapter that declares their kind, else ignored
with a warning that names them (A1111 skips unknown kinds; aipaint never does so silently)."""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager

import numpy as np
import pytest

import aipaint
from aipaint import hookimpl
from aipaint.plugin.adapters import AdapterActivation, AdapterSpec
from aipaint.plugin.host import create_plugin_host
from aipaint.prompt import ExtraNetworkRef, PromptWarning

GEN = dict(seed=3, width=32, height=32, steps=2, cfg_scale=5.0)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def test_a_tag_no_adapter_handles_is_ignored_with_a_warning_that_names_it(tiny_pipe):
    plain = pixels(tiny_pipe.txt2img("a cat", **GEN))
    with pytest.warns(PromptWarning, match=re.escape("<hypernet:x:1>")) as caught:
        tagged = pixels(tiny_pipe.txt2img("a cat <hypernet:x:1>", **GEN))
    (message,) = [str(w.message) for w in caught if issubclass(w.category, PromptWarning)]
    assert "'hypernet'" in message and "ignored" in message
    assert np.array_equal(tagged, plain)  # removed from the text, as in A1111
    with pytest.warns(PromptWarning, match=re.escape("<hypernet:x:1>, <wildcard:animals>")):
        tiny_pipe.txt2img("a cat <hypernet:x:1> <wildcard:animals>", **GEN)


def test_a_plugin_that_declares_the_kind_receives_the_tag_and_nothing_warns(tiny_sd_path):
    seen: list[tuple] = []

    @contextmanager
    def activate(context):
        seen.append(context.prompt_refs)
        yield AdapterActivation(infotext={"Hypernet": ", ".join(ref.args[0] for ref in context.prompt_refs)})

    class HypernetPlugin:
        @hookimpl
        def register_adapters(self, register):
            register(AdapterSpec(name="hypernet", activate=activate, prompt_tags=("hypernet",)))

    pipe = aipaint.load(tiny_sd_path, host=create_plugin_host(extra_plugins=(HypernetPlugin(),)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptWarning)
        result = pipe.txt2img("a cat <hypernet:anime:0.5>", **GEN)
    assert seen == [(ExtraNetworkRef("hypernet", ("anime", "0.5")),)]
    assert "Hypernet: anime" in result.infotexts[0]


def test_the_cli_says_an_ignored_tag_once_per_command_even_across_hires_passes(tmp_path, capsys):
    from aipaint.cli.main import main

    out = tmp_path / "h.png"
    assert main(["generate", "a red circle <hypernet:x:1>", "--steps", "2", "--seed", "1",
                 "--post", "hires:scale=2,steps=2", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "<hypernet:x:1>" in line]
    assert lines == [lines[0]] and lines[0].startswith("aipaint: warning: the prompt's <hypernet:x:1> tag was removed")
    assert "PromptWarning" not in err  # one plain line, not Python's file:line form
    assert issubclass(PromptWarning, aipaint.errors.AipaintWarning)
