"""Does textual inversion teach the embedded model a new subject? (issue 21, measured as benchmarks/dreambooth.py)

The subject: an **orange circle**, the colour the embedded model ``shapes-tiny`` never saw in a
caption (``aipaint_plugins.shapes_world.scene.HELDOUT_COLOUR``). The script renders
``--images`` (at most 10) orange circles at random sizes, places and backgrounds, captions
them with the embedding's name in place of the colour ("a big sks circle on the left, on a
white background"), trains ``sks.safetensors`` with
``aipaint_plugins.textual_inversion.train.train_embedding`` on this CPU (only the new token
vectors learn; the model is untouched), and generates through the textual-inversion adapter
from the embeddings folder, exactly as ``aipaint generate --embeddings-dir`` does.

Measured with ``aipaint_plugins.shapes_world.evaluate`` on images generated with the model
defaults:

* **subject shown** — identifier prompts whose image shows a circle that reads orange;
* **adherence** — the evaluator's mean adherence of those images to the same prompt with
  "orange" for the name (shape, colour, size, position, background);
* **class adherence** — coloured-circle prompts that do not say the name: an embedding cannot
  change them (the adapter only joins a generation whose prompt names it), so the script
  checks that the images are identical to the base model's rather than estimating a drift.

    python benchmarks/embedding_train.py --save
    python benchmarks/embedding_train.py --steps 50     # a quick look
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from dreambooth import (  # noqa: E402 - the same subject, prompts and measures as the DreamBooth benchmark
    EMBEDDED,
    IDENTIFIER,
    SUBJECT_COLOUR,
    SUBJECT_SHAPE,
    scenes,
    subject_rate,
    write_instances,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="subject images (the issue allows at most 10)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--vectors", type=int, default=2)
    parser.add_argument("--init-text", default="circle")
    parser.add_argument("--eval-prompts", type=int, default=12, help="identifier prompts")
    parser.add_argument("--eval-seeds", type=int, default=2, help="images per prompt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="keep the outputs here (default: a temporary folder)")
    parser.add_argument("--save", action="store_true", help="write the table to benchmarks/results/embedding_train.txt")
    args = parser.parse_args(argv)
    if args.images > 10:
        parser.error("--images: the issue's target is a subject learned from at most 10 images")
    if not (EMBEDDED / "unet").is_dir():
        print(f"skipped: the embedded model is not built ({EMBEDDED})")
        return 0
    torch.set_num_threads(args.threads)
    from aipaint_plugins.textual_inversion.train import train_embedding

    import aipaint

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    pipe = aipaint.load()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="embedding-train-"))
    write_instances(work / "instances", args.images, seed=args.seed + 1)
    identifier_prompts = [s.caption.replace(SUBJECT_COLOUR, IDENTIFIER)
                          for s in scenes(args.eval_prompts, args.seed + 3, colour=SUBJECT_COLOUR, shape=SUBJECT_SHAPE)]
    class_prompts = [s.caption for s in scenes(4, args.seed + 4, colour=None, shape=SUBJECT_SHAPE)]
    n, k = args.eval_seeds, args.eval_prompts
    base_subject, base_score = subject_rate(pipe, identifier_prompts, n, 5000)
    orange_subject, _ = subject_rate(pipe, [p.replace(IDENTIFIER, SUBJECT_COLOUR) for p in identifier_prompts], n, 5000)

    started = time.perf_counter()
    out = work / "embeddings" / f"{IDENTIFIER}.safetensors"
    report = train_embedding(pipe, work / "instances", out, steps=args.steps, learning_rate=args.lr,
                             batch_size=args.batch_size, vectors=args.vectors, init_text=args.init_text,
                             seed=args.seed, show_progress=sys.stderr.isatty())
    train_seconds = time.perf_counter() - started
    options = {"embeddings": {"folder": str(out.parent)}}
    tuned_subject, tuned_score = subject_rate(pipe, identifier_prompts, n, 5000, options=options)
    same = all(
        np.array_equal(np.asarray(pipe.txt2img(p, seed=7000 + i).image),
                       np.asarray(pipe.txt2img(p, seed=7000 + i, options=options).image))
        for i, p in enumerate(class_prompts)
    )

    say(f"Textual inversion on the embedded model — subject: an orange circle (the held-out colour), embedding "
        f"'{IDENTIFIER}'; torch {torch.__version__}, {args.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    say(f"training: {args.images} subject images, {args.steps} steps x batch {args.batch_size}, {args.vectors} vector(s) "
        f"from '{args.init_text}', lr {args.lr:g}: {train_seconds:.0f} s (loss {report.first_loss:.4f} -> "
        f"{report.final_loss:.4f})")
    say(f"evaluation (model defaults): {k} identifier prompts x {n} seeds = {k * n} images per row")
    say()
    say(f"{'':<34}{'subject shown':>15}{'adherence':>11}")
    say(f"{'base model, the word sks':<34}{base_subject:>15.0%}{base_score:>11.1%}")
    say(f"{'base model, the word orange':<34}{orange_subject:>15.0%}")
    say(f"{'with the trained embedding sks':<34}{tuned_subject:>15.0%}{tuned_score:>11.1%}")
    say()
    say(f"  [{'pass' if tuned_subject >= 0.8 else 'FAIL'}] identifier prompts show the subject in {tuned_subject:.0%} "
        "(target >= 80%)")
    say(f"  [{'pass' if same else 'FAIL'}] class prompts that do not name the embedding draw the same images with the "
        f"embeddings folder in use ({len(class_prompts)} prompts): class adherence is the base model's by construction")
    say(f"  noise: each rate is over {k * n} images; one image moves a rate by {100 / (k * n):.1f} points")
    if args.save:
        path = ROOT / "benchmarks" / "results" / "embedding_train.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
