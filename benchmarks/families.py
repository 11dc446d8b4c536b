"""Time per step of the SDXL, DeepFloyd IF and unCLIP families: aipaint against diffusers.

Full-size architectures with random weights (nothing is downloaded), on the CPU, at a
small size and 1-2 steps. Both sides share the very same modules; each side runs the
whole generation with 1 and with 2 steps, and the difference is the time of one step
(prompt encoding, VAE decoding and other fixed costs cancel out).

    python benchmarks/families.py                      # all families
    python benchmarks/families.py --families sdxl --size 256 --threads 2

Architectures:

* ``sdxl``: the published SDXL 1.0 base configs in ``zoo/configs/sdxl-base`` (UNet 2.6B,
  both text encoders, VAE); Euler with CFG.
* ``deepfloyd-if``: stage I at its native 64 px. The UNet follows IF's published design
  (SimpleCrossAttn blocks, T5-XXL-wide 4096 conditioning, learned variance) at IF-I-L's
  size (0.9B); the exact published config is not available offline, so treat it as
  representative, not identical (IF-I-XL, 4.3B, does not fit this machine's memory). The T5 encoder has XXL width but one layer (it runs
  once per image, not per step, so it does not enter the per-step time).
* ``unclip``: Karlo's prior (diffusers' ``PriorTransformer`` and ``UnCLIPTextProjModel``
  defaults are Karlo's), CLIP ViT-L/14 text encoder, and a decoder and super-resolution
  UNets of representative size (exact published configs not available offline). One
  "step" is one prior, one decoder and one super-resolution step, measured as
  T(3) - T(2) because unCLIP's scheduler cannot run a single step.

Memory: SDXL in float32 needs about 15 GB; families that do not fit in the available
memory are skipped with a message rather than risking the machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runtime_bench import build  # noqa: E402  (random weights, fast: meta device, then small noise)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a red fox in the snow, detailed, 8k"


def params(*modules: Any) -> float:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters()) / 1e9


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


REPEATS = 3


def per_step_in_turns(ours: Callable[[int], Any], theirs: Callable[[int], Any], fewer: int = 1) -> dict[str, float]:
    """Median over ``REPEATS`` rounds of T(fewer + 1 steps) - T(fewer steps) for each side,
    after a warm-up run each (first calls allocate). The sides take turns within every
    round, so load from other processes on a shared machine falls on both alike."""
    ours(fewer)
    theirs(fewer)
    times: dict[str, list[float]] = {"aipaint": [], "diffusers": []}
    for _ in range(REPEATS):
        for name, run in (("aipaint", ours), ("diffusers", theirs)):
            times[name].append(timed(lambda run=run: run(fewer + 1)) - timed(lambda run=run: run(fewer)))
    return {name: statistics.median(values) for name, values in times.items()}


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A scheduler's config as its saved JSON has it (with ``_class_name``)."""
    return {**scheduler.config, "_class_name": type(scheduler).__name__}


def available_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


# --- SDXL ---------------------------------------------------------------------------------------


def bench_sdxl(size: int) -> dict[str, Any]:
    from aipaint_plugins.sdxl.model import SDXLModel
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from aipaint.models.latent import ModelDefaults
    from aipaint.pipeline import Pipeline
    from aipaint.plugin.host import create_plugin_host

    config = ROOT / "zoo" / "configs" / "sdxl-base"
    unet = build(lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet")))
    vae = build(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")), 1)
    te1 = build(lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")), 2)
    te2 = build(lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config / "text_encoder_2")), 3)
    tok1 = CLIPTokenizer.from_pretrained(config / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(config / "tokenizer_2")
    scheduler_config = json.loads((config / "scheduler" / "scheduler_config.json").read_text())
    model = SDXLModel(family="sdxl", name="sdxl-random", unet=unet, vae=vae, text_encoder=te1, tokenizer=tok1,
                      text_encoder_2=te2, tokenizer_2=tok2, scheduler_config=scheduler_config,
                      defaults=ModelDefaults(width=size, height=size))
    pipe = Pipeline(model, create_plugin_host())
    reference = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                          unet=unet, scheduler=EulerDiscreteScheduler.from_config(scheduler_config))
    reference.set_progress_bar_config(disable=True)

    def ours(steps: int) -> None:
        pipe.txt2img(PROMPT, sampler="Euler", steps=steps, cfg_scale=5.0, seed=1, width=size, height=size)

    def theirs(steps: int) -> None:
        reference(PROMPT, num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(1),
                  width=size, height=size, output_type="np")

    return {"family": "sdxl", "what": f"base 1.0 ({params(unet, vae, te1, te2):.2f}B), {size} px, CFG",
            **per_step_in_turns(ours, theirs)}


# --- DeepFloyd IF ------------------------------------------------------------------------------


def t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    words = PROMPT.replace(",", " ").split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)] + [("▁" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


IF_STAGE_I = dict(
    sample_size=64, in_channels=3, out_channels=6, layers_per_block=3, block_out_channels=(320, 640, 960, 1280),
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=1280, encoder_hid_dim=4096,
    attention_head_dim=64, addition_embed_type="text", addition_embed_type_num_heads=64,
    cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu",
)


def bench_if(size: int) -> dict[str, Any]:
    from aipaint_plugins.deepfloyd_if.model import IFCascade, IFStage
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from aipaint.pipeline import Pipeline

    unet = build(lambda: UNet2DConditionModel(**IF_STAGE_I))
    text_encoder = build(lambda: T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
                                                         num_heads=64, feed_forward_proj="gated-gelu")), 1)
    tokenizer = t5_tokenizer()
    scheduler = DDPMScheduler(variance_type="learned_range", beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                              thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5)
    stage = IFStage("base", unet, scheduler_config(scheduler))
    pipe = Pipeline(IFCascade(family="deepfloyd-if", name="if-random", text_encoder=text_encoder, tokenizer=tokenizer,
                              stages=[stage]))
    reference = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler, safety_checker=None,
                           feature_extractor=None, watermarker=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    native = IF_STAGE_I["sample_size"]

    def ours(steps: int) -> None:
        pipe.txt2img(PROMPT, seed=1, steps=steps, cfg_scale=7.0)

    def theirs(steps: int) -> None:
        reference(PROMPT, num_inference_steps=steps, guidance_scale=7.0, generator=torch.Generator().manual_seed(1),
                  clean_caption=False, output_type="pt")

    return {"family": "deepfloyd-if", "what": f"stage I ({params(unet):.2f}B UNet), {native} px, CFG",
            **per_step_in_turns(ours, theirs)}


