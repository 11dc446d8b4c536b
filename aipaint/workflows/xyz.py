"""A1111's X/Y/Z plot: one request varied along up to three axes, one image per cell, drawn as
labelled grids (one per Z value), each cell also saved as its own PNG with its parameters.

An axis is ``"TYPE: VALUES"``, e.g. ``"CFG Scale: 1, 3, 7"``, ``"seed: 1-3"``,
``"steps: 10-30 (+10)"``, ``"cfg: 2-8 [4]"``, ``"sampler: Euler a, DPM++ 2M"``,
``"Prompt S/R: red, green, blue"`` or ``"lora.folder: a, b"`` (any plugin option). Values are
read as A1111 reads them: a CSV list (quote a value that holds a comma), where a number
item may be a range: ``1-5`` (every whole number), ``1-10 (+2)`` (a step), ``4-8 [3]`` (a
count, evenly spaced), and the same with decimals for decimal axes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import InvalidParameter, UnknownName
from aipaint.infotext import format_number

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.api.request import GenerationRequest
    from aipaint.pipeline import Pipeline
    from aipaint.prompt.wildcards import DynamicPrompts
    from aipaint.workflows.grid import Grid

__all__ = ["AXIS_TYPES", "Axis", "AxisType", "XYZCell", "XYZResult", "parse_axis", "xyz"]

MAX_AXIS_VALUES = 256
"""The most values one axis may have."""
MAX_CELLS = 1024
"""The most cells one plot may have (each is a generation)."""
_DIGITS = 12  # longer numbers are no steps, seeds or scales; int() of a long text takes quadratic time


@dataclass(frozen=True)
class AxisType:
    """What an axis varies: A1111's name for it, the names it is also known by, its values' type,
    the request field it sets (None: set in its own way), and whether a label says its name."""

    name: str
    aliases: tuple[str, ...]
    kind: type
    field: str | None = None
    labelled: bool = True


SEED = AxisType("Seed", ("seed", "seeds"), int, "seed")
VAR_SEED = AxisType("Var. seed", ("var seed", "variation seed", "subseed"), int, "subseed")
PROMPT_SR = AxisType("Prompt S/R", ("prompt s/r", "prompt sr", "s/r", "sr", "search replace"), str, labelled=False)
CHECKPOINT = AxisType("Checkpoint name", ("checkpoint", "checkpoint name", "model", "ckpt"), str, labelled=False)
LORA_WEIGHT = AxisType("LoRA weight", ("lora", "lora weight", "lora weights"), float)
SAMPLER = AxisType("Sampler", ("sampler", "sampler name", "samplers"), str, "sampler", labelled=False)
SCHEDULE = AxisType("Schedule type", ("schedule", "schedule type", "scheduler"), str, "schedule", labelled=False)
DENOISING = AxisType("Denoising", ("denoising", "denoising strength", "strength"), float, "denoising_strength")
OPTION = AxisType("Option", ("option",), str)

AXIS_TYPES: tuple[AxisType, ...] = (
    SEED, VAR_SEED,
    AxisType("Var. strength", ("var strength", "variation strength", "subseed strength"), float, "subseed_strength"),
    AxisType("Steps", ("steps",), int, "steps"),
    AxisType("CFG Scale", ("cfg", "cfg scale", "guidance scale"), float, "cfg_scale"),
    SAMPLER, SCHEDULE, PROMPT_SR, CHECKPOINT, LORA_WEIGHT, DENOISING,
    AxisType("Clip skip", ("clip skip",), int, "clip_skip"),
    AxisType("Width", ("width",), int, "width"),
    AxisType("Height", ("height",), int, "height"),
    AxisType("Guidance rescale", ("guidance rescale", "cfg rescale"), float, "guidance_rescale"),
    OPTION,
)
"""Every axis type; ``option NAMESPACE.FIELD`` (or just ``NAMESPACE.FIELD``) varies a plugin's option."""

