"""Train the embedded model's layout ControlNet ``shapes-tiny-controlnet-layout``.

    python -m aipaint_plugins.shapes_world.controlnet_train --base zoo/models/shapes-tiny \\
        --out zoo/models/shapes-tiny-controlnet-layout --cpu-minutes 13 --threads 1

Recipe: a ``ControlNetModel.from_unet`` copy of the frozen base UNet's encoder (small
conditioning embedding, ``(16, 32, 64)``: control images at the 32-pixel image size, 4×
the latent size) learns to predict, together with the frozen UNet and text encoder, the
v-prediction target of the base model's own zero-terminal-SNR schedule
(``DDPMScheduler.from_config`` + ``get_velocity``). Control image: the Canny edges of the
ground-truth render (:func:`aipaint_plugins.shapes_world.controlnet_layout.layout_map`). Captions: half
of them without positions (so the control image alone must say where), 10% empty, the
rest full. Timesteps are drawn with density ∝ t, because the layout of an image is
decided at high noise. Only the ControlNet's weights change.

The result is written atomically (diffusers layout, safetensors, plus ``training.json``),
evaluated on held-out scenes (position accuracy with and without the ControlNet), and
recorded in the zoo card ``zoo/cards/shapes-tiny-controlnet-layout.json`` (``--card``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

COND_CHANNELS = (16, 32, 64)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_pool(n: int, seed: int) -> dict[str, Any]:
    """Scenes (one or two objects), their renders, Canny maps and both kinds of caption."""
    from aipaint_plugins.shapes_world.render import render_array
    from aipaint_plugins.shapes_world.scene import random_scene

    from .controlnet_layout import layout_map, prompt_without_position

    rng = np.random.default_rng(seed)
    images = np.empty((n, 32, 32, 3), np.uint8)
    maps = np.empty((n, 32, 32), np.uint8)
    full, short = [], []
    for i in range(n):
        scene = random_scene(rng, "train")
        images[i] = render_array(scene)
        maps[i] = np.asarray(layout_map(scene))[:, :, 0]
        full.append(scene.caption)
        short.append(prompt_without_position(scene))
    return {"images": images, "maps": maps, "full": full, "short": short}


def save_atomic(out: Path, controlnet: Any, record: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    controlnet.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def write_card(path: Path, record: dict[str, Any], out: Path) -> None:
    """The zoo card, written atomically; keeps an ``evaluation`` a benchmark filled in."""
    from aipaint.models.zoo import zoo_root

    previous = json.loads(path.read_text()) if path.is_file() else {}
    try:
        source_path = out.resolve().relative_to(zoo_root().resolve()).as_posix()
    except ValueError:
        source_path = str(out)
    card = {
        "id": "shapes-tiny-controlnet-layout",
        "name": "shapes-tiny-controlnet-layout",
        "family": "controlnet",
        "base_model": "shapes-tiny",
        "description": "layout ControlNet for the embedded shapes-tiny model: puts objects where a control image's edges are",
        "license": "Apache-2.0",
        "source": {"kind": "embedded", "path": source_path},
        "preprocessor": "canny",
        "usage": "AdapterUnit('controlnet', {'model': 'shapes-tiny-controlnet-layout', 'image': ..., 'preprocessor': 'canny'})",
        "recipe": record["recipe"],
        "command": record["command"],
        "training": {k: record[k] for k in ("steps", "minutes", "cpu_minutes", "final_loss", "params", "size_bytes", "base_unet_sha256")
                     if k in record},
        "results": record.get("evaluation", {}),
        "evaluation": previous.get("evaluation", "pending: run benchmarks/controlnet_layout.py --record"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="zoo/models/shapes-tiny", help="the base model folder (diffusers layout)")
    ap.add_argument("--out", default="zoo/models/shapes-tiny-controlnet-layout")
    ap.add_argument("--card", default="zoo/cards/shapes-tiny-controlnet-layout.json", help="zoo card to write ('' for none)")
    ap.add_argument("--cpu-minutes", type=float, default=13.0,
                    help="training budget in CPU time of this process (robust to a busy, shared machine)")
    ap.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget instead (0: use --cpu-minutes)")
    ap.add_argument("--steps", type=int, default=0, help="fixed number of steps (overrides --minutes)")
    ap.add_argument("--pool", type=int, default=12000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--no-position", type=float, default=0.5, help="fraction of captions without positions")
    ap.add_argument("--drop-text", type=float, default=0.1, help="fraction of empty captions")
    ap.add_argument("--eval-cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    import diffusers
    from aipaint_plugins.shapes_world.train import ThreadTuner, lr_at
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextModel, CLIPTokenizer

    base, out = Path(a.base), Path(a.out)
    started = time.time()
    record: dict[str, Any] = {
        "model": "shapes-tiny-controlnet-layout",
        "status": "in-progress",
        "command": "python -m aipaint_plugins.shapes_world.controlnet_train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "base": str(base),
        "args": vars(a),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__},
        "recipe": {
            "architecture": f"ControlNetModel.from_unet(base UNet, conditioning_embedding_out_channels={COND_CHANNELS})",
            "control_image": "Canny edges (thresholds 100/200, on RGB) of the ground-truth 32x32 render, white on black",
            "captions": f"{a.no_position:.0%} without positions, {a.drop_text:.0%} empty, the rest full",
            "objective": "v-prediction with the base model's zero-terminal-SNR schedule (DDPMScheduler.from_config, get_velocity)",
            "timesteps": "t = floor(1000 * sqrt(u)), u ~ U(0, 1): density proportional to t",
            "frozen": "UNet, text encoder, VAE; only the ControlNet trains",
            "optimizer": f"AdamW(lr={a.lr}, weight_decay=0.01), {a.warmup}-step warm-up, cosine to 2%, grad-norm clip 1",
            "batch": a.batch,
            "pool": f"{a.pool} scenes of the train split (one or two objects), seed {a.seed}",
        },
    }

    # 1. The frozen base model.
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", use_safetensors=True).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", use_safetensors=True).eval().requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", local_files_only=True).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", local_files_only=True)
    schedule = DDPMScheduler.from_config(json.loads((base / "scheduler" / "scheduler_config.json").read_text()))
    if schedule.config.prediction_type != "v_prediction":
        log(f"warning: the base model predicts {schedule.config.prediction_type}; training targets follow it")
    unet.set_attn_processor(AttnProcessor())
    from aipaint.plugin.kit.hashing import sha256_file

    # The ControlNet is tied to these weights: a retrained base model needs a retrained ControlNet.
    record["base_unet_sha256"] = sha256_file(base / "unet" / "diffusion_pytorch_model.safetensors")

    # 2. Data: renders → latents, Canny maps, token ids of both caption kinds.
    t0 = time.time()
    pool = build_pool(a.pool, a.seed)
    with torch.no_grad():
        pixels = torch.from_numpy(pool["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = torch.cat([vae.encode(pixels[i:i + 500]).latent_dist.mean for i in range(0, len(pixels), 500)])
        latents = latents * vae.config.scaling_factor
    maps = torch.from_numpy(pool["maps"]).float().div(255).unsqueeze(1)  # (N, 1, 32, 32), expanded to RGB per batch

    def tokens(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    full_ids, short_ids, empty_ids = tokens(pool["full"]), tokens(pool["short"]), tokens([""])[0]
    log(f"pool: {a.pool} scenes, latents {tuple(latents.shape)}, in {time.time() - t0:.1f}s")

    # 3. The ControlNet, copied from the UNet's encoder.
    torch.manual_seed(a.seed + 1)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CHANNELS)
    controlnet.set_attn_processor(AttnProcessor())
    controlnet.train()
    params = list(controlnet.parameters())
    record["params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    log(f"ControlNet parameters: {record['params']:,}")

    g = torch.Generator().manual_seed(a.seed + 2)
    tuner = ThreadTuner(a.threads)
    t0 = last_log = time.time()
    cpu0 = time.process_time()
    budget = (a.minutes or a.cpu_minutes) * 60
    step, history, running = 0, [], []
    while True:
        elapsed = time.time() - t0 if a.minutes else time.process_time() - cpu0
        if (a.steps and step >= a.steps) or (not a.steps and elapsed >= budget):
            break
        progress = step / a.steps if a.steps else elapsed / budget
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, step, a.warmup, a.lr)
        ts = time.time()
        tuner.before(step)
        idx = torch.randint(0, len(latents), (a.batch,), generator=g)
        choice = torch.rand(a.batch, generator=g)
        ids = torch.where((choice < a.no_position)[:, None], short_ids[idx], full_ids[idx])
        ids[choice > 1 - a.drop_text] = empty_ids
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = (torch.rand(a.batch, generator=g).sqrt() * schedule.config.num_train_timesteps).long().clamp(
            max=schedule.config.num_train_timesteps - 1)
        noisy = schedule.add_noise(x0, noise, t)
        target = schedule.get_velocity(x0, noise, t) if schedule.config.prediction_type == "v_prediction" else noise
        with torch.no_grad():
            embeds = text_encoder(ids)[0]
        down, mid = controlnet(noisy, t, encoder_hidden_states=embeds, controlnet_cond=maps[idx].expand(-1, 3, -1, -1),
                               return_dict=False)
        pred = unet(noisy, t, encoder_hidden_states=embeds, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(loss.item())
        tuner.after(step, time.time() - ts)
        step += 1
        if time.time() - last_log > 30:
            last_log = time.time()
            history.append({"step": step, "t": round(last_log - t0, 1), "loss": float(np.mean(running))})
            log(f"step {step} loss {np.mean(running):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({(last_log - t0) / step:.2f}s/step, cpu {(time.process_time() - cpu0) / 60:.1f} min, "
                f"threads {tuner.current})")
            running = []
    controlnet.eval()
    record.update({
        "steps": step,
        "minutes": round((time.time() - t0) / 60, 2),
        "cpu_minutes": round((time.process_time() - cpu0) / 60, 2),
        "history": history,
        "final_loss": float(np.mean([h["loss"] for h in history[-3:]])) if history else None,
        "thread_switches": tuner.switches,
    })
    log(f"trained {step} steps in {record['minutes']} min ({record['cpu_minutes']} CPU min)")
    save_atomic(out, controlnet, record)
    record["size_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())

    # 4. Held-out check: where do objects go, with and without the ControlNet?
    if a.eval_cases:
        import aipaint
        from aipaint.models import zoo
        from aipaint.plugin.host import create_plugin_host

        from .controlnet_layout import layout_cases, position_accuracy

        # The embedded model's settings (its zoo card), whatever folder the base was read from.
        card = zoo.find("shapes-tiny")
        params: dict[str, Any] = {"width": 32, "height": 32, **(card.defaults if card else {})}
        record["evaluation_settings"] = params
        pipe = aipaint.load(str(base), host=create_plugin_host(), family="sd15")
        scenes = layout_cases(a.eval_cases, seed=10_000 + a.seed)
        with_cn = position_accuracy(pipe, scenes, use_controlnet=True, model=out.resolve(), **params)
        without = position_accuracy(pipe, scenes, use_controlnet=False, **params)
        record["evaluation"] = {
            "cases": a.eval_cases,
            "what": "one-object scenes, prompt without position, model defaults; object found at the control image's position",
            "position_accuracy_with_controlnet": with_cn,
            "position_accuracy_without": without,
        }
        log(f"position accuracy: {with_cn:.0%} with the ControlNet, {without:.0%} without ({a.eval_cases} held-out scenes)")
    record["status"] = "finished"
    record["total_minutes"] = round((time.time() - started) / 60, 2)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if a.card:
        write_card(Path(a.card), record, out)
    log(f"done: {out} ({record['size_bytes'] / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
