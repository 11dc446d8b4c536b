"""Make the pictures of docs/editing.md (docs/images/p2p_*.png) with the embedded model.

    OMP_NUM_THREADS=1 python docs/images/make_p2p.py

Pixels are enlarged without smoothing (the embedded model draws 32x32). Seeds and settings are
fixed, so a rerun makes the same pictures.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from aipaint_plugins.prompt_to_prompt import edit, invert
from aipaint_plugins.shapes_world.render import render
from aipaint_plugins.shapes_world.scene import random_scene
from PIL import Image, ImageDraw

import aipaint
from aipaint.errors import AipaintWarning

HERE = Path(__file__).resolve().parent
CELL = 128
LABEL = 30


def sheet(rows: list[list[tuple[str, Image.Image]]], name: str) -> None:
    """A grid of enlarged pictures, each with a label above it."""
    columns = max(len(r) for r in rows)
    out = Image.new("RGB", (columns * (CELL + 8) + 8, len(rows) * (CELL + LABEL + 8) + 8), "white")
    draw = ImageDraw.Draw(out)
    for r, row in enumerate(rows):
        for c, (label, image) in enumerate(row):
            x, y = 8 + c * (CELL + 8), 8 + r * (CELL + LABEL + 8)
            for k, line in enumerate(label.split("\n")[:2]):
                draw.text((x, y + k * 13), line, fill="black")
            out.paste(image.convert("RGB").resize((CELL, CELL), Image.NEAREST), (x, y + LABEL))
    path = HERE / f"p2p_{name}.png"
    out.save(path, optimize=True)
    print(path, out.size)


def main() -> None:
    warnings.simplefilter("ignore", AipaintWarning)
    pipe = aipaint.load()
    rows = []
    cases = [
        ("word swap", "a big red square on the left, on a white background",
         "a big green square on the left, on a white background", {}, 3),
        ("word swap", "a small yellow triangle at the top, on a gray background",
         "a small magenta triangle at the top, on a gray background", {}, 5),
        ("re-weighting", "a big cyan circle on the right, on a black background",
         "a big cyan circle on the right, on a black background", {"cyan": -1.0}, 2),
    ]
    for kind, a, b, reweight, seed in cases:
        result = edit(pipe, a, b, seed=seed, reweight=reweight)
        plain = pipe.txt2img(b, seed=seed).image
        words = " ".join(f"{w} x{f:g}" for w, f in reweight.items())
        rows.append([("source (prompt A)\n" + " ".join(a.split()[1:4]), result.images[1]),
                     (f"P2P {kind}\n" + (words or " ".join(b.split()[1:4])), result.images[0]),
                     ("plain prompt B,\nsame seed", plain)])
    sheet(rows, "edits")

    scene = random_scene(np.random.default_rng(3), "train", n_objects=1)
    image = render(scene)
    colour = scene.objects[0].colour
    new = "blue" if colour != "blue" else "green"
    target = scene.caption.replace(colour, new, 1)
    row = [("real image\n(rendered)", image)]
    for label, null_text in (("DDIM inversion\nreconstruction", False), ("null-text\nreconstruction", True)):
        inv = invert(pipe, image, scene.caption, steps=10, null_text=null_text, inner_steps=10, learning_rate=0.05)
        result = edit(pipe, target=target, inversion=inv)
        row.append((label, result.images[1]))
    row.append((f"null-text + P2P\n{colour} -> {new}", result.images[0]))
    sheet([row], "inversion")


if __name__ == "__main__":
    main()
