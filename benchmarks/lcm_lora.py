"""Distil an LCM-LoRA for the embedded model and measure how few LCM steps reach its 20-step adherence (issue 22).

Training follows diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py, shrunk to the
embedded model (32x32 images, 8x8 latents, v-prediction, zero-terminal SNR):

  * data: shapes-world scenes (``aipaint_plugins.shapes_world.scene.random_scene``, the captions its training
    uses), rendered (``render.render_array``) and encoded once with the model's VAE; the frozen CLIP text
    encoder's conditioning of each caption and of the empty prompt, once;
  * student: a peft LoRA on the UNet's attention and linear layers (to_q/k/v/out.0, proj_in/out, ff,
    time_emb_proj); teacher: the frozen embedded UNet with classifier-free guidance
    ``x0 = x0_c + w (x0_c - x0_u)`` (effective CFG ``w + 1``; ``w`` uniform in [--w-min, --w-max]);
  * DDIM solver over the 50-step skipping schedule (timesteps 19, 39, ..., 999: LCMScheduler's
    ``original_inference_steps``), one skip ``k = 20`` from ``t_n`` to ``t_{n-k}``;
  * boundary conditions ``c_skip = s^2 / ((10 t)^2 + s^2)``, ``c_out = 10 t / sqrt((10 t)^2 + s^2)`` with
    ``s = 0.5`` (LCMScheduler's ``get_scalings_for_boundary_condition_discrete``);
  * x0 and eps from the v-prediction: ``x0 = a x - s v``, ``eps = a v + s x`` (``a``, ``s``: sqrt of
    alpha_cumprod and of 1 - alpha_cumprod, from the model's own LCMScheduler, zero-terminal SNR included);
  * target: the same LoRA student at ``(x_{t_{n-k}}, t_{n-k})``, no gradient, no EMA (as the LoRA script);
    Huber loss (c = 0.001).

The LoRA is saved with kohya keys (as ``aipaint train lora`` writes), so ``<lora:NAME:1>`` with
``options={"lora": {"folder": ...}}`` or ``apply_loras`` load it.

``--eval`` scores (prompt, seed) pairs of canonical training captions (benchmarks/embedded_model.py's
``captions`` and ``score_list``; seeds 1000 + i): the base model at its defaults (the card's: DPM++ 2M, 20 steps, CFG 3),
the base model with the LCM sampler at 1/2/4/8 steps (its default CFG), and the LCM-LoRA with the LCM
sampler at 1/2/4/8 steps at CFG 1 and 1.5, each with its warm wall time per image.

Usage: OMP_NUM_THREADS=1 python benchmarks/lcm_lora.py --minutes 20 --out lcm.safetensors --eval --n 100
       python benchmarks/lcm_lora.py --eval-only --lora lcm.safetensors --n 100
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "time_emb_proj")
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- pure functions
def boundary_scalings(timesteps: torch.Tensor, sigma_data: float = SIGMA_DATA,
                      timestep_scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's c_skip and c_out at (discrete) ``timesteps`` (LCMScheduler's boundary condition)."""
    scaled = timesteps.double() * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip.float(), c_out.float()


def ddim_timesteps(num_train_timesteps: int = 1000, original_steps: int = 50) -> torch.Tensor:
    """The skipping schedule LCMScheduler samples from: k - 1, 2k - 1, ..., T - 1 (k = T / original_steps)."""
    k = num_train_timesteps // original_steps
    return torch.arange(1, original_steps + 1) * k - 1


def x0_and_eps(v: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
    """x0 and eps implied by a v-prediction ``v`` at noisy ``x`` (alpha, sigma broadcastable)."""
    return alpha * x - sigma * v, alpha * v + sigma * x


def _bc(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1))).to(like)


