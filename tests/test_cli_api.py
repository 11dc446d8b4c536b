"""The public CLI API (aipaint.cli.api) as a third-party plugin uses it, plugin command
registration isolated per plugin, and the generation commands' --option, --refiner, --preview,
variations and blend."""

from __future__ import annotations

import argparse
import types
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

import aipaint.plugin.host as host_module
from aipaint import hookimpl
from aipaint.api.options import OptionGroup
from aipaint.api.result import Result
from aipaint.cli import api
from aipaint.cli.main import build_parser, main
from aipaint.errors import AipaintError, AipaintWarning
from aipaint.infotext import Infotext, read_png_parameters

PROMPT = "a big red circle on the left, on a white background"
FAST = ["--steps", "3", "--seed", "1", "--no-progress"]


@dataclass(frozen=True)
class GreetOptions(OptionGroup):
    namespace: ClassVar[str] = "greet"
    word: str = "hello"
    times: int = 1


def third_party_plugin(*, after_lora: bool) -> types.ModuleType:
    """A plugin written only against aipaint.hookimpl and aipaint.cli.api: ``aipaint hello``,
    ``aipaint train hello``, and ``--greet-times`` on every generation command."""
    plugin = types.ModuleType("third_party_hello")

    def cmd_hello(args: argparse.Namespace) -> int:
        request = api.build_request(args)
        print(f"{request.option(GreetOptions).word} x{request.option(GreetOptions).times}: {request.prompt}")
        return 0

    def cmd_train_hello(args: argparse.Namespace) -> int:
        print(f"training hello on {args.data}")
        return 0

    def greet_times(args: argparse.Namespace, png_params: dict[str, str]) -> dict[str, dict[str, object]]:
        return {"greet": {"times": args.greet_times}} if args.greet_times is not None else {}

    def register_commands(subparsers: argparse._SubParsersAction) -> None:
        p = subparsers.add_parser("hello", help="say hello")
        p.add_argument("prompt", nargs="?")
        api.add_generation_options(p)
        api.add_model_options(p)
        p.set_defaults(func=cmd_hello)
        api.mark_generation_command(p)
        train = api.command_group(subparsers, "train", "train adapters")
        t = train.add_parser("hello", help="train a hello")
        t.add_argument("data")
        t.set_defaults(func=cmd_train_hello)
        for parser in api.generation_parsers(subparsers):
            parser.add_argument("--greet-times", type=int)
            api.add_request_options_builder(parser, greet_times)

    def register_options(register) -> None:
        register(GreetOptions)

    # pluggy calls the plugins registered last first; trylast puts this one after LoRA's.
    plugin.register_commands = hookimpl(trylast=after_lora)(register_commands)
    plugin.register_options = hookimpl(register_options)
    return plugin


def broken_plugin() -> types.ModuleType:
    """Adds a command, an option to ``generate`` and a ``train`` target, then raises."""
    plugin = types.ModuleType("broken_commands")

    @hookimpl
    def register_commands(subparsers: argparse._SubParsersAction) -> None:
        subparsers.add_parser("half-made", help="never finished").set_defaults(func=lambda args: 0)
        subparsers.choices["generate"].add_argument("--half-option")
        subparsers.choices["generate"].set_defaults(half_default=True)
        api.command_group(subparsers, "train", "train adapters").add_parser("half-target")
        raise RuntimeError("boom in register_commands")

    plugin.register_commands = register_commands
    return plugin


@pytest.fixture()
def install(monkeypatch):
    """Install plugins for the command line and for the default host its commands use."""
    real = host_module.create_plugin_host

    def use(*plugins: types.ModuleType) -> None:
        def create(extra_plugins=(), **kwargs):
            return real(extra_plugins=(*extra_plugins, *plugins), **kwargs)

        monkeypatch.setattr(host_module, "create_plugin_host", create)
        monkeypatch.setattr(host_module, "_default_host", None)

    yield use
    host_module._default_host = None


# --- a third-party plugin on the public API ----------------------------------------------------
@pytest.mark.parametrize("after_lora", [True, False])
def test_a_third_party_plugin_adds_a_command_and_a_train_target_beside_lora(install, capsys, after_lora):
    install(third_party_plugin(after_lora=after_lora))
    assert main(["hello", "a cat", "--option", "greet.word=hi", "--greet-times", "3"]) == 0
    assert capsys.readouterr().out.strip() == "hi x3: a cat"
    assert main(["train", "hello", "my/data"]) == 0
    assert capsys.readouterr().out.strip() == "training hello on my/data"
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    assert {"lora", "hello"} <= set(train._subparsers._group_actions[0].choices)
    assert "warning" not in capsys.readouterr().err


def test_command_group_finds_a_group_made_with_argparse_and_refuses_a_plain_command():
    sub = argparse.ArgumentParser().add_subparsers()
    sub.add_parser("plain")
    by_hand = sub.add_parser("by-hand").add_subparsers(dest="target")
    assert api.command_group(sub, "by-hand", "x") is by_hand
    with pytest.raises(AipaintError, match="'plain' exists and is not a command group"):
        api.command_group(sub, "plain", "x")