# --- unCLIP ------------------------------------------------------------------------------------


def bench_unclip(size: int) -> dict[str, Any]:
    from aipaint_plugins.shapes_world.clip_tokenizer import build_clip_tokenizer
    from aipaint_plugins.unclip.model import UnCLIPModel
    from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from aipaint.pipeline import Pipeline

    text_encoder = build(lambda: CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768,
        hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)))
    prior = build(lambda: PriorTransformer(), 1)
    text_proj = build(lambda: UnCLIPTextProjModel(time_embed_dim=4 * 384, cross_attention_dim=2048), 2)
    decoder = build(lambda: UNet2DConditionModel(
        sample_size=64, in_channels=3, out_channels=6, layers_per_block=3, block_out_channels=(384, 768, 1152, 1536),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                          "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                        "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=2048, attention_head_dim=64,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity"), 3)
    super_res = dict(sample_size=256, in_channels=6, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
                     down_block_types=("ResnetDownsampleBlock2D",) * 4, up_block_types=("ResnetUpsampleBlock2D",) * 4)
    first = build(lambda: UNet2DModel(**super_res), 4)
    last = build(lambda: UNet2DModel(**super_res), 5)
    schedulers = {
        "prior_scheduler": UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
        "decoder_scheduler": UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        "super_res_scheduler": UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    }
    tokenizer = build_clip_tokenizer()
    model = UnCLIPModel(family="unclip", name="karlo-random", text_encoder=text_encoder, tokenizer=tokenizer,
                        text_proj=text_proj, decoder=decoder, super_res_first=first, super_res_last=last, prior=prior,
                        scheduler_configs={k: scheduler_config(v) for k, v in schedulers.items()})
    pipe = Pipeline(model)
    reference = UnCLIPPipeline(prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=text_encoder,
                               tokenizer=tokenizer, super_res_first=first, super_res_last=last, **schedulers)
    reference.set_progress_bar_config(disable=True)

    def ours(steps: int) -> None:
        pipe.txt2img(PROMPT, seed=1, steps=steps, options={"unclip": {"prior_steps": steps, "super_res_steps": steps}})

    def theirs(steps: int) -> None:
        reference(PROMPT, generator=torch.Generator().manual_seed(1), prior_num_inference_steps=steps,
                  decoder_num_inference_steps=steps, super_res_num_inference_steps=steps, output_type="np")

    total = params(prior, decoder, first, last, text_proj)
    # unCLIP's scheduler cannot run a single step, so here one step = T(3 steps) - T(2 steps).
    return {"family": "unclip", "what": f"prior + decoder 64 px + SR 256 px ({total:.2f}B)",
            **per_step_in_turns(ours, theirs, 2)}


BENCHES: dict[str, tuple[Callable[[int], dict[str, Any]], float]] = {
    # name: (benchmark, GB of memory it needs in float32, with activations)
    "sdxl": (bench_sdxl, 16.0),
    "deepfloyd-if": (bench_if, 7.0),
    "unclip": (bench_unclip, 13.0),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(BENCHES), help="comma-separated: " + ", ".join(BENCHES))
    parser.add_argument("--size", type=int, default=256, help="SDXL image size in pixels (IF and unCLIP run at their native sizes)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="run even when the memory check says it will not fit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(BENCHES)}")
    rows = []
    for name in names:
        bench, needed = BENCHES[name]
        free = available_gb()
        if free < needed and not args.force:
            print(f"{name}: skipped, needs about {needed:.0f} GB and {free:.1f} GB is available (--force to try)", file=sys.stderr)
            continue
        with torch.inference_mode():
            rows.append(bench(args.size))
        gc.collect()
        row = rows[-1]
        print(f"{name}: aipaint {row['aipaint']:.2f} s/step, diffusers {row['diffusers']:.2f} s/step", file=sys.stderr)
    print(f"\nCPU, {args.threads} thread(s), float32, random weights; one step = T(n+1 steps) - T(n steps), "
          f"median of {REPEATS} rounds, the two sides in turns\n")
    print(f"{'family':<14} {'what':<48} {'aipaint s/step':>15} {'diffusers s/step':>17} {'ratio':>7}")
    for row in rows:
        ratio = row["aipaint"] / row["diffusers"] if row["diffusers"] > 0 else float("nan")
        print(f"{row['family']:<14} {row['what']:<48} {row['aipaint']:>15.2f} {row['diffusers']:>17.2f} {ratio:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
