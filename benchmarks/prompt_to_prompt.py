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


def generated_swaps(pipe, n: int, steps: int, tolerance: float, cross: float, self_: float,
                    reweights: tuple[float, ...] = ()) -> dict[str, float]:
    from aipaint_plugins.prompt_to_prompt import edit
    from aipaint_plugins.shapes_world.evaluate import read_scene
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(2026)
    names = ("edit", "full", "neg", "plain", *(f"rw{w:g}" for w in reweights))
    counts: dict[str, float] = {f"{name}_{what}": 0.0 for name in names for what in ("kept", "ok", "iou", "shift")}
    counts["pairs"] = 0
    started = time.perf_counter()
    for i in range(n):
        scene = random_scene(rng, "train", n_objects=1)
        obj = scene.objects[0]
        new = other_colour(rng, obj.colour, obj.shape)
        a, b = scene.caption, swap_colour(scene.caption, obj.colour, new)
        result = edit(pipe, a, b, seed=i, steps=steps, cross_steps=cross, self_steps=self_)
        full = edit(pipe, a, b, seed=i, steps=steps, cross_steps=1.0, self_steps=self_)
        neg = edit(pipe, a, b, seed=i, steps=steps, cross_steps=cross, self_steps=self_, negative_rows=True)
        source = read_scene(result.images[1])
        if len(source.objects) != 1:
            continue
        counts["pairs"] += 1
        plain_image = pipe.txt2img(b, seed=i, steps=steps).image
        weighted = [(f"rw{w:g}", edit(pipe, a, b, seed=i, steps=steps, cross_steps=cross, self_steps=self_,
                                      reweight={new: w}).images[0]) for w in reweights]
        for name, image in (("edit", result.images[0]), ("full", full.images[0]), ("neg", neg.images[0]),
                            ("plain", plain_image), *weighted):
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


def real_images(pipe, n: int, steps: int, tolerance: float, inner: int, rates: list[float]) -> dict[str, list[float]]:
    from aipaint_plugins.prompt_to_prompt import edit, invert
    from aipaint_plugins.shapes_world.evaluate import read_scene
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(7)
    kinds = [("ddim", False, 0.0)] + [(f"null {lr:g}", True, lr) for lr in rates]
    rows: dict[str, list[float]] = {f"{what}_{kind}": [] for kind, _, _ in kinds for what in ("psnr", "sec", "swap")}
    rows["psnr_vae"] = []
    for _ in range(n):
        scene = random_scene(rng, "train", n_objects=1)
        image = render(scene)
        obj = scene.objects[0]
        new = other_colour(rng, obj.colour, obj.shape)
        target = swap_colour(scene.caption, obj.colour, new)
        truth = read_scene(image)
        with torch.inference_mode():
            clean = pipe.model.encode(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None])
            rows["psnr_vae"].append(psnr(np.asarray(pipe.model.decode(clean)[0].permute(1, 2, 0).numpy() * 255), image))
        for kind, null_text, lr in kinds:
            inv = invert(pipe, image, scene.caption, steps=steps, null_text=null_text, inner_steps=inner,
                         **({"learning_rate": lr} if null_text else {}))
            rows[f"sec_{kind}"].append(inv.seconds)
            result = edit(pipe, target=target, inversion=inv)
            rows[f"psnr_{kind}"].append(psnr(result.images[1], image))
            reading = read_scene(result.images[0])
            ok = layout_kept(truth, reading, tolerance) and reading.objects[0].colour == new
            rows[f"swap_{kind}"].append(float(ok))
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
    parser.add_argument("--inv-steps", type=int, default=10, help="DDIM steps of the inversions")
    parser.add_argument("--learning-rate", type=float, action="append", default=None,
                        help="null-text learning rate(s) to compare (default: 0.01, the paper's, and 0.05)")
    parser.add_argument("--reweight", type=float, action="append", default=[],
                        help="also an edit row with B's new colour word's attention re-weighted by this factor (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import aipaint

    pipe = aipaint.load()
    print(f"model {pipe.model.name}, {args.steps} steps, CFG {pipe.model.defaults.cfg_scale:g}, "
          f"sampler {pipe.model.defaults.sampler} (generated) / DDIM (inversions), tolerance {args.tolerance:g} px")
    if args.n:
        c = generated_swaps(pipe, args.n, args.steps, args.tolerance, args.cross_steps, args.self_steps,
                            tuple(args.reweight))
        pairs = max(c["pairs"], 1)
        print(f"\n1. colour-word swap on generated images: {c['pairs']} of {args.n} sources read as one object "
              f"(cross {args.cross_steps:g}, self {args.self_steps:g}; {c['seconds']:.0f} s)")
        print(f"{'':38}{'layout kept':>14}{'kept + new colour':>20}{'footprint IoU':>16}{'centre shift px':>17}")
        for name, label in (("edit", f"P2P, cross {args.cross_steps:g}"), ("full", "P2P, cross 1"),
                            ("neg", f"P2P, cross {args.cross_steps:g}, negative rows"),
                            ("plain", "plain re-generation of B"),
                            *((f"rw{w:g}", f"P2P, cross {args.cross_steps:g}, new colour x{w:g}") for w in args.reweight)):
            print(f"{label:38}{c[f'{name}_kept'] / pairs:>14.1%}{c[f'{name}_ok'] / pairs:>20.1%}"
                  f"{c[f'{name}_iou'] / pairs:>16.3f}{c[f'{name}_shift'] / pairs:>17.2f}")
        best = max(c[f"{name}_ok"] for name in ("edit", "full", "neg", *(f"rw{w:g}" for w in args.reweight))) / pairs
        print(f"target: edit success >= 90%: {'met' if best >= 0.9 else 'NOT met'} (best P2P row {best:.1%})")
    if args.n_real:
        rates = args.learning_rate or [0.01, 0.05]
        r = real_images(pipe, args.n_real, args.inv_steps, args.tolerance, args.inner_steps, rates)
        print(f"\n2. real (rendered) images, n={args.n_real}, {args.inv_steps} DDIM steps, {args.inner_steps} inner steps: "
              "reconstruction PSNR (dB) against the image, mean (min-max); colour swap from the inversion")
        vae = r["psnr_vae"]
        print(f"{'VAE round trip (ceiling)':34}{statistics.mean(vae):>8.2f} ({min(vae):.2f}-{max(vae):.2f})")
        labels = [("ddim", "DDIM inversion, no optimisation")] + [(f"null {lr:g}", f"null-text, lr {lr:g}") for lr in rates]
        for kind, label in labels:
            values = r[f"psnr_{kind}"]
            print(f"{label:34}{statistics.mean(values):>8.2f} ({min(values):.2f}-{max(values):.2f}), "
                  f"{statistics.mean(r[f'sec_{kind}']):6.2f} s per image, swap kept + new colour "
                  f"{statistics.mean(r[f'swap_{kind}']):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
