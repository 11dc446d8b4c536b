"""Pictures for the explain views: a real font, labelled contact sheets, heat maps and plots.

Everything here is drawn with Pillow, so the sheets need nothing beyond aipaint's own
dependencies. Labels use a real TrueType font: DejaVu Sans from matplotlib when it is
installed, else the system's DejaVu Sans, else the scalable font Pillow embeds.
Small images (the embedded model paints 32×32) are enlarged with nearest-neighbour
sampling, so each model pixel stays a visible square.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from aipaint.errors import InvalidParameter

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
GRID = (225, 225, 225)
MAX_TEXT_WIDTH = 1400
"""A sheet grows to show its title and notes whole up to this width; longer text is cut with an ellipsis."""
SERIES_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                  (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
"""Line colours of the plots (matplotlib's "tab10", so a figure and a sheet agree)."""

# Anchors of a perceptually ordered colour map (matplotlib's "magma" at 0, .25, .5, .75, 1).
_MAGMA = np.array([(0, 0, 4), (81, 18, 124), (183, 55, 121), (252, 137, 97), (252, 253, 191)], dtype=np.float32)
_SYSTEM_FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                 "/Library/Fonts/DejaVuSans.ttf", "C:/Windows/Fonts/DejaVuSans.ttf")


@lru_cache(maxsize=1)
def font_path() -> str | None:
    """The TrueType file labels are drawn in: matplotlib's DejaVu Sans, else the system's; None
    when neither is there (then :func:`font` uses the scalable font Pillow embeds)."""
    try:
        from matplotlib import font_manager

        found = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=True)
        if found and Path(found).is_file():
            return str(found)
    except ImportError:
        pass
    return next((p for p in _SYSTEM_FONTS if Path(p).is_file()), None)


@lru_cache(maxsize=16)
def font(size: int = 13) -> ImageFont.FreeTypeFont:
    """A real TrueType font at ``size`` pixels (see :func:`font_path`)."""
    path = font_path()
    if path is not None:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)  # Pillow's embedded scalable font (FreeType)


def text_size(text: str, size: int = 13) -> tuple[int, int]:
    left, top, right, bottom = font(size).getbbox(text or " ")
    return int(math.ceil(right - min(left, 0))), int(math.ceil(bottom - min(top, 0)))


def fit_text(text: str, width: int, size: int = 13) -> str:
    """``text`` cut with an ellipsis so that it fits ``width`` pixels."""
    if text_size(text, size)[0] <= width:
        return text
    while text and text_size(text + "…", size)[0] > width:
        text = text[:-1]
    return text + "…"


