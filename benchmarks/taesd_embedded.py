"""Distil a tiny autoencoder (TAESD format) from the embedded model's VAE and measure it against the full VAE (issue 22).

The embedded model (``shapes-tiny``) has a small AutoencoderKL: 4 latent channels, scaling factor 0.63,
8x8 latents for 32x32 pictures (4x up-sampling), 0.59 M decoder parameters. No tiny autoencoder exists
for it, so this script trains one, TAESD style (madebyollin's recipe reduced to plain regression):

  * student: a diffusers ``AutoencoderTiny`` of TAESD's shape with one up-sampling stage fewer (4x) and
    32 channels instead of 64 (``tiny_config``); scaling factor 1, so it reads and writes the latents the
    UNet sees (the plugin multiplies the model's factor back in), as madebyollin's folders do;
  * data: shapes-world scenes of all splits (``scene.random_scene``, rendered by ``render.render_array``
    as the model's training images are), encoded once by the embedded VAE (posterior mode), plus the final
    latents of ``--gen-pool`` real generations (``aipaint.load()`` at the model's defaults, captions of
    another seed than the evaluation's); targets: the full VAE decoder's pictures of all those latents;
  * loss: decoder, mean abs + mean square difference to the full VAE's picture (in [-1, 1]); encoder (renders
    only, every ``--encoder-every`` steps: it converges long before the decoder), mean square difference to
    the VAE's scaled latents. Adam, cosine learning rate, batch ``--batch``;
    the batch of step ``s`` is drawn from a generator seeded with ``(seed, s)`` (``batch_indices``), so a run
    is reproducible from its recorded step count and a ``--ckpt`` resume continues the same sequence.

Evaluation (``--eval``):

  * held-out renders (another seed): the full VAE's reconstruction vs the render (context), the tiny
    decoder's picture of the same VAE latent vs the full VAE's (PSNR, mean abs difference in 0-255 units), the tiny
    encoder+decoder round trip vs the render; the evaluator's adherence of each picture to the scene caption;
  * real generations: ``--n`` canonical training captions (benchmarks/embedded_model.py's ``captions``,
    seed 1000; image i with seed 1000 + i) at the model's defaults, once with the full VAE and once through
    the taesd plugin (``options={"vae_decoder": {"kind": "custom", "path": OUT}}``): PSNR / mean abs
    difference between the two pictures and ``aipaint_plugins.shapes_world.evaluate.adherence`` of each;
  * decode time per 32x32 picture (batch 1, latents of the generations): the full VAE decoder and the tiny
    one taken in turns (``timed_in_turns``), median.

Usage: OMP_NUM_THREADS=1 python benchmarks/taesd_embedded.py --steps 2800 --minutes 20 --eval \
           --out benchmarks/results/taesd-embedded --results benchmarks/results/taesd_embedded.txt
       python benchmarks/taesd_embedded.py --eval-only --out benchmarks/results/taesd-embedded
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- pure helpers
def tiny_config(latent_channels: int, up_stages: int, channels: int = 32) -> dict:
    """``AutoencoderTiny`` keyword arguments of TAESD's shape for a VAE that up-samples ``2 ** up_stages``
    times: TAESD's blocks per stage (encoder 1, 3, 3, ...; decoder ..., 3, 3, 1) cut to ``up_stages + 1``
    stages, ``channels`` wide (TAESD: 64), scaling factor 1 (it reads the latents the UNet sees)."""
    stages = up_stages + 1
    encoder_blocks = (1,) + (3,) * (stages - 1)
    return dict(in_channels=3, out_channels=3, latent_channels=latent_channels,
                encoder_block_out_channels=(channels,) * stages, decoder_block_out_channels=(channels,) * stages,
                num_encoder_blocks=encoder_blocks, num_decoder_blocks=encoder_blocks[::-1],
                upsampling_scaling_factor=2, act_fn="relu", scaling_factor=1.0)


def batch_indices(seed: int, step: int, pool: int, batch: int) -> torch.Tensor:
    """The pool indices of training step ``step``: a function of (seed, step) alone, so a resumed or
    repeated run draws the same batches."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, pool, (batch,), generator=gen)


