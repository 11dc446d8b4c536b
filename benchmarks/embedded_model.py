"""Quality and speed of the embedded model (issue: the embedded default model).

Prints, for a fixed set of (prompt, seed) pairs drawn from the shapes world:
  * adherence at default settings (20 steps, CFG 7, the card's guidance rescale) on
    training-distribution captions and on held-out colour x shape combinations;
  * adherence for a CFG sweep (1, 3, 7, 12) and a steps sweep (5, 10, 20, 30);
  * the time of one 20-step image in a warm process, and of a cold `aipaint generate`;
  * the features a user tries (``--feature-n`` pairs each, at default settings unless said):
    free phrasings (aipaint_plugins.shapes_world.scene.free_caption) in arrangements used for training and in the
    held-out ones (colour and background right, every asked attribute right), emphasis
    ``(colour:1.3)`` on held-out phrasings (colour kept), prompt editing ``[A:B:0.2]`` of the colour
    (B's colour drawn), img2img of a render towards another colour at strengths 0.3 / 0.6 / 0.9
    (new colour drawn), and samplers x the Karras and Exponential schedules (attributes present).

Usage: python benchmarks/embedded_model.py [--n 200] [--sweep-n 100] [--threads 2] [--json out.json]
       python benchmarks/embedded_model.py --model PATH --quality-only   (another trained copy, same pairs)
       python benchmarks/embedded_model.py [--model PATH] --features-only --feature-n 60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def captions(n: int, split: str, seed: int) -> list[str]:
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(seed)
    return [random_scene(rng, split).caption for _ in range(n)]


def embedded_pipe(model: str | None = None):
    """The embedded model's pipeline; with ``model`` (another trained copy, e.g. a ``--resume``
    run's output) its UNet, text encoder, VAE and latent scale, under the embedded card's defaults
    (32x32, guidance rescale 0.7, emphasis none)."""
    import aipaint

    pipe = aipaint.load()
    if model:
        other = aipaint.load(model)
        pipe.model.unet.load_state_dict(other.model.unet.state_dict())
        pipe.model.text_encoder.load_state_dict(other.model.text_encoder.state_dict())
        pipe.model.vae.load_state_dict(other.model.vae.state_dict())  # a --normalize-channels run folds a new latent
        pipe.model.vae.register_to_config(scaling_factor=other.model.scaling_factor)
        pipe.model.scheduler_config = dict(other.model.scheduler_config)  # a run may change the schedule
        pipe.model._encoders.clear()
    return pipe


def score(pipe, caps: list[str], seed: int, batch: int = 10, **params) -> dict:
    from aipaint_plugins.shapes_world.evaluate import adherence, summarize

    scores = []
    for i in range(0, len(caps), batch):
        chunk = caps[i : i + batch]
        for j, cap in enumerate(chunk):
            image = pipe.txt2img(cap, seed=seed + i + j, **params).image
            scores.append(adherence(image, cap))
    return summarize(scores)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="(prompt, seed) pairs at default settings")
    ap.add_argument("--sweep-n", type=int, default=100, help="pairs per point of the CFG and steps sweeps (0: no sweeps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--model", help="score another trained copy of the embedded model under its card's defaults "
                                    "(see embedded_pipe)")
    ap.add_argument("--quality-only", action="store_true", help="adherence and sweeps only, no timings")
    ap.add_argument("--feature-n", type=int, default=60, help="pairs per feature row (0: no feature rows)")
    ap.add_argument("--features-only", action="store_true", help="only the feature rows")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    pipe = embedded_pipe(a.model)
    d = pipe.model.defaults
    name = a.model or f"{pipe.model.name} ({pipe.model.model_hash})"
    print(f"model: {name}; defaults: {d.steps} steps, CFG {d.cfg_scale}, "
          f"{d.sampler}, guidance rescale {d.guidance_rescale}, {d.width}x{d.height}")
    out: dict = {"defaults": d.__dict__}
    if a.feature_n:
        out["features"] = feature_rows(pipe, a.feature_n)
    if a.features_only:
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
        return 0

    train_caps = captions(a.n, "train", seed=1000)
    out["train"] = score(pipe, train_caps, seed=1000)
    out["heldout_combo"] = score(pipe, captions(min(a.n, 100), "heldout_combo", seed=2000), seed=2000)
    for key in ("train", "heldout_combo"):
        r = out[key]
        print(f"{key:>14}: n={r['n']} attributes present {r['score']:.1%}, all correct {r['all_correct']:.1%} "
              f"(shape {r['shape_acc']:.1%}, colour {r['colour_acc']:.1%}, size {r['size_acc']:.1%}, "
              f"position {r['position_acc']:.1%}, background {r['background_acc']:.1%})")

    if a.sweep_n:
        sweeps(pipe, train_caps[: a.sweep_n], out)
    if not a.quality_only:
        timings(pipe, train_caps, a.threads, out)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def sweeps(pipe, sweep_caps: list[str], out: dict) -> None:
    out["cfg_sweep"] = {}
    print("CFG sweep (20 steps):", end="")
    for cfg in (1, 3, 7, 12):
        r = score(pipe, sweep_caps, seed=1000, cfg_scale=cfg)
        out["cfg_sweep"][cfg] = r["score"]
        print(f"  CFG {cfg}: {r['score']:.1%}", end="", flush=True)
    print()
    out["cfg_sweep_no_rescale"] = {}
    print("CFG sweep, guidance rescale 0:", end="")
    for cfg in (1, 3, 7, 12):
        r = score(pipe, sweep_caps, seed=1000, cfg_scale=cfg, guidance_rescale=0.0)
        out["cfg_sweep_no_rescale"][cfg] = r["score"]
        print(f"  CFG {cfg}: {r['score']:.1%}", end="", flush=True)
    print()
    out["steps_sweep"] = {}
    print("steps sweep (CFG 7):", end="")
    for steps in (5, 10, 20, 30):
        r = score(pipe, sweep_caps, seed=1000, steps=steps)
        out["steps_sweep"][steps] = r["score"]
        print(f"  {steps} steps: {r['score']:.1%}", end="", flush=True)
    print()


def scenes(n: int, seed: int) -> list:
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(seed)
    return [random_scene(rng, "train") for _ in range(n)]


def colour_and_background(score) -> bool:
    """Every asked object's colour and the asked background are right (one image)."""
    objs = score.details["objects"]
    bg = score.details["background"]["ok"]
    return all(o.get("colour", True) for o in objs) and bg is not False