def enlarge(image: Image.Image, cell: int) -> Image.Image:
    """``image`` scaled so its longer side is ``cell`` pixels: nearest-neighbour when enlarging
    by a whole factor (model pixels stay squares), Lanczos when shrinking."""
    image = image.convert("RGB")
    longest = max(image.size)
    if longest == cell:
        return image
    if longest < cell:
        factor = max(1, cell // longest)
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
        if max(image.size) == cell:
            return image
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def colour_map(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) → uint8 RGB (shape + (3,)) on a magma-like colour map."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0) * (len(_MAGMA) - 1)
    low = np.floor(v).astype(int).clip(0, len(_MAGMA) - 2)
    frac = (v - low)[..., None]
    rgb = _MAGMA[low] * (1 - frac) + _MAGMA[low + 1] * frac
    return rgb.round().astype(np.uint8)


def heatmap(values: np.ndarray, size: tuple[int, int] | None = None, *, vmax: float | None = None,
            stretch: bool = False) -> Image.Image:
    """A 2-D array as a colour-mapped picture, scaled to ``vmax`` (default: its maximum), or with
    ``stretch`` from its minimum to its maximum, and resized (bilinear) to ``size``."""
    values = np.asarray(values, dtype=np.float32)
    low = float(values.min()) if stretch else 0.0
    top = (float(values.max()) if vmax is None else float(vmax)) - low
    picture = Image.fromarray(colour_map((values - low) / top if top > 0 else np.zeros_like(values)))
    if size is not None and picture.size != size:
        picture = picture.resize(size, Image.Resampling.BILINEAR)
    return picture


def overlay(image: Image.Image, values: np.ndarray, *, alpha: float = 0.6, vmax: float | None = None,
            stretch: bool = False) -> Image.Image:
    """``values`` (a 2-D map, any resolution) as a heat map (see :func:`heatmap`) blended over ``image``."""
    image = image.convert("RGB")
    return Image.blend(image, heatmap(values, image.size, vmax=vmax, stretch=stretch), alpha)


def grey(image: Image.Image) -> Image.Image:
    """``image`` in grey, lightened: a base on which a heat map's colours read as the map's alone."""
    flat = np.asarray(image.convert("L"), dtype=np.float32)
    return Image.fromarray((128 + flat / 2).astype(np.uint8)).convert("RGB")


def side_by_side(images: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """Images in one row on white, ``gap`` pixels apart."""
    width = sum(i.width for i in images) + gap * (len(images) - 1)
    height = max(i.height for i in images)
    out = Image.new("RGB", (width, height), BACKGROUND)
    x = 0
    for image in images:
        out.paste(image.convert("RGB"), (x, 0))
        x += image.width + gap
    return out


def labelled(image: Image.Image, caption: str, *, size: int = 13) -> Image.Image:
    """``image`` with ``caption`` in a strip under it (an animation frame)."""
    height = text_size("Ag", size)[1] + 8
    out = Image.new("RGB", (image.width, image.height + height), BACKGROUND)
    out.paste(image.convert("RGB"), (0, 0))
    ImageDraw.Draw(out).text((4, image.height + 3), fit_text(caption, image.width - 8, size), font=font(size), fill=INK)
    return out


def contact_sheet(
    rows: Sequence[tuple[str, Sequence[Image.Image | None]]],
    *,
    title: str = "",
    columns: Sequence[str] = (),
    captions: Sequence[Sequence[str]] = (),
    cell: int = 128,
    notes: Sequence[str] = (),
    panels: Sequence[Image.Image] = (),
    labels_above: bool = False,
) -> Image.Image:
    """A labelled grid: ``title`` on top, ``columns`` over the columns, each row's label on its
    left (or, with ``labels_above``, on a line of its own above it) and its images (None leaves a
    cell empty) enlarged to ``cell`` pixels, ``captions[r][c]`` under each image, then ``panels``
    (plots) and ``notes`` (lines of text) below."""
    if not rows:
        raise InvalidParameter("rows", rows, "a contact sheet needs at least one row")
    pad, small, big = 8, 12, 15
    n_cols = max(len(images) for _, images in rows)
    label_width = 0 if labels_above else max([text_size(label, small)[0] for label, _ in rows] + [0])
    label_width = min(label_width, 220) + (pad if label_width else 0)
    line = text_size("Ag", small)[1] + 4
    has_captions = any(any(c for c in row) for row in captions)
    row_height = cell + (line + 2 if has_captions else 0) + pad
    grid_width = label_width + n_cols * (cell + pad)
    texts = [text_size(title, big)[0]] + [text_size(note, small)[0] for note in notes]
    texts += [text_size(label, small)[0] for label, _ in rows] if labels_above else []
    width = max(grid_width, *(p.width for p in panels), min(max(texts), MAX_TEXT_WIDTH), 240) + 2 * pad
    title_height = text_size("Ag", big)[1] + pad if title else 0
    column_height = line + 2 if any(columns) else 0
    notes_height = len(notes) * line + (pad if notes else 0)
    panels_height = sum(p.height + pad for p in panels)
    above_height = line * sum(1 for label, _ in rows if label) if labels_above else 0
    height = (pad + title_height + column_height + len(rows) * row_height + above_height + panels_height
              + notes_height + pad)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = pad
    if title:
        draw.text((pad, y), fit_text(title, width - 2 * pad, big), font=font(big), fill=INK)
        y += title_height
    x0 = pad + label_width
    if column_height:
        for c, label in enumerate(columns):
            draw.text((x0 + c * (cell + pad), y), fit_text(label, cell, small), font=font(small), fill=INK)
        y += column_height
    for r, (label, images) in enumerate(rows):
        if label and labels_above:
            draw.text((pad, y), fit_text(label, width - 2 * pad, small), font=font(small), fill=INK)
            y += line
        elif label:
            draw.text((pad, y + cell // 2 - line // 2), fit_text(label, label_width - pad, small), font=font(small),
                      fill=INK)
        for c, image in enumerate(images):
            x = x0 + c * (cell + pad)
            if image is not None:
                picture = enlarge(image, cell)
                sheet.paste(picture, (x + (cell - picture.width) // 2, y + (cell - picture.height) // 2))
            caption = captions[r][c] if r < len(captions) and c < len(captions[r]) else ""
            if caption:
                draw.text((x, y + cell + 2), fit_text(caption, cell, small), font=font(small), fill=MUTED)
        y += row_height
    for panel in panels:
        sheet.paste(panel.convert("RGB"), (pad, y))
        y += panel.height + pad
    for note in notes:
        draw.text((pad, y), fit_text(note, width - 2 * pad, small), font=font(small), fill=MUTED)
        y += line
    return sheet


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.ceil(low / step) * step
    return [start + i * step for i in range(int((high - start) / step + 1e-9) + 1)]


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:g}"


def line_plot(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    log_y: bool = False,
    size: tuple[int, int] = (520, 260),
    markers: bool = True,
    points: Sequence[tuple[float, float]] = (),
) -> Image.Image:
    """A line chart drawn with Pillow: ``series`` of ``(name, xs, ys)``, a legend when there are
    names, tick labels in the real font, and ``points`` marked in red (e.g. the frames a sheet
    shows). With ``log_y`` the y axis is logarithmic and values at or below zero are left out
    (a sampler's last sigma is 0)."""
    width, height = size
    left, right, top, bottom = 58, 12, 24 if title else 10, 40
    legend = [name for name, _, _ in series if name]
    legend_width = (max(text_size(n, 11)[0] for n in legend) + 28) if legend else 0
    plot = Image.new("RGB", (width + legend_width, height), BACKGROUND)
    draw = ImageDraw.Draw(plot)
    clean = []
    for name, xs, ys in series:
        kept = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y)) and (not log_y or float(y) > 0)]
        clean.append((name, [(x, math.log10(y) if log_y else y) for x, y in kept]))
    marked = [(float(x), math.log10(float(y)) if log_y else float(y)) for x, y in points
              if math.isfinite(float(y)) and (not log_y or float(y) > 0)]
    all_points = [p for _, pts in clean for p in pts] or [(0.0, 0.0), (1.0, 1.0)]
    x_low, x_high = min(p[0] for p in all_points), max(p[0] for p in all_points)
    y_low, y_high = min(p[1] for p in all_points), max(p[1] for p in all_points)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    if y_high == y_low:
        y_low, y_high = y_low - 1, y_high + 1
    margin = (y_high - y_low) * 0.05
    y_low, y_high = y_low - margin, y_high + margin
    box = (left, top, width - right, height - bottom)

    def at(x: float, y: float) -> tuple[float, float]:
        return (box[0] + (x - x_low) / (x_high - x_low) * (box[2] - box[0]),
                box[3] - (y - y_low) / (y_high - y_low) * (box[3] - box[1]))

    y_ticks = range(math.ceil(y_low), math.floor(y_high) + 1) if log_y else _ticks(y_low, y_high)
    for tick in y_ticks:
        _, ty = at(x_low, tick)
        draw.line([(box[0], ty), (box[2], ty)], fill=GRID)
        text = _number(10.0**tick) if log_y else _number(tick)
        tw, th = text_size(text, 11)
        draw.text((box[0] - tw - 6, ty - th / 2 - 1), text, font=font(11), fill=MUTED)
    for tick in _ticks(x_low, x_high, 6):
        tx, _ = at(tick, y_low)
        draw.line([(tx, box[1]), (tx, box[3])], fill=GRID)
        text = _number(tick)
        tw, _ = text_size(text, 11)
        draw.text((tx - tw / 2, box[3] + 4), text, font=font(11), fill=MUTED)
    draw.rectangle(box, outline=MUTED)
    for index, (_, line) in enumerate(clean):
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        xy = [at(x, y) for x, y in line]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        if markers:
            for px, py in xy:
                draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=colour)
    for x, y in marked:
        px, py = at(x, y)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], outline=(200, 30, 30), width=2)
    if title:
        draw.text((box[0], 4), fit_text(title, width - left, 13), font=font(13), fill=INK)
    if xlabel:
        tw, _ = text_size(xlabel, 12)
        draw.text(((box[0] + box[2]) / 2 - tw / 2, height - 18), xlabel, font=font(12), fill=INK)
    if ylabel:
        label = Image.new("RGB", (text_size(ylabel, 12)[0] + 4, 16), BACKGROUND)
        ImageDraw.Draw(label).text((2, 0), ylabel, font=font(12), fill=INK)
        rotated = label.rotate(90, expand=True)
        plot.paste(rotated, (2, int((box[1] + box[3]) / 2 - rotated.height / 2)))
    for index, name in enumerate(legend):
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        ly = top + 4 + index * 16
        draw.line([(width + 4, ly + 7), (width + 20, ly + 7)], fill=colour, width=3)
        draw.text((width + 24, ly), name, font=font(11), fill=INK)
    return plot


