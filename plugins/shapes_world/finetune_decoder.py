"""Second training stage of the embedded model: fine-tune the VAE *decoder* only.

The first stage (``aipaint_plugins.shapes_world.train``) trains the VAE for a capped time before the
UNet; on a busy 2-core machine that cap can leave the decoder under-trained, which then
limits every picture (colours drift, small shapes blur). The UNet was trained on the
*encoder's* latents, so the encoder must stay fixed: this stage freezes it (and
``quant_conv``) and trains only ``post_quant_conv`` + the decoder to reconstruct fresh
renders from those same latents, with a little latent noise so it also decodes the
UNet's imperfect latents well. The UNet and text encoder are untouched.

Usage: python -m aipaint_plugins.shapes_world.finetune_decoder zoo/models/shapes-tiny --minutes 10

``--extrapolate L`` also teaches the decoder the latents that classifier-free guidance makes.
CFG pushes a sample past the conditional prediction, away from what the unconditional model
hedges towards (other colours for the same object), so at CFG 7 the UNet's latents leave the
encoder's manifold (their encode(decode(z)) round trip is 1.6x further than at CFG 3) and this
decoder drew some of them in a wrong hue (big cyan on white as yellow). With ``--extrapolate``,
each training scene also has a twin with its objects recoloured at random, and half of each
batch decodes ``z + l * (z - z_twin)``, ``l ~ U(0, L)``, to the scene's own render.
Measured (``benchmarks/results/embedded_cfg_peak.txt``): a 12-minute ``--extrapolate 1.0`` run
made a better decoder (round trip of 200 renders read 94.8% -> 96.5%) and lifted CFG 1 and 3,
but CFG 7 kept its wrong hues, so the hues come from the UNet, not the decoder. The shipped
model does not use it.

Each run is appended to ``training.json``'s ``decoder_finetunes`` list.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from aipaint_plugins.shapes_world.train import log, render_pool, to_tensor


def render_twins(seed: int, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes of ``split`` and the same scenes with every object recoloured to another
    colour of the split (same shape, size, place and background), rendered."""
    from dataclasses import replace

    from aipaint_plugins.shapes_world.render import render_array
    from aipaint_plugins.shapes_world.scene import IMAGE_SIZE, TRAIN_COLOURS, random_scene

    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    twins = np.empty_like(images)
    for i in range(n):
        scene = random_scene(rng, split)
        palette = sorted({*TRAIN_COLOURS, *(o.colour for o in scene.objects)})
        recoloured = tuple(replace(o, colour=str(rng.choice([c for c in palette if c != o.colour]))) for o in scene.objects)
        images[i] = render_array(scene)
        twins[i] = render_array(replace(scene, objects=recoloured))
    return images, twins


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="zoo/models/shapes-tiny")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--latent-noise", type=float, default=0.05, help="std of noise added to scaled latents")
    ap.add_argument("--pool", type=int, default=20000)
    ap.add_argument("--extrapolate", type=float, default=0.0,
                    help="largest l of the z + l*(z - z_recoloured) latents half of each batch decodes (0: off)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from diffusers import AutoencoderKL

    folder = Path(a.model)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    scaling = float(vae.config.scaling_factor)
    twins = None
    if a.extrapolate > 0:
        train_imgs, train_twins = render_twins(a.seed + 100, "train", a.pool)
        extra, extra_twins = render_twins(a.seed + 200, "heldout_colour", a.pool // 10)
        twins = to_tensor(np.concatenate([train_twins, extra_twins]))
    else:
        _, train_imgs = render_pool(a.seed + 100, "train", a.pool)
        _, extra = render_pool(a.seed + 200, "heldout_colour", a.pool // 10)  # orange, for the LoRA issue
    images = to_tensor(np.concatenate([train_imgs, extra]))
    log(f"rendered {len(images)} images" + (" and their recoloured twins" if twins is not None else ""))

    for module in (vae.encoder, vae.quant_conv):
        module.requires_grad_(False)
    def encode_all(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the latents the UNet was trained on
            return torch.cat([vae.encode(x[i : i + 512]).latent_dist.mean for i in range(0, len(x), 512)])

    latents = encode_all(images)
    twin_latents = encode_all(twins) if twins is not None else None
    del twins
    log("encoded")

    def recon_mse(n: int = 1024) -> float:
        with torch.no_grad():
            return float(F.mse_loss(vae.decode(latents[:n]).sample, images[:n]).item() / 4)  # in 0..1 units

    before = recon_mse()
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed)
    started, step, history = time.time(), 0, []
    budget = a.minutes * 60
    while step < a.steps and time.time() - started < budget:
        progress = max(step / a.steps, (time.time() - started) / budget)
        for group in opt.param_groups:
            group["lr"] = a.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        idx = torch.randint(0, len(images), (a.batch,), generator=g)
        z = latents[idx]
        if twin_latents is not None:  # the first half: pushed away from the recoloured twin, as CFG pushes
            half = a.batch // 2
            push = torch.zeros(a.batch, 1, 1, 1)
            push[:half] = torch.rand(half, 1, 1, 1, generator=g) * a.extrapolate
            z = z + push * (z - twin_latents[idx])
        z = z + torch.randn(z.shape, generator=g) * (a.latent_noise / scaling)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, images[idx]) + 0.5 * F.l1_loss(rec, images[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            history.append([step, round(loss.item(), 5)])
            log(f"decoder step {step} loss {loss.item():.5f}")
    after = recon_mse()
    log(f"decoder fine-tune: {step} steps, recon MSE (0..1) {before:.5f} -> {after:.5f}")

    tmp = folder / "vae.tmp"
    vae.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp / "diffusion_pytorch_model.safetensors", folder / "vae" / "diffusion_pytorch_model.safetensors")
    os.replace(tmp / "config.json", folder / "vae" / "config.json")
    tmp.rmdir()
    record_path = folder / "training.json"
    record = json.loads(record_path.read_text())
    # Every run is kept, in order: a model may go through this stage more than once.
    runs = record.pop("decoder_finetunes", None) or ([record.pop("decoder_finetune")] if "decoder_finetune" in record else [])
    record["decoder_finetunes"] = runs
    runs.append({
        "command": f"python -m aipaint_plugins.shapes_world.finetune_decoder {a.model} --minutes {a.minutes} --steps {a.steps} "
                   f"--seed {a.seed} --threads {a.threads}" + (f" --extrapolate {a.extrapolate}" if a.extrapolate else ""),
        "args": vars(a),
        "steps": step,
        "minutes": round((time.time() - started) / 60, 2),
        "recon_mse_01_before": before,
        "recon_mse_01_after": after,
        "history": history,
    })
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
