"""ControlNet: steer generation with a control image (edges, scribbles, layout, a QR code, …).

>>> from aipaint.plugin.adapters import AdapterUnit
>>> unit = AdapterUnit("controlnet", {"model": "shapes-tiny-controlnet-layout", "image": "layout.png",
...                                   "preprocessor": "canny", "weight": 1.0})
>>> pipe.txt2img("a big red circle, on a white background", adapters=(unit,))  # doctest: +SKIP

Several units combine (their residuals add up), each with its weight and its window of
steps; they work in every mode that runs the core loop (txt2img, img2img, inpaint).
UNet ControlNets (``ControlNetModel``) join through the loop's UNet residuals; the
transformer families (SD 3, FLUX) run diffusers' ``SD3ControlNetModel`` /
``FluxControlNetModel`` themselves, inside ``predict``
(:class:`aipaint.plugin.kit.controlnets.TransformerControlNetRuns`).
This plugin registers the ``controlnet`` adapter, the built-in preprocessors
(:mod:`.preprocessors`), ``aipaint preprocess``, ``aipaint controlnets``, and the
``--controlnet`` / ``--control-image`` options of the generation commands. See
``docs/controlnet.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.plugin.adapters import AdapterSpec
from aipaint.plugin.kit.controlnets import provide_controlnet_loader

if TYPE_CHECKING:
    import argparse

    from aipaint.plugin.adapters import AdapterActivation, AdapterContext
    from aipaint.plugin.preprocess import PreprocessorSpec


@contextmanager
def activate(context: AdapterContext) -> Iterator[AdapterActivation]:
    from .units import activate as activate_units

    with activate_units(context) as activation:
        yield activation


def _load_by_name(name: Any, model: Any, allow_pickle: bool) -> tuple[Any, Any]:
    from .models import resolve_and_load

    return resolve_and_load(name, model, allow_pickle)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    provide_controlnet_loader(_load_by_name)  # exporters load ControlNets by name through the kit
    register(
        AdapterSpec(
            name="controlnet",
            activate=activate,
            aliases=("control_net",),
            description="ControlNet: residuals from a control image (edges, scribble, layout, QR code, inpaint)",
        )
    )


@hookimpl
def register_preprocessors(register: Callable[[PreprocessorSpec], None]) -> None:
    from .preprocessors import builtin_preprocessors

    for spec in builtin_preprocessors():
        register(spec)


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from .cli import add_commands

    add_commands(subparsers)


def units_from_png(path: Any, images: list[Any]) -> tuple[Any, ...]:
    """The ControlNet units recorded in a PNG's parameters, with their control images given
    again (PNGs do not store them, as in A1111), ready for ``GenerationRequest(adapters=...)``."""
    from aipaint.errors import InvalidParameter
    from aipaint.infotext import Infotext, read_png_parameters
    from aipaint.plugin.adapters import AdapterUnit

    from .units import units_from_params

    text = read_png_parameters(path) or ""
    recorded = units_from_params(Infotext.from_text(text).params)
    if len(images) != len(recorded):
        raise InvalidParameter("images", f"{len(images)} images", f"{path} records {len(recorded)} ControlNet unit(s); give one image each")
    return tuple(AdapterUnit("controlnet", {**options, "image": image}) for options, image in zip(recorded, images, strict=True))