ANIMATION_FORMATS = {".gif": "GIF", ".webp": "WEBP"}


def save_image(image: Image.Image, path: str | Path, *, overwrite: bool = True, frames: Sequence[Image.Image] = (),
               duration: int = 250, parameters: str | None = None) -> Path:
    """Write a sheet (PNG, with ``parameters`` as its text chunk) or, with ``frames``, an animation
    (``.gif`` or ``.webp``, looping, ``duration`` ms a frame). Written as
    :func:`aipaint.api.result.save_png` writes: under a fresh name in the target folder, then
    moved into place; an existing file is replaced only with ``overwrite``."""
    import io

    from aipaint.api.result import check_writable, save_png

    path = Path(path)
    if not frames:
        return save_png(image, path, parameters, overwrite=overwrite)
    fmt = ANIMATION_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InvalidParameter("animation", str(path), "must end in .gif or .webp")
    check_writable(path, overwrite=overwrite)
    first, *rest = [f.convert("RGB") for f in frames]
    options: dict[str, Any] = {"save_all": True, "append_images": rest, "duration": duration, "loop": 0}
    options.update({"lossless": True} if fmt == "WEBP" else {"optimize": True})
    buffer = io.BytesIO()
    first.save(buffer, format=fmt, **options)
    return write_new_file(buffer.getvalue(), path, overwrite=overwrite)


def _new_file(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def write_new_file(content: bytes, path: Path, *, overwrite: bool) -> Path:
    """``content`` written to a new file beside ``path`` and given its name: replacing what is
    there only with ``overwrite``, never following a planted link."""
    from aipaint.api.result import check_writable

    check_writable(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(_new_file(tmp), "wb") as f:
            f.write(content)
        if overwrite:
            os.replace(tmp, path)
            return path
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise InvalidParameter("output", str(path), "appeared while aipaint was writing it, and was not replaced",
                                   "replace it with --overwrite or overwrite=True, or choose another name") from exc
        except OSError:  # no hard links here (FAT, some shares): a file that must be new
            with open(_new_file(path), "wb") as f:
                f.write(content)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path
