"""The GAN baseline next to the embedded diffusion model, on the same evaluator and the same CPU.

Trains two conditioned GANs (``aipaint_plugins.gan``) for the same few minutes on the same
single-object shapes-world pictures — one with weight clipping (WGAN), one with the gradient
penalty (WGAN-GP) — then reads back, with ``aipaint_plugins.shapes_world.evaluate``, pictures
from both GANs, from the embedded diffusion model (``shapes-tiny``, its card's defaults) and from
the renderer itself (the reference):

* validity: the evaluator finds exactly one object, and its best shape template fits with
  IoU ≥ ``VALID_IOU`` (rendered pictures score 0.94-0.97);
* diversity: distinct (shape, colour, size, position, background) combinations, and distinct
  colour×shape pairs, among the valid pictures of ``n`` empty-prompt samples;
* honoured requests: for ``n`` canonical single-object captions, how often the picture has the
  requested colour *and* shape, the mean adherence (fraction of requested attributes) and how
  often every attribute is right; "chance" scores the same pictures against the next caption;
* time: training wall-clock (the diffusion model's from its ``training.json``) and sampling;
* the two losses' curves side by side (the critic's Wasserstein estimate and the generator's
  loss, every few steps), printed and plotted — what they show is read off the numbers.

    python benchmarks/gan_vs_diffusion.py --minutes 5 --n 48 --images docs/images \\
        --out benchmarks/results/gan_vs_diffusion.txt

``--images`` writes ``gan_samples.png``, ``gan_unconditional.png`` and ``gan_losses.png`` (the
pictures of docs/gan.md). Sizes of everything are in the output's header; the GAN numbers move
from run to run with the CPU's load (a fixed wall-clock budget buys more or fewer steps).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
VALID_IOU = 0.8
SAMPLE_PROMPTS = (
    "a big red circle in the center, on a white background",
    "a small blue square on the left, on a black background",
    "a big green triangle at the top, on a gray background",
    "a big magenta cross on the right, on a white background",
    "a small yellow circle at the bottom, on a black background",
    "a big cyan square in the center, on a gray background",
)


def dataset(n: int, seed: int) -> tuple[list, list[str]]:
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, "train", n_objects=1) for _ in range(n)]
    return [render(s) for s in scenes], [s.caption for s in scenes]


class Sampler:
    """One model behind one call: ``sample(prompts, seeds) -> pictures``."""

    def __init__(self, name: str, pipe=None, pictures_for=None) -> None:
        self.name, self.pipe, self.pictures_for = name, pipe, pictures_for
        self.seconds, self.count = 0.0, 0

    def sample(self, prompts: list[str], seeds: list[int]) -> list:
        """Pictures for ``prompts`` with ``seeds``; one batch when every prompt is the same and the seeds run on."""
        started = time.perf_counter()
        if self.pictures_for is not None:
            out = self.pictures_for(prompts, seeds)
        elif len(set(prompts)) == 1 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
            out = self.pipe.txt2img(prompts[0], seed=seeds[0], batch_size=len(seeds)).images
        else:
            out = [self.pipe.txt2img(p, seed=s).image for p, s in zip(prompts, seeds, strict=True)]
        self.seconds += time.perf_counter() - started
        self.count += len(prompts)
        return out


def rendered_reference(prompts: list[str], seeds: list[int]) -> list:
    """The renderer's own picture of each caption (the object at its position's anchor, the smaller extent of
    its size), and a random scene for an empty prompt."""
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import (
        POSITIONS,
        SIZES,
        Scene,
        SceneObject,
        parse_caption,
        random_scene,
    )

    pictures = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        if not prompt:
            pictures.append(render(random_scene(np.random.default_rng(10_000 + seed), "train", n_objects=1)))
            continue
        parsed = parse_caption(prompt)
        shape, colour, size, position = parsed.objects[0]
        cx, cy = POSITIONS[position]
        obj = SceneObject(shape, colour, size, position, cx, cy, float(SIZES[size][0]))
        pictures.append(render(Scene(parsed.background, (obj,))))
    return pictures


def train_one(data: tuple, folder: Path, loss: str, lr: float, args: argparse.Namespace):
    torch.set_num_threads(args.threads)
    from aipaint_plugins.gan.train import train_gan

    return train_gan(data, folder, loss=loss, minutes=args.minutes, steps=args.steps, learning_rate=lr,
                     channels=args.channels, batch_size=args.batch_size, overwrite=True, seed=0)


def is_valid(reading) -> bool:
    return len(reading.objects) == 1 and reading.objects[0].shape_iou >= VALID_IOU


def evaluate(sampler: Sampler, captions: list[str], n_free: int) -> dict:
    from aipaint_plugins.shapes_world.evaluate import adherence, read_scene

    seeds = list(range(len(captions)))
    pictures = sampler.sample(captions, seeds)
    honoured, chance, scores, exact, valid = [], [], [], [], []
    for i, (picture, caption) in enumerate(zip(pictures, captions, strict=True)):
        reading = read_scene(picture)
        valid.append(is_valid(reading))
        score = adherence(picture, caption, reading)
        scores.append(score.score)
        exact.append(score.all_correct)
        obj = score.details["objects"][0]
        honoured.append(bool(obj.get("colour")) and bool(obj.get("shape")))
        other = adherence(picture, captions[(i + 1) % len(captions)], reading).details["objects"][0]
        chance.append(bool(other.get("colour")) and bool(other.get("shape")))
    free = sampler.sample([""] * n_free, list(range(1000, 1000 + n_free)))
    readings = [read_scene(p) for p in free]
    ok = [r for r in readings if is_valid(r)]
    combos = {(r.objects[0].attrs(), r.background) for r in ok}
    pairs = {(r.objects[0].colour, r.objects[0].shape) for r in ok}
    return {
        "valid_conditioned": float(np.mean(valid)), "honoured": float(np.mean(honoured)),
        "chance": float(np.mean(chance)), "adherence": float(np.mean(scores)), "all_correct": float(np.mean(exact)),
        "valid_free": len(ok) / n_free, "combos": len(combos), "pairs": len(pairs),
        "s_per_image": sampler.seconds / max(sampler.count, 1), "pictures": pictures, "free": free,
    }


def curve_table(curves: dict[str, dict], points: int = 12) -> list[str]:
    lines = []
    for name, c in curves.items():
        steps = c["step"]
        if not steps:
            lines.append(f"  {name}: no records")
            continue
        idx = sorted({int(round(i)) for i in np.linspace(0, len(steps) - 1, min(points, len(steps)))})
        lines.append(f"  {name}: step / s / critic's W estimate / generator loss / gradient penalty")
        for i in idx:
            lines.append(f"    {int(steps[i]):6d} {c['seconds'][i]:7.0f} {c['wasserstein'][i]:10.4f} "
                         f"{c['generator_loss'][i]:10.4f} {c['gradient_penalty'][i]:10.4f}")
        g = np.asarray(c["generator_loss"])
        w = np.asarray(c["wasserstein"])
        half = len(w) // 2
        lines.append(f"    second half: W estimate mean {w[half:].mean():.4f} (min {w[half:].min():.4f}, max "
                     f"{w[half:].max():.4f}); generator loss mean |change| between records "
                     f"{np.abs(np.diff(g[half:])).mean() if len(g[half:]) > 1 else float('nan'):.4f}")
    return lines


def save_images(folder: Path, results: dict[str, dict], samplers: dict[str, Sampler], curves: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = [n for n in samplers if n != "rendered"]
    # 1. the same requests, four seeds each, per model
    fig, axes = plt.subplots(len(SAMPLE_PROMPTS), len(names), figsize=(2.2 * len(names) * 1.6, 1.25 * len(SAMPLE_PROMPTS)))
    for col, name in enumerate(names):
        for row, prompt in enumerate(SAMPLE_PROMPTS):
            pics = samplers[name].sample([prompt] * 4, [row * 10 + k for k in range(4)])
            strip = np.concatenate([np.asarray(p.resize((64, 64), 0)) for p in pics], axis=1)
            ax = axes[row, col]
            ax.imshow(strip)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(prompt.replace(", on a ", "\non a "), fontsize=6,
                              rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(folder / "gan_samples.png", dpi=80)
    plt.close(fig)
    # 2. empty prompts: what each model draws when asked for nothing in particular
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(2.6 * (len(names) + 1), 3.3))
    for ax, name in zip(axes, [*names, "rendered"], strict=True):
        pics = results[name]["free"][:16]
        rows = max(1, len(pics) // 4)
        grid = np.concatenate([np.concatenate([np.asarray(p) for p in pics[r * 4:(r + 1) * 4]], axis=1)
                               for r in range(rows)], axis=0)
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(f"{name}\n{results[name]['combos']} combos in {len(results[name]['free'])}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "gan_unconditional.png", dpi=80)
    plt.close(fig)
    # 3. the loss curves of the two ways of keeping the critic Lipschitz
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, c in curves.items():
        axes[0].plot(c["step"], c["wasserstein"], label=name)
        axes[1].plot(c["step"], c["generator_loss"], label=name)
    axes[0].set_title("critic's Wasserstein estimate E[D(real)] - E[D(fake)]", fontsize=9)
    axes[1].set_title("generator loss -E[D(G(z, c))]", fontsize=9)
    for ax in axes:
        ax.set_xlabel("generator step")
        ax.set_yscale("symlog", linthresh=0.01)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "gan_losses.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget of each GAN (wall clock)")
    ap.add_argument("--steps", type=int, help="also stop each GAN after this many generator steps")
    ap.add_argument("--n", type=int, default=32, help="captions, and empty-prompt samples, per model")
    ap.add_argument("--data", type=int, default=2000, help="training pictures")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--gp-lr", type=float, default=1e-4, help="WGAN-GP's Adam learning rate (the paper's)")
    ap.add_argument("--clip-lr", type=float, default=5e-5, help="WGAN's RMSprop learning rate (the paper's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="/tmp/aipaint-gan-bench", help="where the trained GAN folders go")
    ap.add_argument("--reuse", action="store_true", help="evaluate the GAN folders already in --models, no training")
    ap.add_argument("--images", help="write the docs pictures (gan_*.png) here")
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import aipaint

    out = io.StringIO()

    def say(line: str = "") -> None:
        print(line)
        out.write(line + "\n")

    say(f"# python benchmarks/gan_vs_diffusion.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    say(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} thread(s), CPU shared with other jobs (load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the start)")
    images, captions = dataset(args.data, seed=0)
    models = Path(args.models)
    trained: dict[str, dict] = {}
    runs = (("GAN (WGAN-GP)", "wgan-gp", args.gp_lr), ("GAN (WGAN, clipping)", "wgan", args.clip_lr))
    if args.reuse:
        for name, loss, _ in runs:
            record = json.loads((models / loss / "training.json").read_text())
            trained[name] = {"folder": models / loss, "steps": record["steps"], "seconds": record["seconds"],
                             "cpu_seconds": record.get("cpu_seconds", float("nan")), "curves": record["curves"],
                             "lr": record["learning_rate"]}
    else:  # the two GANs train at once, one process and one thread each, for the same wall-clock budget
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(runs), mp_context=context) as pool:
            jobs = [pool.submit(train_one, (images, captions), models / loss, loss, lr, args) for _, loss, lr in runs]
            for (name, _, lr), job in zip(runs, jobs, strict=True):
                report = job.result()
                trained[name] = {"folder": report.output, "steps": report.steps, "seconds": report.seconds,
                                 "cpu_seconds": report.cpu_seconds, "curves": report.curves, "lr": lr}
                print(f"trained {name}: {report.steps} steps in {report.seconds:.0f} s", file=sys.stderr)
    samplers = {name: Sampler(name, aipaint.load(t["folder"])) for name, t in trained.items()}
    diffusion = aipaint.load("shapes-tiny")
    samplers["diffusion (shapes-tiny)"] = Sampler("diffusion (shapes-tiny)", diffusion)
    samplers["rendered"] = Sampler("rendered", pictures_for=rendered_reference)

    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(1000)
    requests = [random_scene(rng, "train", n_objects=1).caption for _ in range(args.n)]
    results = {name: evaluate(s, requests, args.n) for name, s in samplers.items()}
    record = json.loads((ROOT / "zoo" / "models" / "shapes-tiny" / "training.json").read_text())
    diffusion_minutes = record["timings_s"]["total"] / 60

    say()
    budget = ("as their training.json records" if args.reuse else f"at most {args.minutes:g} min wall clock"
              + (f" and {args.steps} steps" if args.steps else "") + " (both at once)")
    say(f"data: {args.data} single-object shapes-world renders (train split, seed 0) with their captions; each GAN "
        f"trained {budget}, channels {args.channels}, batch {args.batch_size}, 5 critic steps "
        f"per generator step, conditioned on the caption's words (dropout 0.5)")
    say(f"requests: n = {args.n} canonical single-object captions (seed 1000), seed i for caption i; "
        f"n = {args.n} empty-prompt samples (seeds 1000+) for diversity; valid = one object, shape IoU >= {VALID_IOU}")
    say()
    header = (f"{'model':24} {'train':>14} {'s/img':>6} {'valid':>6} {'honoured':>9} {'chance':>7} "
              f"{'adherence':>9} {'all-right':>9} {'valid(free)':>11} {'combos':>6} {'pairs':>5}")
    say(header)
    for name, r in results.items():
        if name in trained:
            t = trained[name]
            train = f"{t['cpu_seconds'] / 60:.1f} min/{t['steps']}st"
        elif name.startswith("diffusion"):
            train = f"{diffusion_minutes:.0f} min (+ft)"
        else:
            train = "-"
        say(f"{name:24} {train:>14} {r['s_per_image']:6.3f} {r['valid_conditioned']:6.2f} {r['honoured']:9.2f} "
            f"{r['chance']:7.2f} {r['adherence']:9.2f} {r['all_correct']:9.2f} {r['valid_free']:11.2f} "
            f"{r['combos']:6d} {r['pairs']:5d}")
    say()
    say("columns: train = training time: the GANs' CPU time in this run (process time, one thread each; the wall "
        "clock is longer on a shared CPU) and generator steps; the diffusion model's base training from its "
        "training.json (wall clock, 2 CPUs, before its fine-tunes); s/img = sampling seconds per picture here; valid = valid "
        "pictures among the conditioned requests; honoured = colour and shape as requested; chance = the same "
        "pictures against the next request's colour and shape; adherence = mean fraction of requested attributes "
        "(shape, colour, size, position, background); all-right = every attribute right and nothing extra; "
        "valid(free), combos, pairs = valid share, distinct attribute combinations and colour x shape pairs among "
        f"{args.n} empty-prompt samples (the world has 4 shapes x 6 colours = 24 pairs, minus 4 held out = 20).")
    say(f"binomial standard error at n = {args.n}: up to {0.5 / np.sqrt(args.n):.2f} on each rate.")
    say()
    lrs = {name: t["lr"] for name, t in trained.items()}
    say(f"loss curves (every few generator steps; learning rates {lrs}: Adam (0.0, 0.9) for WGAN-GP with penalty "
        "weight 10, RMSprop for WGAN with clip 0.01, as the papers):")
    for line in curve_table({name: t["curves"] for name, t in trained.items()}):
        say(line)
    if args.images:
        say()
        say(f"pictures: {args.images}/gan_samples.png, gan_unconditional.png, gan_losses.png")
    if args.out:
        Path(args.out).write_text(out.getvalue())
    if args.images:
        save_images(Path(args.images), results, samplers, {name: t["curves"] for name, t in trained.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
