"""Style from a reference image on the embedded model: does the reference's colour and background
carry over while the prompt's shape is drawn? (the reference plugin, ``plugins/reference``)

    python benchmarks/reference_style.py [--seeds 4] [--threads 1] [--steps 20]

Each reference is a rendered shapes-world scene (one big object in the centre); each prompt names
only a shape (``"a circle"``), never a colour or background, so the colour and background the
model picks are free for the reference to set. For every (reference, prompt) pair ``--seeds``
images are generated (seeds 1..N, one batch) with and without the reference, and
``aipaint_plugins.shapes_world.evaluate.read_scene`` reads them back:

* colour  = the largest object's colour is the reference's
* bg      = the background is the reference's
* shape   = the largest object's shape is the prompt's (not the reference's: each pair below
            has a different reference shape, so copying the reference scores 0 here)
* all     = colour, bg and shape at once
* dist    = the mean RGB distance (0-441) from the largest object's colour to the reference's
            object colour: lower is closer, so a colour that moves towards the reference's without
            reaching it shows here (an image with no object counts 441)

Rows are the weight-free modes at a few style fidelities (IP-Adapter needs downloaded weights
and is not measured here). The card's defaults otherwise (20 steps, DPM++ 2M, CFG 7).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REFERENCES = (("green", "black", "square"), ("cyan", "white", "triangle"), ("magenta", "black", "cross"),
              ("blue", "white", "circle"))
SHAPES = ("circle", "square", "triangle", "cross")
ROWS: tuple[tuple[str, dict | None], ...] = (
    ("no reference", None),
    ("reference-only, fidelity 0.5", {"mode": "reference-only", "style_fidelity": 0.5}),
    ("reference-only, fidelity 1", {"mode": "reference-only", "style_fidelity": 1.0}),
    ("reference-adain, fidelity 1", {"mode": "reference-adain", "style_fidelity": 1.0}),
    ("reference-adain+attn, fidelity 1", {"mode": "reference-adain+attn", "style_fidelity": 1.0}),
)


def reference_image(colour: str, background: str, shape: str):
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import POSITIONS, Scene, SceneObject

    cx, cy = POSITIONS["center"]
    return render(Scene(background, (SceneObject(shape, colour, "big", "center", cx, cy, 13.0),)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4, help="images per (reference, prompt) pair")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weight", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from aipaint_plugins.reference import reference_unit
    from aipaint_plugins.shapes_world.evaluate import read_scene
    from aipaint_plugins.shapes_world.scene import COLOURS

    import aipaint

    pipe = aipaint.load()
    pairs = [(ref, shape) for ref in REFERENCES for shape in SHAPES if shape != ref[2]]
    n = len(pairs) * args.seeds
    print(f"model: {pipe.model.name}; {len(REFERENCES)} references x {len(SHAPES) - 1} other shapes x {args.seeds} seeds "
          f"= {n} images per row; weight {args.weight:g}; {args.steps} steps")
    print(f"{'row':<34}{'colour':>8}{'bg':>8}{'shape':>8}{'all':>8}{'dist':>8}{'s/img':>8}")
    for label, options in ROWS:
        hits = {"colour": 0, "bg": 0, "shape": 0, "all": 0}
        distance = 0.0
        started = time.perf_counter()
        for (colour, background, ref_shape), shape in pairs:
            units = ()
            if options is not None:
                units = (reference_unit(reference_image(colour, background, ref_shape), weight=args.weight, **options),)
            result = pipe.txt2img(f"a {shape}", seed=1, batch_size=args.seeds, steps=args.steps, adapters=units)
            for image in result.images:
                reading = read_scene(image)
                main_object = max(reading.objects, key=lambda o: o.area, default=None)
                ok = {
                    "colour": main_object is not None and main_object.colour == colour,
                    "bg": reading.background == background,
                    "shape": main_object is not None and main_object.shape == shape,
                }
                ok["all"] = all(ok.values())
                target = np.array(COLOURS[colour], dtype=float)
                distance += float(np.linalg.norm(np.array(main_object.rgb, dtype=float) - target)) if main_object else 441.0
                for key, value in ok.items():
                    hits[key] += int(value)
        per_image = (time.perf_counter() - started) / n
        cells = "".join(f"{100 * hits[k] / n:>7.0f}%" for k in ("colour", "bg", "shape", "all"))
        print(f"{label:<34}{cells}{distance / n:>8.0f}{per_image:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
