"""Prompt styles from plugins (``register_styles``): merged with the user's styles.csv, the user's
style winning on a name clash with a warning; a broken plugin is named and skipped; ``--style``
and ``aipaint styles`` see them."""

from __future__ import annotations

import argparse

import pytest

from aipaint import hookimpl
from aipaint.cli.styles import apply_style_options, cmd_styles, register_commands
from aipaint.errors import AipaintWarning, InvalidParameter
from aipaint.plugin.host import create_plugin_host
from aipaint.prompt.styles import PromptStyle, merged_styles, plugin_styles


class Inks:
    @hookimpl
    def register_styles(self, register):
        register(PromptStyle("ink", "{prompt}, ink drawing", "colour"))
        register(PromptStyle("neon", "neon glow"))


class AlsoInk:
    @hookimpl
    def register_styles(self, register):
        register(PromptStyle("ink", "another ink"))


class Broken:
    @hookimpl
    def register_styles(self, register):
        register(PromptStyle("half", "registered before the error"))
        raise RuntimeError("boom in styles")


class NotAStyle:
    @hookimpl
    def register_styles(self, register):
        register({"name": "dict", "prompt": "x"})


def host_with(*plugins):
    return create_plugin_host(extra_plugins=plugins, load_entry_points=False, run_registration=False)


def test_plugin_styles_are_collected_with_their_plugin():
    styles = plugin_styles(host_with(Inks()))
    assert set(styles) == {"ink", "neon"}
    assert styles["ink"][0] == PromptStyle("ink", "{prompt}, ink drawing", "colour")
    assert styles["ink"][1]  # the plugin's name, for notes and the listing


def test_a_second_plugin_cannot_take_a_name_and_a_broken_one_is_skipped():
    with pytest.warns(AipaintWarning) as caught:
        styles = plugin_styles(host_with(Inks(), AlsoInk(), Broken(), NotAStyle()))
    messages = " | ".join(str(w.message) for w in caught)
    assert styles["ink"][0].prompt == "{prompt}, ink drawing"  # the first plugin's, the second's ignored
    assert "style 'ink' from plugin" in messages and "boom in styles" in messages and "register_styles" in messages
    assert "half" not in styles and "dict" not in styles


def test_the_users_style_wins_on_a_name_clash_with_a_note():
    user = {"ink": PromptStyle("ink", "my ink"), "mine": PromptStyle("mine", "mine")}
    with pytest.warns(AipaintWarning, match="style 'ink' from styles.csv replaces the one plugin"):
        merged = merged_styles(user, host_with(Inks()), "styles.csv")
    assert merged["ink"].prompt == "my ink" and merged["neon"].prompt == "neon glow" and "mine" in merged


def test_the_recipes_plugin_gives_styles_that_style_can_name(tmp_path, monkeypatch):
    monkeypatch.setenv("AIPAINT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AIPAINT_STYLES_FILE", raising=False)
    kwargs = {"prompt": "a red circle", "negative_prompt": ""}
    args = argparse.Namespace(styles=["watercolour"], styles_file=None)
    apply_style_options(args, kwargs)  # no styles file at all: the plugin's style is still there
    assert kwargs["prompt"] == "a red circle, watercolour painting, soft washes, paper texture"
    assert kwargs["negative_prompt"] == "photo, harsh lines"
    assert args.recorded_entries["Styles array"] == '["watercolour"]'


def test_a_users_styles_file_overrides_a_plugin_style_of_the_same_name(tmp_path, monkeypatch):
    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nwatercolour,"{prompt}, my watercolour",\n')
    kwargs = {"prompt": "x", "negative_prompt": ""}
    with pytest.warns(AipaintWarning, match="'watercolour' from styles file 'styles.csv' replaces"):
        apply_style_options(argparse.Namespace(styles=["watercolour"], styles_file=str(styles)), kwargs)
    assert kwargs["prompt"] == "x, my watercolour"


def test_an_unknown_style_without_a_styles_file_still_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("AIPAINT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AIPAINT_STYLES_FILE", raising=False)
    with pytest.raises(InvalidParameter, match="needs a styles file"):
        apply_style_options(argparse.Namespace(styles=["nope"], styles_file=None), {"prompt": "x"})


def test_aipaint_styles_lists_the_users_and_the_plugins_styles(tmp_path, capsys):
    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nwatercolour,"{prompt}, mine",\nbig,a big,blurry\n')
    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["styles", "--styles-file", str(styles)])
    assert args.func(args) == 0
    lines = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "[styles.csv]" in lines["big"] and "negative: blurry" in lines["big"]
    assert "[styles.csv (replaces plugin 'recipes')]" in lines["watercolour"] and "mine" in lines["watercolour"]
    assert "[plugin 'recipes']" in lines["oil painting"]
    assert cmd_styles is args.func
