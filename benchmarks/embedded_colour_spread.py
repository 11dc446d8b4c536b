"""How far the embedded model's object colours are from the world's palette, and how many are
wrong, at a few CFG scales: tells a muddy colour (a hue between the ones the model is unsure
of) from a wrong palette colour. Captions disjoint from ``embedded_model.py``'s (seed 3000).

    python benchmarks/embedded_colour_spread.py [--n 40] [--cfg "1;7"] [--model PATH] [--threads 2]

``--model`` scores another trained copy with the embedded model's card defaults (as
``embedded_cfg_peak.py --model`` does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedded_model import captions, embedded_pipe  # noqa: E402

OFF_PALETTE = 60.0  # RGB distance beyond which a colour is between the palette's


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--cfg", default="1;7", help="';'-separated CFG scales")
    ap.add_argument("--model", help="another trained copy of the embedded model (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from aipaint_plugins.shapes_world.evaluate import read_scene
    from aipaint_plugins.shapes_world.scene import COLOURS, parse_caption

    pipe = embedded_pipe(a.model)
    palette = [np.asarray(v, np.float32) for v in COLOURS.values()]
    caps = captions(a.n, "train", seed=3000)
    for cfg in (float(v) for v in a.cfg.split(";")):
        distances, wrong, wrong_off = [], 0, 0
        for i, text in enumerate(caps):
            asked = {colour for _, colour, _, _ in parse_caption(text).objects}
            for obj in read_scene(pipe.txt2img(text, seed=3000 + i, cfg_scale=cfg).image).objects:
                d = min(float(np.linalg.norm(np.asarray(obj.rgb, np.float32) - p)) for p in palette)
                distances.append(d)
                if obj.colour not in asked:
                    wrong += 1
                    wrong_off += d > OFF_PALETTE
        d = np.asarray(distances)
        print(f"{a.model or pipe.model.name} CFG {cfg:g}: {len(d)} objects, median distance to the nearest palette "
              f"colour {np.median(d):.0f}, {np.mean(d > OFF_PALETTE):.0%} over {OFF_PALETTE:g}; {wrong} wrong colours "
              f"({wrong_off} off-palette, {wrong - wrong_off} another palette colour)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