def cosine_lr(step: int, steps: int, base: float, warmup: int = 50) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``base`` to 0 at ``steps``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def as_pixels(images: torch.Tensor) -> np.ndarray:
    """Decoder output in [-1, 1] (N x 3 x H x W) -> the uint8 pictures aipaint makes of it
    (``LatentDiffusionModel.decode`` then ``to_pictures``), N x H x W x 3."""
    unit = (images.float() / 2 + 0.5).clamp(0, 1)
    return (unit.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 pictures (or stacks); inf when equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference of two uint8 pictures, in 0-255 units."""
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def timed_in_turns(fns: dict[str, Callable[[], object]], n: int) -> dict[str, float]:
    """Median seconds of each function over ``n`` rounds; each round runs every function once, in turns,
    so load on a shared machine falls on all of them alike. One warm-up round first. Inference mode."""
    from _runtime_bench import alternating_medians

    with torch.inference_mode():
        return alternating_medians(fns, n, warmup=1)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


# --------------------------------------------------------------------------- data
def render_scenes(n: int, seed: int):
    """``n`` scenes cycling through the world's splits, their captions and renders (N x 3 x 32 x 32, [0, 1])."""
    from aipaint_plugins.shapes_world.render import render_array
    from aipaint_plugins.shapes_world.scene import SPLITS, random_scene

    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, SPLITS[i % len(SPLITS)]) for i in range(n)]
    pixels = torch.from_numpy(np.stack([render_array(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
    return [s.caption for s in scenes], pixels


class LatentRecorder:
    """Wraps ``model.vae_decode_call`` and keeps the latents of every final decode, as the UNet saw them
    (undoing the model's ``latents / scaling_factor + shift_factor``)."""

    def __init__(self, model) -> None:
        self.model, self.latents = model, []
        self.saved = model.vae_decode_call

    def __enter__(self):
        def call(x):
            self.latents.append(((x.detach().float() - self.model.shift_factor) * self.model.scaling_factor).cpu())
            return self.saved(x)

        self.model.vae_decode_call = call
        return self

    def __exit__(self, *exc) -> None:
        self.model.vae_decode_call = self.saved


def full_decode(model, latents: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The full VAE decoder's pictures (in [-1, 1]) of latents as the UNet sees them."""
    with torch.no_grad():
        return torch.cat([model.vae.decode(latents[i:i + batch] / model.scaling_factor + model.shift_factor,
                                           return_dict=False)[0].float() for i in range(0, len(latents), batch)])


def build_data(pipe, a) -> dict:
    from embedded_model import captions as canonical_captions

    model = pipe.model
    caps, pixels = render_scenes(a.pool, a.seed)
    with torch.no_grad():
        latents = torch.cat([model.encode(pixels[i:i + 64]).float() for i in range(0, len(pixels), 64)])
    gen_latents = torch.zeros(0, *latents.shape[1:])
    if a.gen_pool:
        gen_caps = canonical_captions(a.gen_pool, "train", seed=a.seed + 7000)
        with LatentRecorder(model) as rec:
            for i, cap in enumerate(gen_caps):
                pipe.txt2img(cap, seed=a.seed + 7000 + i)
        gen_latents = torch.cat(rec.latents)
    all_latents = torch.cat([latents, gen_latents])
    targets = full_decode(model, all_latents)
    return {"pixels": pixels * 2 - 1, "latents": latents, "all_latents": all_latents, "targets": targets,
            "n_renders": len(latents), "n_generated": len(gen_latents)}


# --------------------------------------------------------------------------- training
def train(pipe, a) -> dict:
    from diffusers import AutoencoderTiny

    model = pipe.model
    t0 = time.perf_counter()
    data = build_data(pipe, a)
    log(f"data: {data['n_renders']} renders + {data['n_generated']} generated latents "
        f"{tuple(data['latents'].shape[1:])} (std {data['all_latents'].std():.3f}), full-VAE targets, "
        f"{time.perf_counter() - t0:.1f} s")
    torch.manual_seed(a.seed)
    up_stages = len(model.vae.config.block_out_channels) - 1
    tiny = AutoencoderTiny(**tiny_config(model.latent_channels, up_stages, a.channels)).float().train()
    opt = torch.optim.Adam(tiny.parameters(), lr=a.lr)
    start_step, losses, spent = 0, [], 0.0
    ckpt = Path(a.ckpt) if a.ckpt else None
    if ckpt and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        tiny.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start_step, losses, spent = int(state["step"]), list(state["losses"]), float(state["spent"])
        log(f"resumed from {ckpt} at step {start_step}")
    log(f"tiny autoencoder: encoder {sum(p.numel() for p in tiny.encoder.parameters())} + decoder "
        f"{sum(p.numel() for p in tiny.decoder.parameters())} parameters (full VAE decoder "
        f"{sum(p.numel() for p in model.vae.decoder.parameters())})")
    began = time.perf_counter() - spent
    step = start_step
    n_all, n_renders = len(data["all_latents"]), data["n_renders"]
    while step < a.steps:
        if time.perf_counter() - began > a.minutes * 60:
            log(f"time budget of {a.minutes} min reached at step {step}")
            break
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, a.steps, a.lr)
        idx = batch_indices(a.seed, step, n_all, a.batch)
        dec = tiny.decoder(data["all_latents"][idx])
        target = data["targets"][idx]
        dec_loss = (dec - target).abs().mean() + (dec - target).pow(2).mean()
        loss = dec_loss
        if step % a.encoder_every == 0:
            eidx = batch_indices(a.seed + 1, step, n_renders, a.batch)
            enc_loss = (tiny.encoder(data["pixels"][eidx]) - data["latents"][eidx]).pow(2).mean()
            loss = loss + enc_loss
        else:
            enc_loss = torch.tensor(float("nan"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append((dec_loss.item(), enc_loss.item()))
        step += 1
        if step % 100 == 0 or step == a.steps:
            recent = np.nanmean(losses[-100:], axis=0)
            log(f"step {step}/{a.steps}: decoder loss {recent[0]:.5f}, encoder loss {recent[1]:.5f}, "
                f"{time.perf_counter() - began:.0f} s")
            if ckpt:
                torch.save({"model": tiny.state_dict(), "opt": opt.state_dict(), "step": step, "losses": losses,
                            "spent": time.perf_counter() - began}, ckpt)
    minutes = (time.perf_counter() - began) / 60
    out = Path(a.out)
    tiny.eval().save_pretrained(out, safe_serialization=True)
    tenth = max(1, len(losses) // 10)
    return {"steps_done": step, "minutes": minutes, "n_renders": n_renders, "n_generated": data["n_generated"],
            "first": np.nanmean(losses[:tenth], axis=0).tolist(), "last": np.nanmean(losses[-tenth:], axis=0).tolist(),
            "params_enc": sum(p.numel() for p in tiny.encoder.parameters()),
            "params_dec": sum(p.numel() for p in tiny.decoder.parameters())}


# --------------------------------------------------------------------------- evaluation
def evaluate(pipe, a) -> dict:
    from aipaint_plugins.shapes_world.evaluate import adherence, summarize
    from aipaint_plugins.taesd import load_tiny_autoencoder
    from embedded_model import captions as canonical_captions
    from PIL import Image

    model = pipe.model
    tiny = load_tiny_autoencoder(a.out, "custom")
    res: dict = {}

    # held-out renders
    caps, pixels = render_scenes(a.heldout, a.seed + 9000)
    with torch.no_grad():
        lat = torch.cat([model.encode(pixels[i:i + 64]).float() for i in range(0, len(pixels), 64)])
        full = as_pixels(full_decode(model, lat))
        small = as_pixels(tiny.decode(lat, return_dict=False)[0])
        tiny_lat = tiny.encode(pixels * 2 - 1, return_dict=False)[0]
        round_trip = as_pixels(tiny.decode(tiny_lat, return_dict=False)[0])
    truth = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)

    def adh(arrays):
        return summarize([adherence(Image.fromarray(x), c) for x, c in zip(arrays, caps)])

    res["renders"] = {
        "n": len(caps),
        "full_vs_render": (psnr(full, truth), mean_abs(full, truth)),
        "tiny_vs_full": (psnr(small, full), mean_abs(small, full)),
        "tiny_vs_render": (psnr(small, truth), mean_abs(small, truth)),
        "roundtrip_vs_render": (psnr(round_trip, truth), mean_abs(round_trip, truth)),
        "encoder_rel_mse": float((tiny_lat - lat).pow(2).mean() / lat.pow(2).mean()),
        "max_image_mad_tiny_vs_full": max(mean_abs(s, f) for s, f in zip(small, full)),
        "adherence": {"render": adh(truth), "full": adh(full), "tiny": adh(small), "roundtrip": adh(round_trip)},
    }
    log(f"renders: {json.dumps(res['renders'])}")

    # real generations, full VAE vs the taesd plugin's option path
    gcaps = canonical_captions(a.n, "train", seed=1000)
    option = {"vae_decoder": {"kind": "custom", "path": str(a.out)}}
    pipe.txt2img(gcaps[0], seed=1)  # warm-up
    fulls, tinys, latents, direct_gap = [], [], [], 0.0
    for i, cap in enumerate(gcaps):
        with LatentRecorder(model) as rec:
            f_img = pipe.txt2img(cap, seed=1000 + i).image
        t_img = pipe.txt2img(cap, seed=1000 + i, options=option).image
        fulls.append(np.asarray(f_img, np.uint8))
        tinys.append(np.asarray(t_img, np.uint8))
        latents.append(rec.latents[-1])
        with torch.no_grad():
            direct = as_pixels(tiny.decode(rec.latents[-1], return_dict=False)[0])[0]
        direct_gap = max(direct_gap, mean_abs(direct, tinys[-1]))
    fulls_a, tinys_a = np.stack(fulls), np.stack(tinys)
    per_image = [mean_abs(t, f) for t, f in zip(tinys_a, fulls_a)]
    sf = [adherence(Image.fromarray(x), c) for x, c in zip(fulls_a, gcaps)]
    st = [adherence(Image.fromarray(x), c) for x, c in zip(tinys_a, gcaps)]
    res["generations"] = {
        "n": len(gcaps),
        "tiny_vs_full": (psnr(tinys_a, fulls_a), mean_abs(tinys_a, fulls_a)),
        "per_image_mad": {"median": float(np.median(per_image)), "max": float(max(per_image)),
                          "min": float(min(per_image))},
        "per_image_psnr_min": min(psnr(t, f) for t, f in zip(tinys_a, fulls_a)),
        "adherence": {"full": summarize(sf), "tiny": summarize(st)},
        "same_score": sum(abs(x.score - y.score) < 1e-9 for x, y in zip(sf, st)),
        "option_vs_direct_decode_max_mad": direct_gap,
    }
    log(f"generations: {json.dumps(res['generations'])}")

    # decode time per picture, in turns
    z = latents[0]
    sf_, shift = model.scaling_factor, model.shift_factor
    times = timed_in_turns({"full": lambda: model.vae.decode(z / sf_ + shift, return_dict=False)[0],
                            "tiny": lambda: tiny.decode(z, return_dict=False)[0]}, a.time_n)
    res["time"] = {**times, "n": a.time_n}
    log(f"time: {times}")
    res["size_bytes"] = folder_size(Path(a.out))
    return res


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def report(a, trained: dict | None, res: dict, argv: list[str]) -> str:
    r, g, t = res["renders"], res["generations"], res["time"]
    lines = [f"# python benchmarks/taesd_embedded.py {shlex.join(argv)}",
             f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {torch.get_num_threads()} torch thread(s), "
             f"shared 2-core CPU"]
    if trained:
        lines.append(f"training: {trained['steps_done']} of {a.steps} steps (batch {a.batch}, lr {a.lr} cosine, seed "
                     f"{a.seed}, {a.channels} channels, encoder trained every {a.encoder_every} steps) in {trained['minutes']:.1f} min on {trained['n_renders']} "
                     f"renders + {trained['n_generated']} generated latents; decoder loss (abs + square) first 10% "
                     f"{trained['first'][0]:.4f} -> last 10% {trained['last'][0]:.4f}; encoder loss (square) "
                     f"{trained['first'][1]:.4f} -> {trained['last'][1]:.4f}; parameters encoder "
                     f"{trained['params_enc']}, decoder {trained['params_dec']}")
    lines.append(f"tiny autoencoder folder: {a.out} ({res['size_bytes'] / 1e6:.2f} MB, fp32 safetensors + config.json)")
    lines.append("")
    lines.append(f"held-out renders (n={r['n']}, all splits, seed {a.seed + 9000}): PSNR dB / mean abs difference (0-255)")
    for key, label in (("full_vs_render", "full VAE reconstruction vs render"),
                       ("tiny_vs_full", "tiny decoder vs full VAE (same VAE latent)"),
                       ("tiny_vs_render", "tiny decoder of the VAE latent vs render"),
                       ("roundtrip_vs_render", "tiny encoder + tiny decoder vs render")):
        lines.append(f"  {label:<46}{r[key][0]:7.2f} dB {r[key][1]:7.2f}")
    lines.append(f"  worst image, tiny vs full: mean abs {r['max_image_mad_tiny_vs_full']:.2f}; tiny encoder's latents: "
                 f"relative square error {r['encoder_rel_mse']:.4f}")
    lines.append("  adherence (attributes / all right): " + ", ".join(
        f"{k} {pct(v['score'])} / {pct(v['all_correct'])}" for k, v in r["adherence"].items()))
    lines.append("")
    lines.append(f"real generations (n={g['n']}: canonical training captions, seed 1000 + i, model defaults; full VAE "
                 f"vs the taesd plugin's option path)")
    lines.append(f"  tiny vs full: PSNR {g['tiny_vs_full'][0]:.2f} dB (worst image {g['per_image_psnr_min']:.2f}), "
                 f"mean abs {g['tiny_vs_full'][1]:.2f} (per image median {g['per_image_mad']['median']:.2f}, "
                 f"max {g['per_image_mad']['max']:.2f}, min {g['per_image_mad']['min']:.2f})")
    fa, ta = g["adherence"]["full"], g["adherence"]["tiny"]
    lines.append(f"  adherence, full VAE: {pct(fa['score'])} attributes, {pct(fa['all_correct'])} all right; "
                 f"tiny decoder: {pct(ta['score'])} attributes, {pct(ta['all_correct'])} all right; "
                 f"same score on {g['same_score']}/{g['n']} images")
    lines.append(f"  (option path vs decoding the recorded latents directly: max mean abs {g['option_vs_direct_decode_max_mad']:.3f})")
    lines.append("")
    lines.append(f"decode time per 32x32 picture (batch 1, in turns, median of {t['n']}): full VAE {1000 * t['full']:.2f} ms, "
                 f"tiny {1000 * t['tiny']:.2f} ms ({t['full'] / t['tiny']:.2f}x)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2800, help="fixed training step count (cosine schedule length)")
    ap.add_argument("--minutes", type=float, default=20.0, help="stop training early past this wall time")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--encoder-every", type=int, default=2, help="train the encoder on every k-th step (it converges "
                                                                  "long before the decoder)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--channels", type=int, default=32, help="TAESD width (madebyollin's: 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=4096, help="renders to train on")
    ap.add_argument("--gen-pool", type=int, default=96, help="latents of real generations to train the decoder on")
    ap.add_argument("--ckpt", default="", help="a checkpoint file to resume from and write every 100 steps")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/taesd-embedded"))
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--n", type=int, default=48, help="generations to evaluate")
    ap.add_argument("--heldout", type=int, default=512, help="held-out renders to evaluate")
    ap.add_argument("--time-n", type=int, default=50)
    ap.add_argument("--results", default="")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import aipaint

    pipe = aipaint.load()
    trained = None if a.eval_only else train(pipe, a)
    if trained:
        log(f"trained: {trained}")
    if a.eval or a.eval_only:
        res = evaluate(pipe, a)
        text = report(a, trained, res, argv)
        print(text)
        if a.results:
            Path(a.results).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
