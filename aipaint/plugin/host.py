"""The plugin host: a pluggy manager built by a factory, never a module-global.

``AIPAINT_LOAD_PLUGINS=a,b`` loads only the named entry points (an empty value loads
none); ``AIPAINT_TRACE_PLUGINS=1`` prints every hook call. A plugin that fails to import
or to register produces a warning naming it and is skipped; the others still load.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from aipaint.errors import AipaintWarning
from aipaint.plugin import hookspecs
from aipaint.plugin.registry import Registry

ENTRY_POINT_GROUP = "aipaint"
BUILTIN_PREFIX = "aipaint_plugins."


@dataclass
class PluginHost:
    """A plugin manager plus the registry its registration hooks filled."""

    manager: pluggy.PluginManager
    registry: Registry

    @property
    def hook(self) -> Any:
        return self.manager.hook

    def plugin_names(self) -> list[str]:
        return [name for name, _ in self.manager.list_name_plugin()]

    def implementations(self, hook_name: str) -> list[tuple[str, Callable[..., Any]]]:
        """``(plugin name, call)`` for each plugin implementing ``hook_name``, in the order pluggy
        calls them, so a caller can run one plugin at a time and name the one that fails.
        ``call`` takes the hook's keyword arguments, passes each plugin the ones it declares,
        and is traced under ``AIPAINT_TRACE_PLUGINS``."""
        calls = []
        for impl in reversed(getattr(self.manager.hook, hook_name).get_hookimpls()):
            owner = self.manager.get_name(impl.plugin) or repr(impl.plugin)
            calls.append((owner, _plugin_call(hook_name, owner, impl)))
        return calls


def _plugin_call(hook_name: str, owner: str, impl: Any) -> Callable[..., Any]:
    def call(**kwargs: Any) -> Any:
        if os.environ.get("AIPAINT_TRACE_PLUGINS"):
            print(f"aipaint: {hook_name} [{owner}]", file=sys.stderr)
        return impl.function(**{name: kwargs[name] for name in impl.argnames})

    return call


def _selected_entry_points() -> list[Any]:
    eps = list(entry_points(group=ENTRY_POINT_GROUP))
    wanted = os.environ.get("AIPAINT_LOAD_PLUGINS")
    if wanted is not None:
        names = {n.strip() for n in wanted.split(",") if n.strip()}
        eps = [ep for ep in eps if ep.name in names]
    # Built-ins first, so a third-party plugin can never take a built-in name.
    return sorted(eps, key=lambda ep: (not ep.value.startswith(BUILTIN_PREFIX), ep.name))


def create_plugin_host(
    extra_plugins: tuple[Any, ...] = (), *, load_entry_points: bool = True, run_registration: bool = True
) -> PluginHost:
    """Build a fresh plugin manager, load plugins, and run the registration hooks.

    ``extra_plugins`` are plugin objects registered after the entry points (tests and
    applications use this to add a plugin without packaging it). The CLI builds its
    parser with ``run_registration=False`` so ``--help`` stays quick.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    if os.environ.get("AIPAINT_TRACE_PLUGINS"):
        manager.trace.root.setwriter(lambda message: print(message, end="", file=sys.stderr))
        manager.enable_tracing()

    if load_entry_points:
        for ep in _selected_entry_points():
            try:
                plugin = ep.load()
                manager.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must not take down the others
                warnings.warn(f"aipaint plugin {ep.name!r} ({ep.value}) failed to load and was skipped: {exc!r}",
                              AipaintWarning, stacklevel=2)
    for plugin in extra_plugins:
        manager.register(plugin)

    registry = Registry()
    if run_registration:
        _run_registration(manager, registry)
    return PluginHost(manager=manager, registry=registry)


def _run_registration(manager: pluggy.PluginManager, registry: Registry) -> None:
    from aipaint.api.options import OptionGroup
    from aipaint.engine.samplers import SamplerSpec
    from aipaint.models.family import ModelFamily
    from aipaint.plugin.adapters import AdapterSpec
    from aipaint.plugin.postprocess import PostProcessorSpec
    from aipaint.plugin.preprocess import PreprocessorSpec
    from aipaint.plugin.runtimes import RuntimeSpec

    phases = [
        ("register_models", registry.families, ModelFamily),
        ("register_samplers", registry.samplers, SamplerSpec),
        ("register_adapters", registry.adapters, AdapterSpec),
        ("register_postprocessors", registry.postprocessors, PostProcessorSpec),
        ("register_preprocessors", registry.preprocessors, PreprocessorSpec),
        ("register_runtimes", registry.runtimes, RuntimeSpec),
        ("register_options", registry.options, OptionGroup),
    ]
    for hook_name, catalogue, expected in phases:
        # Call each plugin separately so one broken plugin is named and skipped.
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            owner = manager.get_name(impl.plugin) or repr(impl.plugin)
            register = registry.registrar(catalogue, owner, expected)
            if os.environ.get("AIPAINT_TRACE_PLUGINS"):
                print(f"aipaint: {hook_name} [{owner}]", file=sys.stderr)
            try:
                impl.function(register=register)
            except Exception as exc:
                warnings.warn(f"aipaint plugin {owner!r} failed in {hook_name} and was skipped: {exc!r}",
                              AipaintWarning, stacklevel=2)


_default_host: PluginHost | None = None


def default_host() -> PluginHost:
    """The host used when the caller passes none (built lazily, once per process)."""
    global _default_host
    if _default_host is None:
        _default_host = create_plugin_host()
    return _default_host