def _row(scores) -> dict:
    from aipaint_plugins.shapes_world.evaluate import summarize

    r = summarize(scores)
    r["colour_and_background"] = float(np.mean([colour_and_background(s) for s in scores]))
    one = [s for s in scores if len(s.details["objects"]) == 1]  # the targets are about one object
    r["one_object"] = {"n": len(one),
                       "colour_and_background": float(np.mean([colour_and_background(s) for s in one])) if one else None,
                       "all_correct": float(np.mean([s.all_correct for s in one])) if one else None}
    return r


def feature_rows(pipe, n: int) -> dict:
    """The rows a user's first tries meet (see the module docstring); every prompt is scored
    on the attributes it asks for."""
    from aipaint_plugins.shapes_world.evaluate import adherence
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import HELDOUT_COMBOS, TRAIN_COLOURS, Scene, free_caption

    rows: dict = {}
    base = scenes(n, seed=3000)
    for mode in ("train", "heldout"):
        rng = np.random.default_rng(3001)
        caps = [free_caption(s, rng, mode) for s in base]
        rows[f"phrasings_{mode}"] = _row([adherence(pipe.txt2img(c, seed=3000 + i).image, c)
                                          for i, c in enumerate(caps)])
    rng = np.random.default_rng(3002)
    caps = [free_caption(s, rng, "heldout") for s in base]
    weighted = []
    for c, s in zip(caps, base):
        for o in s.objects:
            c = c.replace(f" {o.colour} ", f" ({o.colour}:1.3) ", 1)
        weighted.append(c)
    rows["emphasis_1.3_heldout_phrasings"] = _row([adherence(pipe.txt2img(w, seed=3000 + i).image, c)
                                                   for i, (w, c) in enumerate(zip(weighted, caps))])

    # a colour B for the first object that keeps the scene a training one
    rng = np.random.default_rng(3003)
    recoloured = []
    for s in base:
        o = s.objects[0]
        options = [c for c in TRAIN_COLOURS if c != o.colour and (c, o.shape) not in HELDOUT_COMBOS
                   and all(c != other.colour for other in s.objects[1:])]
        b = options[int(rng.integers(len(options)))]
        recoloured.append(Scene(s.background, (dataclasses.replace(o, colour=b), *s.objects[1:])))
    edits = []
    for s, t in zip(base, recoloured):
        a_col, b_col, shape = s.objects[0].colour, t.objects[0].colour, s.objects[0].shape
        edits.append(s.caption.replace(f"{a_col} {shape}", f"[{a_col}:{b_col}:0.2] {shape}", 1))
    rows["prompt_edit_0.2_to_B"] = _row([adherence(pipe.txt2img(e, seed=3000 + i).image, t.caption)
                                         for i, (e, t) in enumerate(zip(edits, recoloured))])

    rows["img2img_to_B"] = {}
    for strength in (0.3, 0.6, 0.9):
        sc = [adherence(pipe.img2img(render(s), t.caption, denoising_strength=strength, seed=3000 + i).image,
                        t.caption) for i, (s, t) in enumerate(zip(base, recoloured))]
        rows["img2img_to_B"][strength] = _row(sc)

    rows["samplers_x_schedules"] = {}
    for sampler in ("DPM++ 2M", "Euler", "DPM++ 2M SDE", "UniPC"):
        for schedule in ("Karras", "Exponential"):
            sc = [adherence(pipe.txt2img(s.caption, seed=3000 + i, sampler=sampler, schedule=schedule).image,
                            s.caption) for i, s in enumerate(base)]
            rows["samplers_x_schedules"][f"{sampler} / {schedule}"] = _row(sc)
    print_features(rows)
    return rows


