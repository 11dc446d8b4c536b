"""aipaint's txt2img against diffusers' StableDiffusionPipeline on the same components.

Two models: the tiny test-sized SD1.5 (random weights, 32x32, 4 steps) and the full-size
SD1.5 architecture (random weights, from zoo/configs/sd15) at 256x256 for 2 steps. Both
pipelines get the same scheduler class, prompt, seed and settings; the runs alternate and
the best of N is kept for each. Prints both times and the ratio (aipaint / diffusers).

Usage: python benchmarks/txt2img_overhead.py [--repeats 3] [--skip-full] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def build_full_size(folder: Path) -> Path:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    config = ROOT / "zoo" / "configs" / "sd15"
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"),
        scheduler=PNDMScheduler.from_pretrained(config / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def compare(folder: Path, size: int, steps: int, repeats: int, sampler: str = "Euler") -> dict:
    from diffusers import StableDiffusionPipeline

    import aipaint
    from aipaint.engine.plans import _make_scheduler

    ours = aipaint.load(folder)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    spec = ours.host.registry.samplers.get(sampler)
    ref.scheduler = _make_scheduler(spec.scheduler_class, dict(ours.model.scheduler_config), spec.scheduler_options)
    prompt, negative = "a lighthouse at dusk, oil painting", "blurry"

    def run_ours() -> None:
        ours.txt2img(prompt, negative, steps=steps, cfg_scale=7, sampler=sampler, seed=1, width=size, height=size)

    def run_ref() -> None:
        ref(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7, width=size, height=size,
            generator=[torch.Generator().manual_seed(1)], output_type="pil")

    run_ours()
    run_ref()  # warm-up both
    times = {"aipaint": [], "diffusers": []}
    for _ in range(repeats):
        for name, fn in (("aipaint", run_ours), ("diffusers", run_ref)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    best = {k: min(v) for k, v in times.items()}
    return {"size": size, "steps": steps, **best, "ratio": best["aipaint"] / best["diffusers"], "all": times}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    # diffusers warns about the reference's stored scheduler config (steps_offset) on every load
    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny_sd

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = save_tiny_sd(Path(tmp) / "tiny")
        rows.append(("tiny SD1.5 (random), 32x32, 4 steps", compare(tiny, 32, 4, max(a.repeats, 10))))
        if not a.skip_full:
            full = build_full_size(Path(tmp) / "full")
            rows.append(("full-size SD1.5 (random), 256x256, 2 steps", compare(full, 256, 2, a.repeats)))
    print(f"{'model':<46} {'aipaint s':>10} {'diffusers s':>12} {'ratio':>7}")
    for name, r in rows:
        print(f"{name:<46} {r['aipaint']:>10.3f} {r['diffusers']:>12.3f} {r['ratio']:>7.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
