"""Frame-to-frame flicker of ``aipaint video`` on the embedded model: one seed for every frame
against seed + i, with and without the optical-flow temporal blend.

    python benchmarks/video_flicker.py [--threads 2]

The clip is a still shot (a big green circle on white, 32x32) with camera noise (Gaussian,
std 12) on each of 5 frames, the clip of ``tests/test_video.py``. Flicker is the mean absolute
change between consecutive frames, on 0-255.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def flicker(frames) -> float:
    return float(np.mean([np.abs(np.asarray(b, np.float32) - np.asarray(a, np.float32)).mean()
                          for a, b in zip(frames, frames[1:])]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import Scene, SceneObject
    from aipaint_plugins.video.stylize import Clip, stylize_clip
    from PIL import Image

    import aipaint

    pipe = aipaint.load()
    rng = np.random.default_rng(0)
    still = np.asarray(render(Scene("white", (SceneObject("circle", "green", "big", "left", cx=16.0, cy=16.0,
                                                          extent=13.0),))), np.float32)
    frames = [Image.fromarray(np.clip(still + rng.normal(0, 12, still.shape), 0, 255).astype(np.uint8)) for _ in range(5)]
    prompt = "a big green circle in the center, on a white background"
    print(f"footage: flicker {flicker(frames):.2f}")
    print(f"{'seed per frame':<16}{'temporal':>9}{'strength 0.5':>14}{'strength 0.75':>15}")
    for step, label in ((0, "one seed"), (1, "seed + i")):
        for temporal in (0.0, 0.5, 0.8):
            row = [flicker(stylize_clip(pipe, Clip(frames), prompt, denoising_strength=s, seed=3, seed_step=step,
                                        temporal=temporal).frames) for s in (0.5, 0.75)]
            print(f"{label:<16}{temporal:>9g}{row[0]:>14.2f}{row[1]:>15.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
