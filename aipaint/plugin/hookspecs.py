"""Every aipaint hook, grouped by phase. The docstring of each hook is its contract.

A plugin is any module or object with functions marked ``@aipaint.hookimpl`` whose names
match the hooks below. Built-in plugins (``plugins/`` in the source tree, installed as
``aipaint_plugins``) are declared in the ``aipaint`` entry-point group exactly as a
third-party package declares its own.

Registration hooks receive a ``register`` callback. Validation, aliases and duplicate
checks live in that one callback (see :mod:`aipaint.plugin.registry`), so plugins stay small.
Hooks may gain arguments in later versions; none is ever renamed or removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import argparse

    from aipaint.api.options import OptionGroup
    from aipaint.engine.samplers import SamplerSpec
    from aipaint.models.family import ModelFamily, ModelSource
    from aipaint.plugin.adapters import AdapterSpec
    from aipaint.plugin.postprocess import PostProcessorSpec
    from aipaint.plugin.preprocess import PreprocessorSpec
    from aipaint.plugin.runtimes import RuntimeSpec
    from aipaint.prompt.styles import PromptStyle

PROJECT_NAME = "aipaint"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --- registration: called once when a plugin host is built ---------------------------


@hookspec
def register_models(register: Callable[[ModelFamily], None]) -> None:
    """Register model families (Stable Diffusion 1.5, SDXL, …).

    Call ``register(family)`` once per :class:`aipaint.models.family.ModelFamily`. A family
    loads weights into a :class:`aipaint.models.latent.LatentDiffusionModel` (or another model
    object its own pipeline understands) and says which inputs it can load.
    """


@hookspec
def register_samplers(register: Callable[[SamplerSpec], None]) -> None:
    """Register samplers under their user-facing names (``"Euler a"``, ``"DPM++ 2M"``).

    Call ``register(spec)`` with a :class:`aipaint.engine.samplers.SamplerSpec`: either a
    scheduler factory (a diffusers scheduler class and config overrides) or a
    function-style sampler ``fn(denoiser, x, sigmas, *, noise_sampler, callback)`` in the
    manner of k-diffusion. The core adapts both kinds to one interface.
    """


@hookspec
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    """Register adapters (LoRA, ControlNet, textual inversion, …).

    Call ``register(spec)`` with an :class:`aipaint.plugin.adapters.AdapterSpec`. Adapters
    contribute to generation only through the narrow seams of the denoise loop
    (conditioning, extra UNet inputs, reversible weight patches).
    """


@hookspec
def register_postprocessors(register: Callable[[PostProcessorSpec], None]) -> None:
    """Register post-processors (upscalers, face fix, QR-code art, stickers, …).

    Call ``register(spec)`` with an :class:`aipaint.plugin.postprocess.PostProcessorSpec`.
    """


@hookspec
def register_preprocessors(register: Callable[[PreprocessorSpec], None]) -> None:
    """Register image preprocessors for control adapters (``canny``, ``depth``, ``openpose``, …).

    Call ``register(spec)`` with an :class:`aipaint.plugin.preprocess.PreprocessorSpec`. A
    preprocessor turns a user's image into the map a ControlNet (or a similar adapter)
    was trained on. One that needs weights should check for them when it runs and raise
    :class:`aipaint.errors.MissingWeights` naming the file (see
    :func:`aipaint.plugin.preprocess.find_weights`), never fall back to another algorithm.
    """


@hookspec
def register_runtimes(register: Callable[[RuntimeSpec], None]) -> None:
    """Register runtimes that execute the heavy networks (torch, ONNX Runtime, TensorRT).

    Call ``register(spec)`` with an :class:`aipaint.plugin.runtimes.RuntimeSpec`.
    """


@hookspec
def register_options(register: Callable[[type[OptionGroup]], None]) -> None:
    """Register the typed option groups a plugin reads from generation requests.

    Call ``register(cls)`` with a frozen dataclass subclassing
    :class:`aipaint.api.options.OptionGroup` whose ``namespace`` is unique (usually the plugin's
    name). Users set them as ``options={"<namespace>": {...}}`` in Python and the HTTP API, or
    ``--option <namespace>.<field>=<value>`` on the command line; the core converts and checks
    them once, and an unknown namespace or field is an error naming the close matches. Read
    them with ``request.option(cls)``.
    """


@hookspec
def register_styles(register: Callable[[PromptStyle], None]) -> None:
    """Contribute saved prompt styles (rows of A1111's ``styles.csv``).

    Call ``register(style)`` with an :class:`aipaint.prompt.styles.PromptStyle`. They are
    merged with the user's styles file by :func:`aipaint.prompt.styles.plugin_styles`; on a name
    both have, the user's style wins and a warning says so. Run when styles are asked for
    (``--style``, ``aipaint styles``), not when the host is built.
    """


@hookspec
def register_recipes(register: Callable[..., None]) -> None:
    """Register recipes: one command for one everyday job (``aipaint recipe NAME``).

    Call ``register(name, run, summary=..., defaults={...}, inputs=(...), help={...},
    ranges={...}, sheet=False)``; ``run(pipe, settings) -> aipaint.api.result.Result`` gets every
    setting (the user's over ``defaults``, checked and typed by ``defaults``' types and
    ``ranges``; ``inputs`` name the settings that are image files). Run by the ``recipes`` plugin
    when recipes are listed or run; it records each recipe and its settings in the PNG.
    """


# --- resolution: "who handles this?" ------------------------------------------------------


@hookspec(firstresult=True)
def identify_model_family(source: ModelSource) -> str | None:
    """Name the model family that can load ``source``, or return ``None``.

    ``firstresult``: the first plugin that claims the source wins, so claim only what
    you are sure of (e.g. a diffusers folder whose ``model_index.json`` names your
    pipeline class, or a single-file checkpoint whose keys you recognise). Families that
    want a say without a hook implementation can instead implement
    :meth:`aipaint.models.family.ModelFamily.identify`.
    """


# --- command line -----------------------------------------------------------------------


@hookspec
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add sub-commands to the ``aipaint`` command line.

    Call ``subparsers.add_parser(name, help=...)`` and ``set_defaults(func=handler)``
    where ``handler(args) -> int`` is the exit status. Import heavy libraries inside the
    handler, not at module level: this hook runs for ``aipaint --help``. Raise
    :class:`aipaint.errors.AipaintError` for user errors; the CLI prints them as one line.

    Build on :mod:`aipaint.cli.api` only (model and generation options, ``load_pipeline``,
    ``build_request``, ``run_and_save``, ``command_group`` for groups such as ``train``
    that several plugins add to, the builders through which options added to the
    generation commands reach the request). The hook is called one plugin at a time: a
    plugin that raises is named in a warning, what it added is taken out again, and the
    other commands work.
    """