# --- a plugin that raises in register_commands ---------------------------------------------------
def test_a_plugin_that_raises_is_named_undone_and_the_rest_works(install, capsys):
    install(broken_plugin())
    for command in (["zoo"], ["samplers"]):
        assert main(command) == 0
        out, err = capsys.readouterr()
        assert out and "aipaint: warning: aipaint plugin 'broken_commands' failed in register_commands" in err
        assert "boom in register_commands" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    assert "--steps" in help_text and "--half-option" not in help_text
    with pytest.warns(AipaintWarning, match="'broken_commands'"):
        parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert "half-made" not in commands and commands["generate"].get_default("half_default") is None
    assert "half-target" not in commands["train"]._subparsers._group_actions[0].choices
    assert "lora" in commands["train"]._subparsers._group_actions[0].choices


# --- --option, --preview, --refiner ------------------------------------------------------------
class RecordingPipe:
    """Stands in for a loaded pipeline: records the request the command hands it."""

    def __init__(self) -> None:
        self.requests: list = []

    def generate(self, request, progress=None):
        self.requests.append(request)
        return Result([Image.new("RGB", (8, 8))], [request.seed or 0], ["x"], request, {"total": 0.0})


def test_option_reaches_a_plugins_typed_options(install, monkeypatch, tmp_path):
    install(third_party_plugin(after_lora=True))
    pipe = RecordingPipe()
    monkeypatch.setattr(api, "load_pipeline", lambda args: pipe)
    assert main(["generate", "x", "--option", "greet.times=4", "--option", "greet.word=hey",
                 "-o", str(tmp_path / "o.png"), "--no-progress"]) == 0
    assert pipe.requests[0].option(GreetOptions) == GreetOptions(word="hey", times=4)


@pytest.mark.parametrize(("option", "says"), [
    ("greet.tims=2", "is not an option of 'greet'"),
    ("greeet.times=2", "no installed plugin declares these options"),
    ("greet.times=two", "must be a whole number"),
    ("greet", "must be NAMESPACE.OPTION=VALUE"),
])
def test_a_bad_option_is_a_one_line_error_before_the_model_loads(install, monkeypatch, capsys, option, says):
    install(third_party_plugin(after_lora=True))

    def refuse(args):
        raise AssertionError("the model was loaded before the option was checked")

    monkeypatch.setattr(api, "load_pipeline", refuse)
    assert main(["generate", "x", "--option", option, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aipaint: error: ") and says in err and len(err.strip().splitlines()) == 1


def test_preview_writes_each_steps_picture_to_a_png(tmp_path, monkeypatch):
    import aipaint.api.result as result_module

    writes: list[Path] = []
    real_save = result_module.save_png

    def counting_save(image, path, parameters, **kwargs):
        writes.append(Path(path))
        return real_save(image, path, parameters, **kwargs)

    monkeypatch.setattr(result_module, "save_png", counting_save)
    preview, out = tmp_path / "preview.png", tmp_path / "out.png"
    assert main(["generate", PROMPT, *FAST, "--preview", str(preview), "-o", str(out)]) == 0
    assert writes.count(preview) == 3  # one per step
    assert Image.open(preview).format == "PNG" and Image.open(preview).size == Image.open(out).size
    assert not list(tmp_path.glob(".*.tmp"))


def test_refiner_takes_over_at_the_switch(tmp_path):
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, *FAST, "--refiner", "shapes-tiny", "--refiner-switch-at", "0.5", "-o", str(out)]) == 0
    params = Infotext.from_text(read_png_parameters(out)).params
    assert params["Refiner"].startswith("shapes-tiny") and params["Refiner switch at"] == "0.5"


def test_refiner_switch_is_checked_before_the_model_loads(monkeypatch, capsys):
    monkeypatch.setattr(api, "load_pipeline", lambda args: pytest.fail("the model was loaded"))
    assert main(["generate", "x", "--refiner", "shapes-tiny", "--refiner-switch-at", "1.5", "--no-progress"]) == 2
    assert "refiner_switch_at=1.5" in capsys.readouterr().err


# --- variations and blend ---------------------------------------------------------------------
@pytest.mark.parametrize(("command", "feature"), [
    (["variations", "{a}"], "(variations)"),
    (["blend", "{a}", "{b}", "--weights", "1,2"], "(blend)"),
])
def test_variations_and_blend_on_a_model_that_cannot_are_a_typed_error(tmp_path, capsys, command, feature):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (32, 32), "red").save(a)
    Image.new("RGB", (32, 32), "blue").save(b)
    out = tmp_path / "out.png"
    assert main([part.format(a=a, b=b) for part in command] + ["-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aipaint: error: sd15 model 'shapes-tiny' cannot do") and feature in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_variations_and_blend_build_image_prompt_requests(monkeypatch, tmp_path):
    pipe = RecordingPipe()
    monkeypatch.setattr(api, "load_pipeline", lambda args: pipe)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (32, 32), "red").save(a)
    Image.new("RGB", (32, 32), "blue").save(b)
    assert main(["variations", str(a), "-o", str(tmp_path / "v.png"), "--no-progress"]) == 0
    assert main(["blend", str(a), str(b), "--weights", "1,3", "--prompt", "sunset", "-o", str(tmp_path / "mix.png"),
                 "--no-progress"]) == 0
    variations, blend = pipe.requests
    assert variations.mode == "variations" and variations.prompt == ""
    assert blend.mode == "blend" and blend.image_prompt_weights == (1.0, 3.0) and blend.prompt == "sunset"
    assert blend.image_prompts[1].getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize(("weights", "says"), [("1,x", "invalid --weights='1,x'"), ("1", "one weight per image")])
def test_blend_weights_are_checked(tmp_path, capsys, weights, says):
    a = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(a)
    assert main(["blend", str(a), str(a), "--weights", weights, "--no-progress"]) == 2
    assert says in capsys.readouterr().err