def print_features(rows: dict) -> None:
    def line(name: str, r: dict) -> None:
        one = r["one_object"]
        print(f"{name:>34}: n={r['n']} colour+background {r['colour_and_background']:.1%}, all asked right "
              f"{r['all_correct']:.1%}, attributes {r['score']:.1%} (colour {r['colour_acc']:.1%}); one object "
              f"(n={one['n']}): colour+background {one['colour_and_background']:.1%}, all asked right "
              f"{one['all_correct']:.1%}")

    for key in ("phrasings_train", "phrasings_heldout", "emphasis_1.3_heldout_phrasings", "prompt_edit_0.2_to_B"):
        line(key, rows[key])
    for strength, r in rows["img2img_to_B"].items():
        line(f"img2img to B, strength {strength}", r)
    for key, r in rows["samplers_x_schedules"].items():
        line(key, r)


def timings(pipe, train_caps: list[str], threads: int, out: dict) -> None:
    d = pipe.model.defaults
    pipe.txt2img(train_caps[0], seed=0)  # warm-up
    times = []
    for i in range(10):
        started = time.perf_counter()
        pipe.txt2img(train_caps[i], seed=i)
        times.append(time.perf_counter() - started)
    out["warm_seconds_per_image"] = float(np.median(times))
    print(f"one {d.steps}-step image, warm process: median {np.median(times):.3f} s (min {min(times):.3f} s) "
          f"with {threads} threads")

    with tempfile.TemporaryDirectory() as tmp:
        cli = [sys.executable, "-m", "aipaint", "generate", train_caps[0], "--seed", "1", "--no-progress", "-o", str(Path(tmp) / "x.png")]
        started = time.perf_counter()
        subprocess.run(cli, check=True, capture_output=True)
        out["cold_cli_seconds"] = time.perf_counter() - started
    print(f"`aipaint generate` from a cold start: {out['cold_cli_seconds']:.2f} s")


if __name__ == "__main__":
    raise SystemExit(main())