_LORA_TAG = re.compile(r"<(lora|lyco):([^:>]+)(?::[^>]*)?>", re.IGNORECASE)
_INT = rf"[+-]?\s*\d{{1,{_DIGITS}}}"
_FLOAT = rf"[+-]?\s*(?:\d{{1,{_DIGITS}}}(?:\.\d{{0,{_DIGITS}}})?|\.\d{{1,{_DIGITS}}})"
_COUNT = r"\[\s*(\d{1,6})\s*\]"


def _range_pattern(number: str) -> re.Pattern[str]:
    return re.compile(rf"({number})\s*-\s*({number})\s*(?:\(\s*({number})\s*\)|{_COUNT})?")


_INT_RANGE = _range_pattern(_INT)
_FLOAT_RANGE = _range_pattern(_FLOAT)


def _key(name: str) -> str:
    return " ".join(re.sub(r"[_\-.]", " ", name.lower()).split())


def axis_type(name: str) -> AxisType:
    """The axis type called ``name`` (A1111's name or an alias, any case)."""
    key = _key(name)
    for kind in AXIS_TYPES:
        if key == _key(kind.name) or key in (_key(alias) for alias in kind.aliases):
            return kind
    raise UnknownName("axis type", name, [kind.name for kind in AXIS_TYPES[:-1]] + ["option NAMESPACE.FIELD"])


@dataclass(frozen=True)
class Axis:
    """One axis: its type, its values (already converted), the plugin option it varies (for the
    ``Option`` type, as ``NAMESPACE.FIELD``) and its values as written (recorded in the grid's PNG)."""

    type: AxisType
    values: tuple[Any, ...]
    option: str | None = None
    text: str = ""

    @property
    def name(self) -> str:
        return self.option or self.type.name

    def label(self, value: Any) -> str:
        """How a value is written on the grid: ``CFG Scale: 7``, or just ``Euler a``."""
        text = format_number(value) if isinstance(value, float) else str(value)
        return f"{self.name}: {text}" if self.type.labelled else text

    @property
    def labels(self) -> list[str]:
        return [self.label(value) for value in self.values]


def parse_axis(text: str) -> Axis:
    """``"TYPE: VALUES"`` as an :class:`Axis` (see the module doc for the values)."""
    if not isinstance(text, str):
        raise InvalidParameter("axis", text, "must be text: 'TYPE: VALUES', e.g. 'cfg: 1, 3, 7'")
    name, sep, values = text.partition(":")
    if not sep or not name.strip():
        raise InvalidParameter("axis", text, "must be 'TYPE: VALUES', e.g. 'cfg: 1, 3, 7' or 'seed: 1-3'")
    return make_axis(name, values)


def make_axis(name: str, values: str | Sequence[Any]) -> Axis:
    """The axis of type ``name`` over ``values``: text as in :func:`parse_axis`, or a list."""
    name = name.strip()
    option = None
    lowered = name.lower()
    if lowered.startswith("option ") or ("." in name and " " not in name and not _is_axis_name(name)):
        option = name[len("option "):].strip() if lowered.startswith("option ") else name
        namespace, dot, option_field = option.partition(".")
        if not dot or not namespace or not option_field:
            raise InvalidParameter("axis", name, "an option axis is 'option NAMESPACE.FIELD', e.g. 'option lora.folder'")
        kind = OPTION
    else:
        kind = axis_type(name)
    if isinstance(values, str):
        written = values.strip()
        items: list[Any] = _split(values)
    elif isinstance(values, (list, tuple)):
        items = list(values)
        written = ", ".join(format_number(v) if isinstance(v, float) else str(v) for v in items)
    else:
        raise InvalidParameter(f"{name} values", values, "must be text or a list")
    converted = _convert(option or kind.name, kind.kind, items)
    if not converted:
        raise InvalidParameter(f"{name} values", values, "must give at least one value")
    if len(converted) > MAX_AXIS_VALUES:
        raise InvalidParameter(f"{name} values", values, f"make {len(converted)} values; an axis takes at most {MAX_AXIS_VALUES}")
    return Axis(kind, tuple(converted), option, written)


