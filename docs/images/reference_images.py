"""Make the pictures of docs/reference.md (docs/images/reference_*.png) with the embedded model.

    OMP_NUM_THREADS=1 python docs/images/reference_images.py

reference_before_after.png: for each reference (left), a shape-only prompt's four seeds without the
reference, then with it (reference-only, style fidelity 1). Pixels are enlarged, not smoothed. Settings
are fixed, so a rerun makes the same picture.
"""

from __future__ import annotations

from pathlib import Path

from aipaint_plugins.reference import reference_unit
from aipaint_plugins.shapes_world.render import render
from aipaint_plugins.shapes_world.scene import POSITIONS, Scene, SceneObject
from PIL import Image, ImageDraw

import aipaint

HERE = Path(__file__).resolve().parent
SCALE, SEEDS = 3, 4
CASES = (("black", "green", "square", "a circle"), ("white", "cyan", "triangle", "a cross"))


def main() -> None:
    pipe = aipaint.load()
    cell = 32 * SCALE
    label_h = 16
    rows = []
    for background, colour, shape, prompt in CASES:
        reference = render(Scene(background, (SceneObject(shape, colour, "big", "center", *POSITIONS["center"], 13.0),)))
        without = pipe.txt2img(prompt, seed=1, batch_size=SEEDS).images
        with_ref = pipe.txt2img(prompt, seed=1, batch_size=SEEDS,
                                adapters=(reference_unit(reference, style_fidelity=1.0),)).images
        rows.append((prompt, reference, without, with_ref))
    width = cell * (1 + 2 * SEEDS) + 2 * 8
    sheet = Image.new("RGB", (width, label_h + len(rows) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), "reference", fill="black")
    draw.text((cell + 8 + 4, 2), "without the reference", fill="black")
    draw.text((cell * (1 + SEEDS) + 16 + 4, 2), "with it (reference-only, fidelity 1)", fill="black")
    for r, (prompt, reference, without, with_ref) in enumerate(rows):
        top = label_h + r * (cell + label_h)
        draw.text((cell + 8 + 4, top + cell + 2), f'prompt: "{prompt}", seeds 1-{SEEDS}', fill="black")
        tiles = [(0, reference)] + [(cell + 8 + i * cell, im) for i, im in enumerate(without)]
        tiles += [(cell * (1 + SEEDS) + 16 + i * cell, im) for i, im in enumerate(with_ref)]
        for x, image in tiles:
            sheet.paste(image.resize((cell, cell), Image.NEAREST), (x, top))
    out = HERE / "reference_before_after.png"
    sheet.save(out, optimize=True)
    print(out, sheet.size)


if __name__ == "__main__":
    main()