# --------------------------------------------------------------------------- data
def build_data(model, n: int, seed: int, batch: int = 64):
    from aipaint_plugins.shapes_world.render import render_array
    from aipaint_plugins.shapes_world.scene import random_scene

    from aipaint.prompt import PromptEncoder

    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, "train") for _ in range(n)]
    caps = [s.caption for s in scenes]
    pixels = torch.from_numpy(np.stack([render_array(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
    encoder = PromptEncoder(model.tokenizer, model.text_encoder)
    with torch.no_grad():
        latents = torch.cat([model.encode(pixels[i:i + batch]).float() for i in range(0, n, batch)])
        cond = torch.cat([encoder.encode(c).float() for c in caps])
        uncond = encoder.encode("").float()
    return caps, latents, cond, uncond


def lora_unet(unet, rank: int, alpha: float):
    import copy

    from aipaint_plugins.lora.train import ADAPTER_NAME
    from peft import LoraConfig, inject_adapter_in_model

    student = copy.deepcopy(getattr(unet, "_orig_mod", unet)).float()
    student.requires_grad_(False)
    targets = [t for t in UNET_TARGETS if any(n.endswith(t) for n, _ in student.named_modules())]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    return inject_adapter_in_model(config, student, adapter_name=ADAPTER_NAME), targets


# --------------------------------------------------------------------------- training
def train(a) -> dict:
    from aipaint_plugins.lora.train import _kohya_state, _save_atomic
    from diffusers import LCMScheduler

    import aipaint

    torch.manual_seed(a.seed)
    pipe = aipaint.load()
    model = pipe.model
    cfg = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    sched = LCMScheduler.from_config(cfg, original_inference_steps=a.original_steps)
    assert sched.config.prediction_type == "v_prediction", sched.config.prediction_type
    ac = sched.alphas_cumprod.float()
    alpha_s, sigma_s = ac.sqrt(), (1 - ac).sqrt()
    T = int(sched.config.num_train_timesteps)
    solver_t = ddim_timesteps(T, a.original_steps)
    skip = T // a.original_steps

    t0 = time.perf_counter()
    caps, latents, cond, uncond = build_data(model, a.pool, a.seed)
    log(f"data: {len(caps)} renders encoded to {tuple(latents.shape[1:])} latents (std {latents.std():.3f}), "
        f"conditioning {tuple(cond.shape[1:])}, {time.perf_counter() - t0:.1f} s")

    teacher = getattr(model.unet, "_orig_mod", model.unet).float().eval()
    teacher.requires_grad_(False)
    student, targets = lora_unet(model.unet, a.rank, a.alpha or a.rank)
    params = [p for p in student.parameters() if p.requires_grad]
    log(f"LoRA rank {a.rank} on {targets}: {sum(p.numel() for p in params)} parameters "
        f"(UNet {sum(p.numel() for p in teacher.parameters())})")
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(a.seed)
    losses: list[float] = []
    started = time.perf_counter()
    step = 0
    student.train()
    while step < a.steps and time.perf_counter() - started < a.minutes * 60:
        idx = torch.randint(0, len(caps), (a.batch,), generator=gen)
        x0 = latents[idx]
        c = cond[idx]
        u = uncond.expand_as(c)
        noise = torch.randn(x0.shape, generator=gen)
        n_idx = torch.randint(0, a.original_steps, (a.batch,), generator=gen)
        t_n = solver_t[n_idx]
        t_prev = (t_n - skip).clamp(min=0)
        csk_n, cout_n = boundary_scalings(t_n)
        csk_p, cout_p = boundary_scalings(t_prev)
        al_n, si_n = _bc(alpha_s[t_n], x0), _bc(sigma_s[t_n], x0)
        al_p, si_p = _bc(alpha_s[t_prev], x0), _bc(sigma_s[t_prev], x0)
        x_n = al_n * x0 + si_n * noise
        w = torch.empty(a.batch).uniform_(a.w_min, a.w_max, generator=gen)
        w = _bc(w, x0)

        # online student at t_n
        v = student(x_n, t_n, encoder_hidden_states=c, return_dict=False)[0]
        pred_x0, _ = x0_and_eps(v, x_n, al_n, si_n)
        model_pred = _bc(csk_n, x0) * x_n + _bc(cout_n, x0) * pred_x0

        with torch.no_grad():
            # teacher with CFG, one DDIM step t_n -> t_{n-k}
            vv = teacher(torch.cat([x_n, x_n]), torch.cat([t_n, t_n]),
                         encoder_hidden_states=torch.cat([c, u]), return_dict=False)[0]
            v_c, v_u = vv.chunk(2)
            x0_c, eps_c = x0_and_eps(v_c, x_n, al_n, si_n)
            x0_u, eps_u = x0_and_eps(v_u, x_n, al_n, si_n)
            g_x0 = x0_c + w * (x0_c - x0_u)
            g_eps = eps_c + w * (eps_c - eps_u)
            x_prev = al_p * g_x0 + si_p * g_eps
            # target: the same student at t_{n-k}
            student.eval()
            tv = student(x_prev, t_prev, encoder_hidden_states=c, return_dict=False)[0]
            student.train()
            t_x0, _ = x0_and_eps(tv, x_prev, al_p, si_p)
            target = _bc(csk_p, x0) * x_prev + _bc(cout_p, x0) * t_x0

        if a.loss == "huber":
            loss = (torch.sqrt((model_pred - target) ** 2 + a.huber_c ** 2) - a.huber_c).mean()
        else:
            loss = F.mse_loss(model_pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % a.log_every == 0 or step == 1:
            el = time.perf_counter() - started
            log(f"step {step}: loss {np.mean(losses[-a.log_every:]):.5f} ({el:.0f} s, {el / step:.2f} s/step)")
    seconds = time.perf_counter() - started
    state = _kohya_state(student, "unet", float(a.alpha or a.rank))
    out = Path(a.out)
    _save_atomic(state, out, {"ss_network_module": "networks.lora", "ss_network_dim": str(a.rank),
                              "ss_network_alpha": f"{a.alpha or a.rank:g}", "ss_steps": str(step),
                              "ss_training_comment": "LCM-LoRA distilled by benchmarks/lcm_lora.py"})
    size = out.stat().st_size
    log(f"trained {step} steps in {seconds:.0f} s; loss first 10% {np.mean(losses[:max(1, step // 10)]):.5f}, "
        f"last 10% {np.mean(losses[-max(1, step // 10):]):.5f}; saved {out} ({size / 1e6:.2f} MB, "
        f"{sum(1 for k in state if k.endswith('.alpha'))} modules)")
    return {"steps": step, "seconds": seconds, "first_loss": float(np.mean(losses[:max(1, step // 10)])),
            "last_loss": float(np.mean(losses[-max(1, step // 10):])), "bytes": size, "targets": targets}


# --------------------------------------------------------------------------- evaluation
def evaluate(a, lora: Path) -> list[dict]:
    from aipaint_plugins.lora import apply_loras
    from aipaint_plugins.shapes_world.evaluate import summarize
    from embedded_model import captions, embedded_pipe, score_list

    pipe = embedded_pipe()
    caps = captions(a.n, "train", seed=1000)
    pipe.txt2img(caps[0], seed=1)  # warm-up
    rows: list[dict] = []

    def run(label: str, **params) -> None:
        t = time.perf_counter()
        s = summarize(score_list(pipe, caps, seed=1000, **params))
        per = (time.perf_counter() - t) / len(caps)
        rows.append({"label": label, "score": s["score"], "all": s["all_correct"], "sec": per, "n": s["n"]})
        log(f"{label:<44} adherence {s['score']:.1%}  all correct {s['all_correct']:.1%}  {per:.3f} s/image")

    d = pipe.model.defaults
    run(f"base, {d.sampler}, {d.steps} steps, CFG {d.cfg_scale:g} (defaults)")
    for steps in (1, 2, 4, 8):
        run(f"base, LCM, {steps} steps, CFG {d.cfg_scale:g}", sampler="LCM", steps=steps)
    with apply_loras(pipe, [(lora.stem, 1.0)], folder=str(lora.parent)):
        for cfg in a.lora_cfgs:
            for steps in (1, 2, 4, 8):
                run(f"LCM-LoRA, LCM, {steps} steps, CFG {cfg:g}", sampler="LCM", steps=steps, cfg_scale=cfg)
    return rows


def check_loads(lora: Path) -> None:
    """The LoRA file through aipaint's LoRA plugin: the prompt tag changes the image; nothing unmatched."""
    import aipaint

    pipe = aipaint.load()
    cap = "a big red circle in the middle, on a white background"
    base = np.asarray(pipe.txt2img(cap, seed=3, sampler="LCM", steps=4, cfg_scale=1).image, np.float32)
    tagged = pipe.txt2img(f"{cap} <lora:{lora.stem}:1>", seed=3, sampler="LCM", steps=4, cfg_scale=1,
                          options={"lora": {"folder": str(lora.parent)}})
    diff = float(np.abs(np.asarray(tagged.image, np.float32) - base).mean())
    warn = [w for w in getattr(tagged, "warnings", []) or []]
    log(f"load check: <lora:{lora.stem}:1> changes the image by {diff:.2f}/255 on average; warnings: {warn}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="training wall-time budget")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--w-min", type=float, default=1.0, help="teacher guidance w (CFG w + 1)")
    ap.add_argument("--w-max", type=float, default=3.0)
    ap.add_argument("--original-steps", type=int, default=50)
    ap.add_argument("--loss", choices=("huber", "l2"), default="huber")
    ap.add_argument("--huber-c", type=float, default=0.001)
    ap.add_argument("--pool", type=int, default=4000, help="renders (and captions) to distil on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lcm_lora_shapes_tiny.safetensors"))
    ap.add_argument("--eval", action="store_true", help="after training, score and time (see the docstring)")
    ap.add_argument("--eval-only", action="store_true", help="score --lora (or --out) without training")
    ap.add_argument("--lora", help="the LoRA file to score with --eval-only")
    ap.add_argument("--n", type=int, default=100, help="(prompt, seed) pairs")
    ap.add_argument("--lora-cfgs", type=float, nargs="+", default=[1.0, 1.5])
    ap.add_argument("--results", help="write the results here (with the command)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    command = "python benchmarks/lcm_lora.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    lines = [f"# {command}", f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                             f"{torch.get_num_threads()} torch thread(s), shared 2-core CPU"]
    lora = Path(a.lora or a.out)
    if not a.eval_only:
        r = train(a)
        lines.append(f"training: {r['steps']} steps (batch {a.batch}, lr {a.lr:g}, rank {a.rank}, w in "
                     f"[{a.w_min:g}, {a.w_max:g}] i.e. teacher CFG {a.w_min + 1:g}-{a.w_max + 1:g}, {a.loss} loss, "
                     f"{a.pool} renders) in {r['seconds'] / 60:.1f} min; loss first 10% {r['first_loss']:.5f}, "
                     f"last 10% {r['last_loss']:.5f}; LoRA file {r['bytes'] / 1e6:.2f} MB ({r['targets']})")
        check_loads(lora)
    if a.eval or a.eval_only:
        rows = evaluate(a, lora)
        base20 = rows[0]["score"]
        lines.append(f"adherence on {a.n} (prompt, seed) pairs: canonical training captions, seeds 1000 + i "
                     "(benchmarks/embedded_model.py's captions/score_list); warm wall time per image incl. scoring")
        lines.append(f"{'setting':<46}{'attributes':>11}{'all right':>11}{'s/image':>9}")
        for r in rows:
            lines.append(f"{r['label']:<46}{r['score']:>11.1%}{r['all']:>11.1%}{r['sec']:>9.3f}")
        for cfg in a.lora_cfgs:
            hit = [r for r in rows if r["label"].startswith("LCM-LoRA") and r["label"].endswith(f"CFG {cfg:g}")
                   and r["score"] >= base20]
            steps = hit[0]["label"].split(", ")[2] if hit else None
            lines.append(f"LCM-LoRA at CFG {cfg:g}: " + (f"reaches the 20-step adherence ({base20:.1%}) at {steps}"
                                                          if steps else
                                                          f"does not reach the 20-step adherence ({base20:.1%}) "
                                                          "at 1-8 steps"))
    text = "\n".join(lines)
    print(text)
    if a.results:
        Path(a.results).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