def _is_axis_name(name: str) -> bool:
    try:
        axis_type(name)
    except UnknownName:
        return False
    return True


def _split(text: str) -> list[str]:
    """A1111 reads an axis's values as one CSV row: a value holding a comma is quoted."""
    try:
        row = next(csv.reader(io.StringIO(text.strip()), skipinitialspace=True), [])
    except csv.Error as exc:
        raise InvalidParameter("axis values", text, f"is not a valid comma-separated list ({exc})") from None
    return [item.strip() for item in row if item.strip()]


def _convert(name: str, kind: type, items: Sequence[Any]) -> list[Any]:
    values: list[Any] = []
    for item in items:
        if kind is str:
            if not isinstance(item, str) or not item.strip():
                raise InvalidParameter(f"{name} values", item, "must be non-empty text")
            values.append(item.strip())
        elif isinstance(item, str):
            values.extend(_numbers(name, kind, item))
        elif isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item):
            if kind is int and not float(item).is_integer():
                raise InvalidParameter(f"{name} values", item, "must be whole numbers")
            values.append(int(item) if kind is int else float(item))
        else:
            raise InvalidParameter(f"{name} values", item, "must be numbers")
        if len(values) > MAX_AXIS_VALUES:
            break
    return values


def _number(name: str, kind: type, text: str) -> int | float:
    text = "".join(text.split())
    try:
        value = int(text) if kind is int else float(text)
    except ValueError:
        kinds = "whole numbers" if kind is int else "numbers"
        raise InvalidParameter(f"{name} values", text, f"must be {kinds} or ranges such as 1-5, 1-10 (+2), 4-8 [3]") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidParameter(f"{name} values", text, "must be finite numbers")
    return value


def _numbers(name: str, kind: type, item: str) -> list[int | float]:
    """One item of a number axis: a number, or a range (``a-b``, ``a-b (+step)``, ``a-b [count]``)."""
    match = (_INT_RANGE if kind is int else _FLOAT_RANGE).fullmatch(item.strip())
    if match is None:
        if len(item) > 2 * _DIGITS + 4:
            raise InvalidParameter(f"{name} values", item, "is too long for a number")
        return [_number(name, kind, item)]
    start, end = _number(name, kind, match[1]), _number(name, kind, match[2])
    if match[4] is not None:  # a count: evenly spaced, as A1111's numpy.linspace (whole numbers truncated)
        count = int(match[4])
        if not 1 <= count <= MAX_AXIS_VALUES:
            raise InvalidParameter(f"{name} values", item, f"must ask for 1 to {MAX_AXIS_VALUES} values")
        points = [start + (end - start) * i / (count - 1) for i in range(count)] if count > 1 else [start]
        return [int(p) for p in points] if kind is int else [round(p, 10) for p in points]
    step = _number(name, kind, match[3]) if match[3] is not None else (1 if end >= start else -1)
    if step == 0:
        raise InvalidParameter(f"{name} values", item, "has a step of 0")
    span = (end - start) / step
    if span < -1e-9:
        raise InvalidParameter(f"{name} values", item, "makes no values: the step goes away from the end")
    count = math.floor(span + 1e-9) + 1
    if count > MAX_AXIS_VALUES:
        raise InvalidParameter(f"{name} values", item, f"makes {count} values; an axis takes at most {MAX_AXIS_VALUES}")
    if kind is int:
        return [start + i * step for i in range(count)]
    return [round(start + i * step, 10) for i in range(count)]


