"""Does DreamBooth teach the embedded model a new subject, and does prior preservation keep the class? (issue 21)

The subject: an **orange circle**. The embedded model ``shapes-tiny`` never saw "orange"
in a caption (``aipaint_plugins.shapes_world.scene.HELDOUT_COLOUR``), so it cannot draw the
subject from words. The script renders ``--images`` (at most 10) orange circles at
random sizes, places and backgrounds, captions them with the identifier in place of the
colour ("a big sks circle on the left, on a white background"), and trains with
``aipaint_plugins.dreambooth.train.train_dreambooth`` on this CPU, three ways:

* full fine-tuning (UNet + text encoder) with prior preservation: class images drawn by
  the base model for class prompts ("a big red circle on the left, …", train colours only);
* the same without prior preservation (for comparison: language drift);
* DreamBooth-LoRA (``lora=True``) with prior preservation, loaded back through the LoRA
  adapter from the file it wrote (``<lora:subject:1>``).

Measured with ``aipaint_plugins.shapes_world.evaluate`` on images generated with the model
defaults:

* **subject shown** — identifier prompts ("a small sks circle at the top, on a gray
  background", positions, sizes and backgrounds the evaluation draws) whose image shows a
  circle that reads orange (nearest palette colour);
* **class adherence** — mean evaluator adherence (shape, colour, size, position,
  background) on class prompts with the train colours ("a big blue circle …"), on prompts
  and seeds disjoint from the class images'. Target: within 5 points of the base model;

    python benchmarks/dreambooth.py --save        # the full run (a few minutes per variant here)
    python benchmarks/dreambooth.py --steps 50    # a quick look
    python benchmarks/dreambooth.py --picture docs/images/dreambooth.png --prior-model OUT/dreambooth-prior \\
        --no-prior-model OUT/dreambooth-no-prior --embeddings OUT/embeddings   # the docs picture, from kept models
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "zoo" / "models" / "shapes-tiny"
IDENTIFIER = "sks"
SUBJECT_COLOUR = "orange"
SUBJECT_SHAPE = "circle"


def scenes(n: int, seed: int, *, colour: str | None, shape: str) -> list:
    """``n`` one-object scenes of ``shape`` (``colour``, else a random train colour)."""
    from aipaint_plugins.shapes_world.scene import TRAIN_COLOURS, random_scene

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng, "train", n_objects=1)
        obj = dataclasses.replace(scene.objects[0], shape=shape,
                                  colour=colour or TRAIN_COLOURS[int(rng.integers(len(TRAIN_COLOURS)))])
        out.append(dataclasses.replace(scene, objects=(obj,)))
    return out


def write_instances(folder: Path, n: int, seed: int) -> list[str]:
    """The subject's pictures with identifier captions; returns the captions."""
    from aipaint_plugins.shapes_world.render import render

    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for i, scene in enumerate(scenes(n, seed, colour=SUBJECT_COLOUR, shape=SUBJECT_SHAPE)):
        caption = scene.caption.replace(SUBJECT_COLOUR, IDENTIFIER)
        render(scene).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption)
        captions.append(caption)
    return captions


def subject_rate(pipe, prompts: list[str], seeds: int, seed: int, **kwargs) -> tuple[float, float]:
    """Fraction of identifier-prompt images that show a circle reading orange, and their mean
    adherence to the prompt with "orange" for the identifier (size, place and background too)."""
    from aipaint_plugins.shapes_world.evaluate import adherence

    hits, scores = [], []
    for i, prompt in enumerate(prompts):
        images = pipe.txt2img(prompt, seed=seed + i * seeds, batch_size=seeds, **kwargs).images
        truth = prompt.replace(IDENTIFIER, SUBJECT_COLOUR).split(" <lora:")[0]
        for image in images:
            score = adherence(image, truth)
            objects = score.details["objects"]
            hits.append(bool(objects and objects[0].get("colour") and objects[0].get("shape")))
            scores.append(score.score)
    return float(np.mean(hits)), float(np.mean(scores))


def class_adherence(pipe, prompts: list[str], seeds: int, seed: int, suffix: str = "", **kwargs) -> float:
    """Mean evaluator adherence of ``prompts`` (each drawn with ``seeds`` seeds)."""
    from aipaint_plugins.shapes_world.evaluate import adherence

    scores = []
    for i, prompt in enumerate(prompts):
        images = pipe.txt2img(prompt + suffix, seed=seed + i * seeds, batch_size=seeds, **kwargs).images
        scores.extend(adherence(image, prompt).score for image in images)
    return float(np.mean(scores))


