"""Style from a reference image: IP-Adapter, and the weight-free reference-only mode.

>>> from aipaint_plugins.reference import reference_unit
>>> pipe.txt2img("a big circle in the center, on a white background",
...              adapters=(reference_unit("style.png", weight=1.0),))  # doctest: +SKIP

* ``reference-only`` (default) shares the reference image's self-attention keys and values
  with the generation, as sd-webui-controlnet's ``reference_only`` does: no weights needed.
* ``ip-adapter`` loads the public IP-Adapter weights (h94/IP-Adapter, SD 1.5 and SDXL, plain
  and plus) into the UNet through diffusers, with the CLIP vision encoder they were trained with.

This plugin registers the ``reference`` adapter and the ``--reference``, ``--reference-mode``,
``--reference-weight`` options of the generation commands (``--reference-option`` for the rest).
See ``docs/reference.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.plugin.adapters import AdapterSpec, AdapterUnit

if TYPE_CHECKING:
    import argparse

    from aipaint.plugin.adapters import AdapterActivation, AdapterContext


def reference_unit(image: Any, mode: str = "reference-only", weight: float = 1.0, **options: Any) -> AdapterUnit:
    """A reference unit for ``adapters=(...)``: ``image`` is a PIL image, a path or a uint8 array;
    ``options`` are the other unit options (``style_fidelity``, ``guidance_start``, ``model``, …)."""
    return AdapterUnit("reference", {"image": image, "mode": mode, "weight": weight, **options})


@contextmanager
def activate(context: AdapterContext) -> Iterator[AdapterActivation]:
    from .units import activate as activate_units

    with activate_units(context) as activation:
        yield activation


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="reference",
            activate=activate,
            aliases=("reference_only", "ip_adapter"),
            description="style from a reference image: reference-only attention sharing, or IP-Adapter",
        )
    )


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from .cli import add_options

    add_options(subparsers)
