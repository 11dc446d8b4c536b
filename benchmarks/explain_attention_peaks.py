"""Where does the colour word's cross-attention map peak, on the embedded model? (docs/explain.md)

For 100 one-object prompts (5 colours × 4 shapes × 5 positions, seeds 1000-1099, 20 steps),
``aipaint.explain.attention`` maps the colour word; the shapes-world evaluator (pixels only) finds
the object. A map "peaks on the object" when its maximum lies in the object's box. Reported for
each setting (layers:combine, as ``aipaint explain attention --layers … --combine …`` takes them;
``auto:auto`` is what the embedded model's card names). Run it on the prompts the card's choice was
made on (``--seed 1000``) and on held-out seeds (``--seed 2000``).

    python benchmarks/explain_attention_peaks.py [--n 100] [--steps 20] [--seed 1000] [--out benchmarks/results/explain_attention_peaks.txt]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the centre")


def main() -> None:
    from aipaint_plugins.shapes_world.evaluate import read_scene

    import aipaint
    from aipaint import explain

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--settings", default="auto:auto,up:probability,finest:probability,up_blocks.1:probability")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/results/explain_attention_peaks.txt")
    ap.add_argument("--save", default="", help="an .npz to keep the maps in (for trying other peak rules)")
    args = ap.parse_args()

    pipe = aipaint.load()
    combos = list(itertools.product(COLOURS, SHAPES, POSITIONS))
    order = list(range(len(combos)))[: args.n]  # each colour × shape × position once, seed = --seed + index
    lines = [f"# explain attention peaks: {args.n} prompts, {args.steps} steps, embedded model, {time.strftime('%Y-%m-%d')}",
             "# command: python benchmarks/explain_attention_peaks.py " + " ".join(
                 f"--{k} {v}" for k, v in vars(args).items() if v not in ("", None))]
    saved: dict[str, list] = {}
    for setting in args.settings.split(","):
        layers, combine = setting.split(":")
        chosen = layers if layers in ("auto", "all", "down", "mid", "up", "finest") else layers.split("+")
        raw_hits, higher, skipped = [], [], 0
        started = time.perf_counter()
        for i, index in enumerate(order):
            colour, shape, position = combos[index]
            prompt = f"a big {colour} {shape} {position}, on a white background"
            result = explain.attention(pipe, prompt, seed=args.seed + i, steps=args.steps, layers=chosen,
                                       combine=combine, words=[colour])
            run = result.data["runs"][0]
            (phase,) = run["phases"]
            reading = read_scene(run["image"])
            if not reading.objects:
                skipped += 1
                continue
            found = max(reading.objects, key=lambda o: o.area)
            k = [w.text for w in phase["words"]].index(colour)
            word_map = phase["word_maps"][k]

            flat = int(np.argmax(word_map))
            peak_x, peak_y = flat % word_map.shape[1], flat // word_map.shape[1]
            raw_hits.append(abs(peak_x + 0.5 - found.cx) <= found.extent / 2
                            and abs(peak_y + 0.5 - found.cy) <= found.extent / 2)
            image = np.asarray(run["image"].convert("RGB"), dtype=np.int16)
            on = np.linalg.norm(image - np.array(reading.background_rgb), axis=2) > 60
            higher.append(bool(word_map[on].mean() > word_map[~on].mean()))
            if args.save:
                saved.setdefault(f"{setting}_maps", []).append(phase["token_maps"])
                saved.setdefault(f"{setting}_positions", []).append([list(w.positions) for w in phase["words"]])
                saved.setdefault(f"{setting}_box", []).append((found.cx, found.cy, found.extent, k))
        n = len(raw_hits)
        line = (f"{setting:<26} seeds {args.seed}-{args.seed + args.n - 1}: n={n} (no object read: {skipped})  "
                f"peak on the object {np.mean(raw_hits):.0%}  higher on the object {np.mean(higher):.0%}  "
                f"({time.perf_counter() - started:.0f} s)")
        print(line, flush=True)
        lines.append(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with Path(args.out).open("a") as f:  # one file for both seed sets
        f.write("\n".join(lines) + "\n")
    if args.save:
        np.savez_compressed(args.save, **{k: np.array(v, dtype=object) for k, v in saved.items()})


if __name__ == "__main__":
    main()