# --- applying an axis to a request --------------------------------------------------------------
def _check_axis(axis: Axis, request: GenerationRequest, registry: Any) -> Axis:
    """``axis`` checked against the base request and the installed plugins, its values made
    canonical (sampler names) and its random seeds (-1) fixed, as A1111 does."""
    kind = axis.type
    values = list(axis.values)
    if kind in (SEED, VAR_SEED):
        from aipaint.api.request import MAX_SEED

        values = [random.randint(0, MAX_SEED) if value == -1 else value for value in values]
    elif kind is SAMPLER:
        values = [registry.samplers.get(value).name for value in values]
    elif kind is SCHEDULE:
        known = list(dict.fromkeys(name for spec in registry.samplers for name in spec.schedules))
        lookup = {name.lower(): name for name in known}
        for value in values:
            if value.lower() not in lookup:
                raise UnknownName("schedule", value, known)
        values = [lookup[value.lower()] for value in values]
    elif kind is PROMPT_SR:
        search = values[0]
        if search not in request.prompt and search not in request.negative_prompt:
            raise InvalidParameter("Prompt S/R", search, "is not in the prompt or the negative prompt",
                                   "the first value is the text each value replaces")
    elif kind is LORA_WEIGHT:
        if not _LORA_TAG.search(request.prompt):
            raise InvalidParameter("LoRA weight", axis.text, "needs a <lora:NAME:WEIGHT> tag in the prompt to vary")
    elif kind is DENOISING and request.init_image is None:
        raise InvalidParameter("Denoising", axis.text, "varies img2img's strength: give an init image (--image)")
    return dataclasses.replace(axis, values=tuple(values))


def _apply(axis: Axis | None, request: GenerationRequest, value: Any) -> GenerationRequest:
    if axis is None:
        return request
    kind = axis.type
    if kind.field is not None:
        return dataclasses.replace(request, **{kind.field: value})
    if kind is PROMPT_SR:
        search = axis.values[0]
        return dataclasses.replace(request, prompt=request.prompt.replace(search, value),
                                   negative_prompt=request.negative_prompt.replace(search, value))
    if kind is LORA_WEIGHT:
        weight = format_number(value)
        return dataclasses.replace(request, prompt=_LORA_TAG.sub(lambda m: f"<{m[1]}:{m[2]}:{weight}>", request.prompt))
    if kind is OPTION:
        namespace, _, option_field = (axis.option or "").partition(".")
        options = dict(request.options)
        group = options.get(namespace)
        if dataclasses.is_dataclass(group):
            values = {f.name: getattr(group, f.name) for f in dataclasses.fields(group)}
        else:
            values = dict(group or {})
        values[option_field] = value
        options[namespace] = values
        return dataclasses.replace(request, options=options)
    return request  # the checkpoint: the cell's model, not its request


# --- the plot ---------------------------------------------------------------------------------
@dataclass
class XYZCell:
    """One cell: its place, the request it ran (prompts resolved), its model (the checkpoint
    axis's value, else None), its image and PNG parameters, its file and its box in its grid."""

    x: int
    y: int
    z: int
    request: GenerationRequest
    model: str | None = None
    labels: tuple[str, ...] = ()
    template: Any = None
    image: Image.Image | None = None
    infotext: str = ""
    path: Path | None = None
    box: tuple[int, int, int, int] | None = None
    seconds: float = 0.0


@dataclass
class XYZResult:
    """The cells (in z, y, x order), the grids (one per Z value) and where they were saved."""

    cells: list[XYZCell]
    grids: list[Grid] = field(default_factory=list)
    grid_paths: list[Path] = field(default_factory=list)
    axes: tuple[Axis | None, Axis | None, Axis | None] = (None, None, None)

    def cell(self, x: int = 0, y: int = 0, z: int = 0) -> XYZCell:
        for cell in self.cells:
            if (cell.x, cell.y, cell.z) == (x, y, z):
                return cell
        raise IndexError(f"no cell at x={x}, y={y}, z={z}")

    @property
    def images(self) -> list[Image.Image]:
        return [grid.image for grid in self.grids]


