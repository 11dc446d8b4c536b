"""How far apart a model's VAE puts pictures that differ in one attribute, against the noise level.

Colour that the latent holds as a small signal is settled only in the last sampling steps (img2img
strength, prompt editing and CFG then act on it late). This encodes pairs of renders of the shapes
world that differ in one attribute (colour, background, shape, position) and prints the RMS distance
of their latents at the model's scale, next to the model's sigmas at 20 steps: a difference is
visible to the sampler from roughly the step whose sigma falls to its size.

    python benchmarks/latent_separation.py [--model zoo/models/shapes-tiny] [--model /other/model]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def scenes():
    from aipaint_plugins.shapes_world.scene import POSITIONS, Scene, SceneObject

    def one(colour="red", shape="circle", background="white", position="center", size="big"):
        cx, cy = POSITIONS[position]
        return Scene(background, (SceneObject(shape, colour, size, position, cx, cy, 13.0 if size == "big" else 8.0),))

    return {
        "colour: red vs blue": (one(colour="red"), one(colour="blue")),
        "colour: red vs green": (one(colour="red"), one(colour="green")),
        "colour: cyan vs blue": (one(colour="cyan"), one(colour="blue")),
        "shape: circle vs square": (one(shape="circle"), one(shape="square")),
        "position: left vs right": (one(position="left"), one(position="right")),
        "background: white vs gray": (one(background="white"), one(background="gray")),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from aipaint_plugins.shapes_world.render import render
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler

    for model in a.model or ["zoo/models/shapes-tiny"]:
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval()
        sched = DPMSolverMultistepScheduler.from_pretrained(model, subfolder="scheduler")
        sched.set_timesteps(20)
        alphas = sched.alphas_cumprod.numpy()
        ts = sched.timesteps.numpy()
        sigmas = np.sqrt((1 - alphas[ts]) / alphas[ts])
        scale = vae.config.scaling_factor
        print(f"model {model}: latent {vae.config.latent_channels} channels, scaling_factor {scale:.4f}")
        print("  sigmas at 20 steps: " + " ".join(f"{s:.3g}" for s in sigmas))
        for name, (a_scene, b_scene) in scenes().items():
            x = torch.stack([torch.from_numpy(np.asarray(render(s), np.float32) / 127.5 - 1).permute(2, 0, 1)
                             for s in (a_scene, b_scene)])
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mean * scale
            d = float((z[0] - z[1]).pow(2).mean().sqrt())
            later = int((sigmas > d).sum())
            print(f"  {name:28s} latent RMS distance {d:6.3f}  (above the sigma from step {later} of 20)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
