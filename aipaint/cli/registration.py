"""Plugins' ``register_commands``, run one plugin at a time.

A plugin whose hook raises is named in a one-line warning and skipped, and what it had added
before raising (commands, group sub-commands, options on other commands, their defaults) is
taken out again, so every other command works as if the plugin were not installed.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from typing import Any

from aipaint.errors import AipaintWarning


@dataclass
class _ParserState:
    """What registration can change on one parser (argparse keeps it in these containers;
    argument groups share the parser's lists and dicts, so restoring them in place restores
    the groups' views too)."""

    parser: argparse.ArgumentParser
    actions: list[argparse.Action]
    option_strings: dict[str, argparse.Action]
    defaults: dict[str, Any]
    groups: list[Any]
    group_actions: list[list[argparse.Action]]
    exclusive: list[Any]
    negative_number_optionals: list[Any]
    subcommands: list[tuple[argparse._SubParsersAction, dict[str, Any], list[argparse.Action]]]
    subparsers_group: Any  # set by add_subparsers, which refuses a second call while it is set

    @classmethod
    def of(cls, parser: argparse.ArgumentParser) -> _ParserState:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return cls(parser, list(parser._actions), dict(parser._option_string_actions), dict(parser._defaults),
                   list(parser._action_groups), [list(g._group_actions) for g in parser._action_groups],
                   list(parser._mutually_exclusive_groups), list(parser._has_negative_number_optionals),
                   [(a, dict(a.choices), list(a._choices_actions)) for a in subparsers],
                   getattr(parser, "_subparsers", None))

    def restore(self) -> None:
        parser = self.parser
        parser._actions[:] = self.actions
        parser._option_string_actions.clear()
        parser._option_string_actions.update(self.option_strings)
        parser._defaults.clear()
        parser._defaults.update(self.defaults)
        parser._action_groups[:] = self.groups
        for group, actions in zip(self.groups, self.group_actions):
            group._group_actions[:] = actions
        parser._mutually_exclusive_groups[:] = self.exclusive
        parser._has_negative_number_optionals[:] = self.negative_number_optionals
        parser._subparsers = self.subparsers_group
        for action, choices, help_entries in self.subcommands:
            action.choices.clear()
            action.choices.update(choices)
            action._choices_actions[:] = help_entries


def _snapshot(parser: argparse.ArgumentParser) -> list[_ParserState]:
    """The state of ``parser`` and every sub-command parser below it."""
    states, pending, seen = [], [parser], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:  # an alias shares its command's parser
            continue
        seen.add(id(current))
        state = _ParserState.of(current)
        states.append(state)
        pending.extend(p for _, choices, _ in state.subcommands for p in choices.values())
    return states


def register_plugin_commands(parser: argparse.ArgumentParser, subparsers: argparse._SubParsersAction,
                             implementations: list[tuple[str, Any]]) -> None:
    """Call each ``(plugin name, call)`` of the ``register_commands`` hook with ``subparsers``;
    one that raises is undone and named in an :class:`AipaintWarning`."""
    for owner, call in implementations:
        states = _snapshot(parser)
        try:
            call(subparsers=subparsers)
        except Exception as exc:  # a broken plugin must not take down the other commands
            for state in states:
                state.restore()
            warnings.warn(f"aipaint plugin {owner!r} failed in register_commands and its commands were skipped: {exc!r}",
                          AipaintWarning, stacklevel=2)