def _as_axis(value: Axis | str | None) -> Axis | None:
    if value is None or isinstance(value, Axis):
        return value
    return parse_axis(value)


def cell_name(x: Axis | None, y: Axis | None, z: Axis | None, ix: int, iy: int, iz: int) -> str:
    """A cell's file name: ``x1-y0.png``, its indices padded to sort in order."""
    parts = [f"{letter}{index:0{len(str(len(axis.values) - 1))}d}"
             for letter, axis, index in (("x", x, ix), ("y", y, iy), ("z", z, iz)) if axis is not None]
    return ("-".join(parts) or "cell") + ".png"


def xyz(pipe: Pipeline | None, request: GenerationRequest | str, *, x: Axis | str | None = None,
        y: Axis | str | None = None, z: Axis | str | None = None, output: str | Path | None = None,
        cells_dir: str | Path | None = None, overwrite: bool = False, post: Sequence[Any] = (),
        load: Callable[[str], Pipeline] | None = None, dynamic: DynamicPrompts | None = None,
        on_cell: Callable[[int, int, XYZCell], None] | None = None, max_cells: int = MAX_CELLS) -> XYZResult:
    """Run ``request`` once per cell of the X/Y/Z plot and draw the grids.

    Axes are :class:`Axis` objects or ``"TYPE: VALUES"`` text. With ``output``, each grid is
    saved there (``grid.png``; with a Z axis ``grid-0.png``, ``grid-1.png``, …) and each cell
    in ``cells_dir`` (default: ``<grid name>-cells`` beside it) as it finishes, with its own
    parameters, so any cell regenerates alone (``aipaint generate --from-png CELL``). Nothing is
    replaced without ``overwrite``; every path and every cell's request is checked before the
    first generation. A seed of -1 is fixed once, so every cell shares it. ``load(name)`` loads
    a checkpoint axis's model (default: :func:`aipaint.load`); models load one at a time, in
    the axis's order. ``dynamic`` resolves each cell's prompt (its wildcards and variants) from
    the cell's seed, after Prompt S/R. ``post`` is a post-processing chain run on every cell.
    """
    from aipaint.api.request import GenerationRequest
    from aipaint.api.result import batch_paths, check_writable, save_png
    from aipaint.plugin.host import default_host
    from aipaint.plugin.postprocess import merge_infotext
    from aipaint.workflows.common import resolve_request, run_job
    from aipaint.workflows.grid import draw_grid

    if isinstance(request, str):
        request = GenerationRequest(prompt=request)
    axes = [_as_axis(x), _as_axis(y), _as_axis(z)]
    host = pipe.host if pipe is not None else default_host()
    checkpoint = [axis for axis in axes if axis is not None and axis.type is CHECKPOINT]
    if len(checkpoint) > 1:
        raise InvalidParameter("axes", "Checkpoint name", "only one axis may vary the checkpoint")
    if pipe is None and not checkpoint:
        raise InvalidParameter("pipe", None, "must be a loaded pipeline (aipaint.load()) unless an axis varies the checkpoint")
    if request.batch_size != 1:
        raise InvalidParameter("batch_size", request.batch_size, "must be 1: the X/Y/Z plot makes one image per cell")
    request = request.with_seed()
    axes = [_check_axis(axis, request, host.registry) if axis is not None else None for axis in axes]
    x_axis, y_axis, z_axis = axes
    sizes = [len(axis.values) if axis is not None else 1 for axis in axes]
    total = sizes[0] * sizes[1] * sizes[2]
    if isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 1:
        raise InvalidParameter("max_cells", max_cells, "must be a positive integer")
    if total > max_cells:
        raise InvalidParameter("axes", f"{' x '.join(map(str, sizes))} = {total} cells", f"must make at most {max_cells} cells")

    cells: list[XYZCell] = []
    for iz in range(sizes[2]):
        for iy in range(sizes[1]):
            for ix in range(sizes[0]):
                cell_request, model, labels = request, None, []
                for axis, index in ((x_axis, ix), (y_axis, iy), (z_axis, iz)):
                    if axis is None:
                        continue
                    value = axis.values[index]
                    cell_request = _apply(axis, cell_request, value)
                    labels.append(axis.label(value))
                    if axis.type is CHECKPOINT:
                        model = value
                if dynamic is not None:  # its syntax and wildcards, before any generation
                    dynamic.check(cell_request.prompt)
                    dynamic.check(cell_request.negative_prompt, what="negative prompt")
                cells.append(XYZCell(ix, iy, iz, _checked(cell_request, pipe if not checkpoint else None, host),
                                     model, tuple(labels)))

    output = Path(output) if output is not None else None
    grid_paths = batch_paths(output, sizes[2]) if output is not None else []
    if cells_dir is None and output is not None:
        cells_dir = output.with_name(f"{output.stem}-cells")
    for cell in cells:
        if cells_dir is not None:
            cell.path = Path(cells_dir) / cell_name(x_axis, y_axis, z_axis, cell.x, cell.y, cell.z)
    for path in [*grid_paths, *(cell.path for cell in cells if cell.path is not None)]:
        check_writable(path, overwrite=overwrite)

    order = sorted(cells, key=lambda c: (checkpoint[0].values.index(c.model) if checkpoint else 0, c.z, c.y, c.x))
    current_model, current = object(), pipe
    loader = load or _default_loader(host)
    for done, cell in enumerate(order, 1):
        if checkpoint and cell.model != current_model:
            current = None  # the previous checkpoint's memory is freed before the next one loads
            current, current_model = loader(cell.model), cell.model
        started = time.perf_counter()
        job = resolve_request(cell.request, dynamic)[0]
        result = run_job(current, job, post=post)
        cell.request, cell.template = job.request, job.template
        cell.image, cell.infotext = result.images[0], result.infotexts[0]
        cell.seconds = time.perf_counter() - started
        if cell.path is not None:
            save_png(cell.image, cell.path, cell.infotext, overwrite=overwrite)
        if on_cell is not None:
            on_cell(done, total, cell)

    grids = []
    for iz in range(sizes[2]):
        layer = [cell for cell in cells if cell.z == iz]
        rows = [[cell.image for cell in layer if cell.y == iy] for iy in range(sizes[1])]
        grid = draw_grid(rows, x_axis.labels if x_axis else [], y_axis.labels if y_axis else [],
                         z_axis.label(z_axis.values[iz]) if z_axis else None)
        for cell in layer:
            cell.box = grid.boxes[cell.y][cell.x]
        grids.append(grid)
        if grid_paths:
            entries = {}
            for letter, axis in (("X", x_axis), ("Y", y_axis), ("Z", z_axis)):
                if axis is not None:
                    entries[f"{letter} Type"] = axis.name
                    entries[f"{letter} Values"] = axis.text
            save_png(grid.image, grid_paths[iz], merge_infotext(layer[0].infotext, entries), overwrite=overwrite)
    return XYZResult(cells, grids, grid_paths, (x_axis, y_axis, z_axis))


def _checked(request: GenerationRequest, pipe: Pipeline | None, host: Any) -> GenerationRequest:
    """A cell's request checked before anything runs: by the pipeline, or (with a checkpoint axis,
    before its models load) against the installed plugins."""
    if pipe is not None:
        return pipe.check(request)
    request = request.with_typed_options(host.registry.options)
    if request.sampler is not None and request.schedule is not None:
        host.registry.samplers.get(request.sampler).check_schedule(request.schedule)
    return request


def _default_loader(host: Any) -> Callable[[str], Pipeline]:
    def load(name: str) -> Pipeline:
        from aipaint.pipeline import Pipeline

        return Pipeline.load(name, host=host)

    return load