def picture(path: Path, columns: dict[str, tuple[object, dict]], prompts: list[str], seed: int = 11) -> None:
    """A grid for docs/training.md: one row per prompt, one column per model (label → (pipeline, txt2img
    options)); the same seed everywhere, images scaled 3x without smoothing."""
    from PIL import Image, ImageDraw

    scale, tile, label_w, head = 3, 96, 330, 18
    grid = Image.new("RGB", (label_w + tile * len(columns), head + tile * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        draw.text((label_w + c * tile + 3, 3), name, fill="black")
    for r, prompt in enumerate(prompts):
        draw.text((3, head + r * tile + tile // 2 - 6), prompt, fill="black")
        for c, (pipe, options) in enumerate(columns.values()):
            image = pipe.txt2img(prompt, seed=seed + r, options=options).image
            grid.paste(image.resize((32 * scale, 32 * scale), Image.NEAREST), (label_w + c * tile, head + r * tile))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)


def main_picture(args: argparse.Namespace) -> int:
    """``--picture``: draw the grid from models a previous run kept (``--out``)."""
    import aipaint

    pipe = aipaint.load()
    columns: dict[str, tuple[object, dict]] = {"base": (pipe, {})}
    for label, folder in (("DB + prior", args.prior_model), ("DB, no prior", args.no_prior_model)):
        if folder:
            tuned = aipaint.load(folder)
            tuned.model.defaults, tuned.model.card = pipe.model.defaults, dict(pipe.model.card or {})
            columns[label] = (tuned, {})
    if args.embeddings:
        columns["embedding"] = (pipe, {"embeddings": {"folder": args.embeddings}})
    prompts = [s.caption.replace(SUBJECT_COLOUR, IDENTIFIER) for s in scenes(3, 21, colour=SUBJECT_COLOUR, shape=SUBJECT_SHAPE)]
    prompts += [s.caption for s in scenes(2, 22, colour=None, shape=SUBJECT_SHAPE)]
    picture(Path(args.picture), columns, prompts)
    print(f"saved {args.picture}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="subject images (the issue allows at most 10)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4, help="full fine-tuning learning rate")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="DreamBooth-LoRA learning rate")
    parser.add_argument("--lora-rank", type=int, default=4, help="DreamBooth-LoRA rank")
    parser.add_argument("--lora-targets", default="attention", choices=("attention", "kohya"),
                        help="DreamBooth-LoRA layers (aipaint.plugin.kit.training.LORA_TARGETS)")
    parser.add_argument("--lora-te-lr", type=float, help="DreamBooth-LoRA text-encoder learning rate (default: --lora-lr)")
    parser.add_argument("--lora-unet-only", action="store_true",
                        help="DreamBooth-LoRA on the UNet only (the text encoder frozen, as diffusers' script by default)")
    parser.add_argument("--lr-scheduler", default="constant", help="learning-rate schedule of every variant")
    parser.add_argument("--lr-warmup-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4, help="instance images per step (and as many class images)")
    parser.add_argument("--class-images", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, default=12, help="prompts per measure")
    parser.add_argument("--eval-seeds", type=int, default=4, help="images per prompt")
    parser.add_argument("--variants", default="prior,no-prior,lora", help="comma list of prior, no-prior, lora")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="keep the outputs here (default: a temporary folder)")
    parser.add_argument("--save", action="store_true", help="write the table to benchmarks/results/dreambooth.txt")
    parser.add_argument("--picture", help="only draw the docs picture (a PNG path) from kept models:")
    parser.add_argument("--prior-model", help="with --picture: a DreamBooth folder trained with prior preservation")
    parser.add_argument("--no-prior-model", help="with --picture: one trained without")
    parser.add_argument("--embeddings", help="with --picture: the folder of the trained sks.safetensors embedding")
    args = parser.parse_args(argv)
    if args.picture:
        torch.set_num_threads(args.threads)
        return main_picture(args)
    if args.images > 10:
        parser.error("--images: the issue's target is a subject learned from at most 10 images")
    if not (EMBEDDED / "unet").is_dir():
        print(f"skipped: the embedded model is not built ({EMBEDDED})")
        return 0
    torch.set_num_threads(args.threads)
    from aipaint_plugins.dreambooth.train import train_dreambooth

    import aipaint
    from aipaint.plugin.kit.training import lora_targets

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    pipe = aipaint.load()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dreambooth-"))
    write_instances(work / "instances", args.images, seed=args.seed + 1)
    class_prompts = sorted({s.caption for s in scenes(args.class_images, args.seed + 2, colour=None, shape=SUBJECT_SHAPE)})
    identifier_prompts = [s.caption.replace(SUBJECT_COLOUR, IDENTIFIER)
                          for s in scenes(args.eval_prompts, args.seed + 3, colour=SUBJECT_COLOUR, shape=SUBJECT_SHAPE)]
    eval_class = [s.caption for s in scenes(args.eval_prompts, args.seed + 4, colour=None, shape=SUBJECT_SHAPE)]
    eval_class = [c for c in eval_class if c not in class_prompts] or eval_class
    n, k = args.eval_seeds, args.eval_prompts
    seed_subject, seed_class = 5000, 7000

    rows: dict[str, dict[str, float]] = {}
    rows["base model"] = {
        **dict(zip(("subject", "adherence"), subject_rate(pipe, identifier_prompts, n, seed_subject))),
        "class": class_adherence(pipe, eval_class, n, seed_class),
        "seconds": 0.0,
    }
    orange_prompts = [p.replace(IDENTIFIER, SUBJECT_COLOUR) for p in identifier_prompts]
    base_orange = subject_rate(pipe, orange_prompts, n, seed_subject)[0]

    common = dict(identifier=IDENTIFIER, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                  train_text_encoder=True, num_class_images=args.class_images, lr_scheduler=args.lr_scheduler,
                  lr_warmup_steps=args.lr_warmup_steps)
    class_dir = work / "class_images"  # drawn once by the base model, shared by the variants
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        started = time.perf_counter()
        if variant == "lora":
            report = train_dreambooth(pipe, work / "instances", work / "loras" / "subject", lora=True,
                                      learning_rate=args.lora_lr, rank=args.lora_rank, class_prompts=class_prompts,
                                      text_encoder_learning_rate=args.lora_te_lr,
                                      unet_targets=lora_targets(args.lora_targets)[0],
                                      text_encoder_targets=lora_targets(args.lora_targets)[1],
                                      class_dir=class_dir, show_progress=sys.stderr.isatty(),
                                      **{**common, "train_text_encoder": not args.lora_unet_only})
            lora_dir = work / "loras" / "subject"
            options = {"lora": {"folder": str(lora_dir)}}
            tag = " <lora:subject:1>"
            rows["DreamBooth-LoRA, prior"] = {
                **dict(zip(("subject", "adherence"), subject_rate(pipe, [p + tag for p in identifier_prompts], n,
                                                                  seed_subject, options=options))),
                "class": class_adherence(pipe, eval_class, n, seed_class, tag, options=options),
                "seconds": time.perf_counter() - started,
                "loss": (report.first_loss, report.final_loss),
            }
            continue
        prior = variant == "prior"
        out = work / f"dreambooth-{variant}"
        report = train_dreambooth(pipe, work / "instances", out, learning_rate=args.lr,
                                  class_prompts=class_prompts if prior else (), class_dir=class_dir,
                                  single_file=False, show_progress=sys.stderr.isatty(), **common)
        tuned = aipaint.load(str(out))
        tuned.model.defaults = pipe.model.defaults  # the embedded card's 32x32, CFG and rescale
        tuned.model.card = dict(pipe.model.card or {})
        rows[f"DreamBooth, {'prior' if prior else 'no prior'}"] = {
            **dict(zip(("subject", "adherence"), subject_rate(tuned, identifier_prompts, n, seed_subject))),
            "class": class_adherence(tuned, eval_class, n, seed_class),
            "seconds": time.perf_counter() - started,
            "loss": (report.first_loss, report.final_loss),
        }

    say(f"DreamBooth on the embedded model — subject: an orange circle (the held-out colour), identifier "
        f"'{IDENTIFIER}'; torch {torch.__version__}, {args.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    say(f"training: {args.images} subject images, {args.steps} steps x batch {args.batch_size} (+{args.batch_size} class "
        f"images with prior), UNet + text encoder, lr {args.lr:g} (LoRA: rank {args.lora_rank}, lr {args.lora_lr:g}, {args.lora_targets} layers"
        f"{', UNet only' if args.lora_unet_only else ''}"
        f"{f', text encoder {args.lora_te_lr:g}' if args.lora_te_lr and not args.lora_unet_only else ''}); schedule {args.lr_scheduler}"
        f"{f' after {args.lr_warmup_steps} warm-up steps' if args.lr_warmup_steps else ''}; prior: "
        f"{args.class_images} class images drawn by the base model for {len(class_prompts)} class prompts")
    say(f"evaluation (model defaults): subject = {k} identifier prompts x {n} seeds (adherence: of those images to "
        f"the prompt with 'orange'); class = {len(eval_class)} coloured-circle prompts x {n} (not among the class "
        f"images' prompts)")
    say(f"reference: the base model asked for 'orange' by name shows it in {base_orange:.0%} (it never learned the word)")
    say()
    say(f"{'':<26}{'subject shown':>15}{'adherence':>11}{'class adherence':>17}{'train s':>9}  loss")
    for name, row in rows.items():
        loss = f"{row['loss'][0]:.4f} -> {row['loss'][1]:.4f}" if "loss" in row else ""
        say(f"{name:<26}{row['subject']:>15.0%}{row['adherence']:>11.1%}{row['class']:>17.1%}{row['seconds']:>9.0f}  {loss}")
    say()
    base = rows["base model"]["class"]
    for name, row in rows.items():
        if name == "base model":
            continue
        delta = (row["class"] - base) * 100
        if "no prior" in name:
            say(f"  [info] {name}: subject {row['subject']:.0%}, class adherence {delta:+.1f} points vs base "
                "(no prior preservation: for comparison)")
            continue
        say(f"  [{'pass' if row['subject'] >= 0.8 else 'FAIL'}] {name}: identifier prompts show the subject in "
            f"{row['subject']:.0%} (target >= 80%)")
        say(f"  [{'pass' if abs(delta) <= 5 else 'FAIL'}] {name}: class adherence {delta:+.1f} points vs the base "
            "model (target within 5)")
    say(f"  noise: each rate is over {k * n} images; one image moves a rate by {100 / (k * n):.1f} points")
    if args.save:
        out = ROOT / "benchmarks" / "results" / "dreambooth.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
