"""Image preprocessors for control adapters: the registration record and its contract.

A preprocessor turns a user's image into the *control map* an adapter was trained on:
``canny`` finds edges for a canny ControlNet, ``depth`` would estimate depth for a depth
ControlNet. Plugins register them through the ``register_preprocessors`` hook, the same
way for built-ins (``aipaint_plugins.controlnet.preprocessors``) and third parties.

The contract of ``run(image, params, mask)``:

* ``image`` is an RGB :class:`PIL.Image.Image`, already at the size the map is needed
  at (the generation's width × height), so algorithms see the pixels the model will;
* ``params`` holds one float per declared :class:`PreprocessorParam`, validated;
* ``mask`` is an ``"L"`` image (white = area to repaint) or ``None``;
* it returns an RGB image of the same size, or an RGBA image whose fully transparent
  pixels mean "unknown, to be generated" (how ControlNet inpaint models are fed).

Preprocessors that need weights look for them with :func:`find_weights` when they run,
which raises :class:`aipaint.errors.MissingWeights` naming the file and the folders
searched; they never fall back to a different algorithm.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import ImageError, InvalidParameter, MissingWeights

if TYPE_CHECKING:
    from PIL import Image

# A1111's sd-webui-controlnet shows at most two sliders per preprocessor and records them
# in PNGs as "Threshold A" and "Threshold B"; API callers may use those names too.
THRESHOLD_KEYS = ("threshold_a", "threshold_b")


@dataclass(frozen=True)
class PreprocessorParam:
    """One numeric setting of a preprocessor (a slider in the A1111 UI)."""

    name: str
    default: float
    minimum: float
    maximum: float
    description: str = ""


@dataclass(frozen=True)
class PreprocessorSpec:
    """A preprocessor as registered by a plugin (see the module docstring for ``run``).

    ``params`` (at most two) are recorded in infotext as A1111's Threshold A and B, in
    order. ``weights`` names the files it needs, for listings and documentation.
    """

    name: str
    run: Callable[[Image.Image, dict[str, float], Image.Image | None], Image.Image]
    params: tuple[PreprocessorParam, ...] = ()
    aliases: tuple[str, ...] = ()
    description: str = ""
    weights: tuple[str, ...] = ()
    needs_mask: bool = False

    def __post_init__(self) -> None:
        if len(self.params) > len(THRESHOLD_KEYS):
            raise ValueError(f"preprocessor {self.name!r} declares {len(self.params)} params; at most two are supported")

    def resolve_params(self, given: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Defaults overridden by ``given`` (by name, or as ``threshold_a``/``threshold_b``), range-checked."""
        given = dict(given or {})
        values: dict[str, float] = {}
        for param, alias in zip(self.params, THRESHOLD_KEYS):
            if param.name in given and alias in given:
                raise InvalidParameter(param.name, given[alias], f"given twice, as {param.name!r} and as {alias!r}")
            raw = given.pop(param.name) if param.name in given else given.pop(alias, None)
            if raw is None or (raw == -1 and param.minimum > -1):  # A1111 writes -1 for "the default"
                raw = param.default
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                raise InvalidParameter(param.name, raw, f"must be a number from {param.minimum} to {param.maximum}")
            if not param.minimum <= raw <= param.maximum:
                raise InvalidParameter(
                    param.name, raw, f"must be from {param.minimum} to {param.maximum} for preprocessor {self.name!r}"
                )
            values[param.name] = float(raw)
        leftover = [k for k in given if k not in THRESHOLD_KEYS or given[k] not in (None, -1)]
        if leftover:
            valid = [p.name for p in self.params] or ["none"]
            raise InvalidParameter(
                "preprocessor parameter", leftover[0], f"{self.name!r} takes {', '.join(repr(v) for v in valid)}"
            )
        return values

    def apply(self, image: Image.Image, params: Mapping[str, Any] | None = None, mask: Image.Image | None = None) -> Image.Image:
        """Run the preprocessor with validated params; the result is checked against the contract."""
        if self.needs_mask and mask is None:
            raise ImageError(f"preprocessor {self.name!r} needs a mask (white = area to repaint)")
        if mask is not None and mask.size != image.size:
            raise ImageError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}")
        out = self.run(image.convert("RGB"), self.resolve_params(params), mask.convert("L") if mask is not None else None)
        if out.size != image.size or out.mode not in ("RGB", "RGBA"):
            raise ImageError(
                f"preprocessor {self.name!r} returned a {out.mode} image of {out.size}; expected RGB(A) of {image.size}"
            )
        return out


def weights_dirs() -> list[Path]:
    """Where preprocessor weights are looked for: ``$AIPAINT_PREPROCESSOR_DIR`` (a path list),
    then ``$AIPAINT_HOME/annotators`` (``~/.aipaint/annotators``)."""
    dirs = [Path(p).expanduser() for p in os.environ.get("AIPAINT_PREPROCESSOR_DIR", "").split(os.pathsep) if p]
    home = Path(os.environ.get("AIPAINT_HOME") or Path.home() / ".aipaint").expanduser()
    return [*dirs, home / "annotators"]


def find_weights(component: str, filename: str, hint: str = "") -> Path:
    """The path of ``filename`` in the first weights folder that has it, else :class:`MissingWeights`.

    ``filename`` is a bare file name chosen by the plugin (never a user's input); it may
    not contain a folder part, so it cannot point outside the weights folders.
    """
    if Path(filename).name != filename or filename in ("", ".", ".."):
        raise ValueError(f"weights file name must be a bare file name, got {filename!r}")
    searched = weights_dirs()
    for folder in searched:
        candidate = folder / filename
        if candidate.is_file():
            return candidate
    raise MissingWeights(component, filename, [str(d) for d in searched], hint or f"download it and put it in {searched[-1]}")
