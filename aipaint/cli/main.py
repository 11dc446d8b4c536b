"""The ``aipaint`` command: the parser and the dispatch to each command's handler.

The commands live in their own modules: :mod:`aipaint.cli.generation` (generate, img2img,
inpaint, outpaint, variations, blend) and :mod:`aipaint.cli.inspect` (info, samplers, plugins,
zoo, prompt); plugins add theirs through the ``register_commands`` hook, on the public
API of :mod:`aipaint.cli.api`. Heavy libraries are imported inside commands, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from aipaint.errors import AipaintError, AipaintWarning

# Core command modules, each with register_commands(subparsers), registered before the plugins' commands.
CORE_COMMAND_MODULES: tuple[str, ...] = ("aipaint.cli.generation", "aipaint.cli.inspect", "aipaint.cli.serve", "aipaint.cli.sources", "aipaint.cli.workflows", "aipaint.cli.explain", "aipaint.cli.styles")


def build_parser() -> argparse.ArgumentParser:
    """The whole ``aipaint`` parser: the core commands, then each plugin's, one plugin at a time."""
    from aipaint import __version__
    from aipaint.cli.registration import register_plugin_commands
    from aipaint.plugin.host import create_plugin_host

    parser = argparse.ArgumentParser(prog="aipaint", description="AI painting: Stable Diffusion and friends, A1111-compatible.")
    parser.add_argument("--version", action="version", version=f"aipaint {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in CORE_COMMAND_MODULES:
        importlib.import_module(module_name).register_commands(sub)
    host = create_plugin_host(run_registration=False)
    register_plugin_commands(parser, sub, host.implementations("register_commands"))
    return parser


@contextlib.contextmanager
def plain_warnings() -> Any:
    """aipaint's own warnings as one ``aipaint: warning: ...`` line each, once per command
    (a hires-fix pass or a batch re-plans the same prompt; its warning is said once).
    Other warnings keep Python's own form."""
    seen: set[str] = set()
    shown = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if not issubclass(category, AipaintWarning):
            shown(message, category, *args, **kwargs)
            return
        text = str(message).removeprefix("aipaint: ")
        if text not in seen:
            seen.add(text)
            print(f"aipaint: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", AipaintWarning)  # ``seen`` dedupes; Python's per-line registry would not
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    with plain_warnings():
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except AipaintError as exc:
        print(f"aipaint: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aipaint: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
