"""DeepCache and token merging (ToMe): speed-up and prompt adherence, against the plain run in the same process.

1. The embedded model (shapes-tiny, 32 px, its default 20 DPM++ 2M steps with CFG): the
   same captions and seeds as the embedded-model benchmark (``random_scene(rng, "train")``
   with ``numpy.random.default_rng(seed)``, image i seeded ``seed + i``), generated plainly
   and with each speed feature, interleaved prompt by prompt so that load from other
   processes hits every variant alike. Reported: median seconds per image (whole
   txt2img and the denoise loop alone), speed-up, mean adherence in points (0–100) and
   the share of images with every attribute right. Aim: ≥ 1.8× with at most 3 points lost.
2. ``--full-size``: one UNet call of the full-size SD1.5 architecture (random weights) at
   512 px, batch 2 — what a cached DeepCache call and a merged ToMe call cost against a
   plain one. The embedded model's 8×8 latents have only 64 tokens, too few for token
   merging to pay; 512 px has 4096 at the first level.

    python benchmarks/speed_features.py                  # saves benchmarks/results/speed_features.txt
    python benchmarks/speed_features.py --prompts 16 --full-size
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import numpy as np
import torch
from _runtime_bench import Report, environment, median_time, random_sd15_unet

from aipaint.plugin.adapters import AdapterUnit

VARIANTS: dict[str, tuple[AdapterUnit, ...]] = {
    "plain (reference)": (),
    "DeepCache interval 3, branch 0": (AdapterUnit("deepcache", {"interval": 3, "branch": 0}),),
    "DeepCache interval 3, branch 1": (AdapterUnit("deepcache", {"interval": 3, "branch": 1}),),
    "DeepCache interval 4, branch 1 (default)": (AdapterUnit("deepcache", {}),),
    "DeepCache interval 5, branch 1": (AdapterUnit("deepcache", {"interval": 5, "branch": 1}),),
    "DeepCache interval 5, branch 2": (AdapterUnit("deepcache", {"interval": 5, "branch": 2}),),
    "ToMe ratio 0.5": (AdapterUnit("tome", {"ratio": 0.5}),),
    "DeepCache default + ToMe 0.5": (AdapterUnit("deepcache", {}), AdapterUnit("tome", {"ratio": 0.5})),
}


def embedded(report: Report, prompts: int, seed: int) -> None:
    from aipaint_plugins.shapes_world.evaluate import adherence
    from aipaint_plugins.shapes_world.scene import random_scene

    import aipaint

    pipe = aipaint.load()
    defaults = pipe.model.defaults
    report(f"## 1. Embedded model {pipe.model.name}: {prompts} captions, {defaults.width} px, {defaults.steps} steps "
           f"{defaults.sampler}, CFG {defaults.cfg_scale}")
    rng = np.random.default_rng(seed)
    captions = [random_scene(rng, "train").caption for _ in range(prompts)]
    totals: dict[str, list[float]] = {name: [] for name in VARIANTS}
    denoise: dict[str, list[float]] = {name: [] for name in VARIANTS}
    scores: dict[str, list[float]] = {name: [] for name in VARIANTS}
    correct: dict[str, list[bool]] = {name: [] for name in VARIANTS}
    for units in VARIANTS.values():  # warm-up: first calls allocate
        pipe.txt2img(captions[0], seed=seed, adapters=units)
    for i, caption in enumerate(captions):
        for name, units in VARIANTS.items():
            result = pipe.txt2img(caption, seed=seed + i, adapters=units)
            totals[name].append(result.timings["total"])
            denoise[name].append(result.timings["denoise"])
            score = adherence(result.images[0], caption)
            scores[name].append(100 * score.score)
            correct[name].append(score.all_correct)
    base_total = statistics.median(totals["plain (reference)"])
    base_denoise = statistics.median(denoise["plain (reference)"])
    base_score = float(np.mean(scores["plain (reference)"]))
    report("")
    report("| variant | s / image | speed-up | denoise s | denoise speed-up | adherence (points) | Δ points | all attributes right |")
    report("|---|---|---|---|---|---|---|---|")
    for name in VARIANTS:
        total, loop, score = statistics.median(totals[name]), statistics.median(denoise[name]), float(np.mean(scores[name]))
        report(f"| {name} | {total:.3f} | {base_total / total:.2f}× | {loop:.3f} | {base_denoise / loop:.2f}× | "
               f"{score:.1f} | {score - base_score:+.1f} | {100 * np.mean(correct[name]):.0f}% |")
    report("")


def full_size(report: Report, repeats: int) -> None:
    from aipaint_plugins.deepcache import DeepCacheSettings, DeepCacheUNet
    from aipaint_plugins.tome import TokenMerging, ToMeSettings

    report("## 2. Full-size SD1.5 UNet (random weights), one call at 512 px (64×64 latents), batch 2, fp32")
    unet = random_sd15_unet()
    g = torch.Generator().manual_seed(0)
    x, embeds, t = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g), torch.tensor(500.0)

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return unet(x, t, encoder_hidden_states=embeds).sample

    plain_out = call()
    plain = median_time(call, repeats, warmup=0)
    wrapper = DeepCacheUNet(unet, DeepCacheSettings(interval=1000, branch=0))
    call()  # the full call that fills the cache
    cached = median_time(call, repeats, warmup=0)
    wrapper.restore()
    merging = TokenMerging(unet, ToMeSettings(ratio=0.5), seed=0)
    merged_out = call()
    merged = median_time(call, repeats, warmup=0)
    merging.restore()
    change = float((merged_out - plain_out).abs().mean() / plain_out.abs().mean())
    report("")
    report("| call | s | vs plain |")
    report("|---|---|---|")
    report(f"| plain UNet (reference) | {plain:.2f} | 1.00× |")
    report(f"| DeepCache cached call (branch 0) | {cached:.2f} | {plain / cached:.2f}× |")
    report(f"| DeepCache, interval 3 on average (1 full + 2 cached) | {(plain + 2 * cached) / 3:.2f} | "
           f"{3 * plain / (plain + 2 * cached):.2f}× |")
    report(f"| ToMe ratio 0.5 (first level) | {merged:.2f} | {plain / merged:.2f}× (output changes by {100 * change:.1f}% of its mean magnitude) |")
    report("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--full-size", action="store_true", help="also time one full-size SD1.5 UNet call at 512 px")
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--save", default="speed_features.txt", help="file name under benchmarks/results ('' to not save)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    report = Report()
    report("# DeepCache and token merging")
    report(environment())
    report("")
    if not args.skip_embedded:
        embedded(report, args.prompts, args.seed)
    if args.full_size:
        full_size(report, args.repeats)
    if args.save:
        print(f"saved {report.save(args.save)}")


if __name__ == "__main__":
    main()
