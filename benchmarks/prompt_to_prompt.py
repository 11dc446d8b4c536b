"""Prompt-to-Prompt and null-text inversion on the embedded model, read back by the evaluator.

1. Colour-word swap, generated images: for n one-object scenes (random captions of the train
   split, seed i), prompt A is the caption and prompt B the same caption with the object's colour
   word swapped for another training colour. Counted over the pairs whose source shows one object:
   the edit *keeps the layout* when its one object has the source's read shape and size and its
   centre is within ``--tolerance`` px of the source's; it *succeeds* when it also shows B's colour.
   The same B generated plainly from the same seed is scored the same way, side by side.
2. Real images: n rendered one-object scenes are inverted under their captions, with and without
   the null-text optimisation; the reconstruction's PSNR against the rendered image is printed,
   then a colour swap from the null-text inversion is scored against the rendered scene.

    python benchmarks/prompt_to_prompt.py [--n 40] [--n-real 10] [--steps 20] [--tolerance 2]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import numpy as np
import torch


def swap_colour(caption: str, colour: str, new: str) -> str:
    return re.sub(rf"\b{colour}\b", new, caption, count=1)


def other_colour(rng: np.random.Generator, colour: str, shape: str) -> str:
    from aipaint_plugins.shapes_world.scene import HELDOUT_COMBOS, TRAIN_COLOURS

    choices = [c for c in TRAIN_COLOURS if c != colour and (c, shape) not in HELDOUT_COMBOS]
    return str(rng.choice(choices))


def layout_kept(source, edited, tolerance: float) -> bool:
    """One object in each, same shape and size, centres within ``tolerance`` px."""
    if len(source.objects) != 1 or len(edited.objects) != 1:
        return False
    a, b = source.objects[0], edited.objects[0]
    return (a.shape == b.shape and a.size == b.size and abs(a.cx - b.cx) <= tolerance
            and abs(a.cy - b.cy) <= tolerance)


def foreground_iou(a, b) -> float:
    """IoU of the pixels that differ from each image's border colour: the objects' exact footprint."""
    masks = []
    for image in (a, b):
        x = np.asarray(image, dtype=np.float64)
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
        masks.append(np.linalg.norm(x - np.median(border, axis=0), axis=2) > 60)
    union = (masks[0] | masks[1]).sum()
    return 1.0 if union == 0 else float((masks[0] & masks[1]).sum() / union)


def psnr(a, b) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def generated_swaps(pipe, n: int, steps: int, tolerance: float, cross: float, self_: float) -> dict[str, float]:
    from aipaint_plugins.prompt_to_prompt import edit
    from aipaint_plugins.shapes_world.evaluate import read_scene
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(2026)
    counts: dict[str, float] = {"pairs": 0, "edit_kept": 0, "edit_ok": 0, "plain_kept": 0, "plain_ok": 0,
                                "edit_iou": 0.0, "plain_iou": 0.0, "edit_shift": 0.0, "plain_shift": 0.0}
    started = time.perf_counter()
    for i in range(n):
        scene = random_scene(rng, "train", n_objects=1)
        obj = scene.objects[0]
        new = other_colour(rng, obj.colour, obj.shape)
        a, b = scene.caption, swap_colour(scene.caption, obj.colour, new)
        result = edit(pipe, a, b, seed=i, steps=steps, cross_steps=cross, self_steps=self_)
        source = read_scene(result.images[1])
        if len(source.objects) != 1:
            continue
        counts["pairs"] += 1
        plain_image = pipe.txt2img(b, seed=i, steps=steps).image
        for name, image in (("edit", result.images[0]), ("plain", plain_image)):
            reading = read_scene(image)
            counts[f"{name}_iou"] += foreground_iou(result.images[1], image)
            if reading.objects:
                o, s = reading.objects[0], source.objects[0]
                counts[f"{name}_shift"] += abs(o.cx - s.cx) + abs(o.cy - s.cy)
            else:
                counts[f"{name}_shift"] += 32.0
            kept = layout_kept(source, reading, tolerance)
            counts[f"{name}_kept"] += kept
            counts[f"{name}_ok"] += kept and reading.objects[0].colour == new
    counts["seconds"] = time.perf_counter() - started
    return counts


def real_images(pipe, n: int, steps: int, tolerance: float, inner: int) -> dict[str, list[float]]:
    from aipaint_plugins.prompt_to_prompt import edit, invert
    from aipaint_plugins.shapes_world.evaluate import read_scene
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(7)
    rows: dict[str, list[float]] = {"psnr_ddim": [], "psnr_null": [], "sec_ddim": [], "sec_null": [],
                                    "swap_ok": [], "swap_ok_ddim": []}
    for _ in range(n):
        scene = random_scene(rng, "train", n_objects=1)
        image = render(scene)
        obj = scene.objects[0]
        new = other_colour(rng, obj.colour, obj.shape)
        target = swap_colour(scene.caption, obj.colour, new)
        truth = read_scene(image)
        for kind, null_text in (("ddim", False), ("null", True)):
            inv = invert(pipe, image, scene.caption, steps=steps, null_text=null_text, inner_steps=inner)
            rows[f"sec_{kind}"].append(inv.seconds)
            result = edit(pipe, target=target, inversion=inv)
            rows[f"psnr_{kind}"].append(psnr(result.images[1], image))
            reading = read_scene(result.images[0])
            ok = layout_kept(truth, reading, tolerance) and reading.objects[0].colour == new
            rows["swap_ok" if null_text else "swap_ok_ddim"].append(float(ok))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="generated pairs (seeds 0…n-1)")
    parser.add_argument("--n-real", type=int, default=10, help="rendered images to invert")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=2.0, help="px a centre may move and still count as kept")
    parser.add_argument("--cross-steps", type=float, default=0.8)
    parser.add_argument("--self-steps", type=float, default=0.4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import aipaint

    pipe = aipaint.load()
    print(f"model {pipe.model.name}, {args.steps} steps, CFG {pipe.model.defaults.cfg_scale:g}, "
          f"sampler {pipe.model.defaults.sampler} (generated) / DDIM (inversions), tolerance {args.tolerance:g} px")
    if args.n:
        c = generated_swaps(pipe, args.n, args.steps, args.tolerance, args.cross_steps, args.self_steps)
        pairs = max(c["pairs"], 1)
        print(f"\n1. colour-word swap on generated images: {c['pairs']} of {args.n} sources read as one object "
              f"(cross {args.cross_steps:g}, self {args.self_steps:g}; {c['seconds']:.0f} s)")
        print(f"{'':28}{'layout kept':>14}{'kept + new colour':>20}{'footprint IoU':>16}{'centre shift px':>17}")
        for name, label in (("edit", "Prompt-to-Prompt edit"), ("plain", "plain re-generation of B")):
            print(f"{label:28}{c[f'{name}_kept'] / pairs:>14.1%}{c[f'{name}_ok'] / pairs:>20.1%}"
                  f"{c[f'{name}_iou'] / pairs:>16.3f}{c[f'{name}_shift'] / pairs:>17.2f}")
        print(f"target: edit success >= 90%: {'met' if c['edit_ok'] / pairs >= 0.9 else 'NOT met'}")
    if args.n_real:
        r = real_images(pipe, args.n_real, args.steps, args.tolerance, args.inner_steps)
        print(f"\n2. real (rendered) images, n={args.n_real}: reconstruction PSNR (dB) against the image, mean (min-max)")
        for kind, label in (("ddim", "DDIM inversion only"), ("null", "null-text inversion")):
            values = r[f"psnr_{kind}"]
            print(f"{label:28}{statistics.mean(values):>8.2f} ({min(values):.2f}-{max(values):.2f}), "
                  f"{statistics.mean(r[f'sec_{kind}']):.2f} s per image")
        print(f"colour swap from the inversion, layout kept + new colour: null-text "
              f"{statistics.mean(r['swap_ok']):.0%}, DDIM only {statistics.mean(r['swap_ok_ddim']):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
