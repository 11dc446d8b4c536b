"""Does a LoRA teach the embedded model its held-out colour? (issue #5, LoRA behaviour)

The embedded model ``shapes-tiny`` never saw the word "orange" in a caption. This script
renders orange shapes with their canonical captions, trains a LoRA on them with
``aipaint_plugins.lora.train_lora`` on this CPU (timed; the budget is 10 minutes), then
generates orange prompts at LoRA weights 0, 0.5 and 1 and reads the images back with
``aipaint_plugins.shapes_world.evaluate``. **Orange adherence** = the fraction of images whose requested
orange object is found and reads as orange (the nearest palette colour).

Reference row: the VAE ceiling. Neither the UNet nor the text encoder can show a colour
the VAE cannot decode, so the script also reports how many of the *training* images
still read orange after a VAE round trip (encode → decode). A LoRA cannot beat that.

    python benchmarks/lora_concept.py                # the full run (≈ 10 min here)
    python benchmarks/lora_concept.py --steps 60     # a quick look

Prints a table; ``--save`` writes it to benchmarks/results/lora_concept.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "zoo" / "models" / "shapes-tiny"
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = ("white", "gray", "black")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the center")


def render_dataset(folder: Path, n: int, seed: int) -> list[str]:
    """``n`` one-object scenes, recoloured orange, with canonical captions; returns the captions."""
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(n):
        scene = random_scene(rng, "heldout_colour", n_objects=1)
        scene = dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], colour="orange"),))
        render(scene).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(scene.caption)
        captions.append(scene.caption)
    return captions


def eval_prompts() -> list[tuple[str, str]]:
    """(prompt, background): every shape on every background, sizes and places rotating."""
    prompts = []
    for i, (shape, background) in enumerate((s, b) for s in SHAPES for b in BACKGROUNDS):
        size = "big" if i % 2 == 0 else "small"
        prompts.append((f"a {size} orange {shape} {PLACES[i % len(PLACES)]}, on a {background} background", background))
    return prompts


def is_orange(image, prompt: str) -> bool:
    from aipaint_plugins.shapes_world.evaluate import adherence

    objects = adherence(image, prompt).details["objects"]
    return bool(objects and objects[0]["colour"])


def vae_ceiling(pipe, folder: Path, captions: list[str]) -> dict[str, float]:
    """Fraction of training images that still read orange after encode → decode, per background."""
    from PIL import Image

    from aipaint.plugin.kit.training import square_image_tensor

    paths = sorted(folder.glob("*.png"))
    with torch.no_grad():
        decoded = pipe.model.decode(pipe.model.encode(square_image_tensor(paths, 32)))
    hits: dict[str, list[bool]] = defaultdict(list)
    for image, caption in zip(decoded, captions):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        background = caption.rsplit("on a ", 1)[1].split()[0]
        hits[background].append(is_orange(Image.fromarray(array), caption))
    return summarise(hits)


def summarise(hits: dict[str, list[bool]]) -> dict[str, float]:
    out = {b: float(np.mean(v)) for b, v in hits.items()}
    out["all"] = float(np.mean([x for v in hits.values() for x in v]))
    return out


def adherence_at(pipe, weight: float, lora_dir: Path, images_per_prompt: int, steps: int | None) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    tag = f" <lora:orange:{weight:g}>" if weight else ""
    for i, (prompt, background) in enumerate(eval_prompts()):
        result = pipe.txt2img(prompt + tag, seed=1000 + i * images_per_prompt, batch_size=images_per_prompt,
                              steps=steps, options={"lora": {"folder": str(lora_dir)}})
        hits[background].extend(is_orange(image, prompt) for image in result.images)
    return summarise(hits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="training images")
    parser.add_argument("--steps", type=int, help="training steps (default: what `aipaint train lora` uses for the model)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, help="learning rate (default: as --steps)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: as --steps)")
    parser.add_argument("--unet-only", action="store_true", default=None,
                        help="do not train the text encoder's LoRA layers (default: as --steps)")
    parser.add_argument("--eval-images", type=int, default=4, help="images per evaluation prompt (12 prompts)")
    parser.add_argument("--eval-steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="keep the LoRA here (default: a temporary folder)")
    parser.add_argument("--model", help="another trained copy of the embedded model, under the embedded card "
                                        "(as benchmarks/embedded_model.py --model)")
    parser.add_argument("--save", action="store_true", help="write the table to benchmarks/results/lora_concept.txt")
    args = parser.parse_args(argv)

    if not (EMBEDDED / "unet").is_dir():
        print(f"skipped: the embedded model is not built ({EMBEDDED})")
        return 0
    torch.set_num_threads(args.threads)
    from aipaint_plugins.lora.train import train_lora

    import aipaint

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    if args.model:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from embedded_model import embedded_pipe

        pipe = embedded_pipe(args.model)
    else:
        pipe = aipaint.load()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lora-concept-"))
    data = work / "data"
    captions = render_dataset(data, args.images, seed=args.seed + 1)
    ceiling = vae_ceiling(pipe, data, captions)

    # What is not given here is what `aipaint train lora` would use: its defaults, or the model card's recipe.
    from aipaint_plugins.lora.commands import training_settings

    given = argparse.Namespace(steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size,
                               train_text_encoder=None if args.unet_only is None else not args.unet_only)
    settings, from_card = training_settings(given, getattr(pipe.model, "card", None))
    args.steps, args.lr, args.batch_size = settings["steps"], settings["learning_rate"], settings["batch_size"]
    args.unet_only = not settings["train_text_encoder"]
    started = time.perf_counter()
    report = train_lora(pipe, data, work / "loras" / "orange.safetensors", rank=args.rank, seed=args.seed,
                        show_progress=sys.stderr.isatty(), **settings)
    train_seconds = time.perf_counter() - started

    rows = {w: adherence_at(pipe, w, work / "loras", args.eval_images, args.eval_steps) for w in (0.0, 0.5, 1.0)}
    n_eval = len(eval_prompts()) * args.eval_images
    say(f"LoRA on the held-out colour 'orange' — {args.model or 'shapes-tiny'}, torch {torch.__version__}, {args.threads} thread(s), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    say(f"training: {args.images} images, {args.steps} steps x batch {args.batch_size}, rank {args.rank}, lr {args.lr:g}, "
        f"text encoder {'no' if args.unet_only else 'yes'}"
        f"{' (' + ', '.join(from_card) + ' from the model card, as the CLI takes them)' if from_card else ''}: "
        f"{train_seconds:.0f} s "
        f"(loss {report.first_loss:.4f} -> {report.final_loss:.4f})")
    say(f"evaluation: {n_eval} images per weight ({len(eval_prompts())} prompts x {args.eval_images} seeds), "
        f"model defaults (sampler, steps, CFG)")
    say()
    columns = ("all", *BACKGROUNDS)
    say(f"{'':<28}" + "".join(f"{c:>8}" for c in columns))
    for weight, row in rows.items():
        say(f"{'orange adherence, w=' + format(weight, 'g'):<28}" + "".join(f"{row[c]:>8.0%}" for c in columns))
    say(f"{'VAE ceiling (round trip)':<28}" + "".join(f"{ceiling.get(c, float('nan')):>8.0%}" for c in columns))
    say()
    checks = [
        (f"training within 10 minutes ({train_seconds:.0f} s)", train_seconds <= 600),
        (f"weight 0 under 20% ({rows[0.0]['all']:.0%})", rows[0.0]["all"] < 0.2),
        (f"weight 1 at least 80% ({rows[1.0]['all']:.0%})", rows[1.0]["all"] >= 0.8),
        (f"weight 0.5 in between ({rows[0.5]['all']:.0%})", rows[0.0]["all"] <= rows[0.5]["all"] <= rows[1.0]["all"]),
        (f"weight 1 relative to the VAE ceiling ({rows[1.0]['all'] / max(ceiling['all'], 1e-9):.0%})", True),
    ]
    for text, ok in checks:
        say(f"  [{'pass' if ok else 'FAIL'}] {text}")
    if args.save:
        out = ROOT / "benchmarks" / "results" / "lora_concept.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
