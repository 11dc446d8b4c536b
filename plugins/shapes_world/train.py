"""Train the embedded default model ``shapes-tiny``: a real SD1.5-architecture
pipeline (AutoencoderKL + CLIPTextModel + UNet2DConditionModel) at toy size,
trained from scratch on the shapes world.

    python -m aipaint_plugins.shapes_world.train --out zoo/models/shapes-tiny

Phases: render a caption/image pool -> train the VAE -> encode the pool to latents
-> train UNet + text encoder together (v-prediction, zero-terminal-SNR schedule)
-> save the EMA weights in diffusers layout plus ``training.json``.
The UNet phase runs for a wall-clock budget (``--minutes``); pass ``--steps`` for a
fixed, bit-reproducible number of steps instead.

``--resume MODEL`` continues the UNet + text-encoder phase of a trained model instead
(its VAE, latent scaling and tokenizer stay as they are), on a fresh caption pool,
with its own learning rate and caption dropout; each such run is appended to the
model's ``training.json`` under ``unet_finetunes``:

    python -m aipaint_plugins.shapes_world.train --resume zoo/models/shapes-tiny --minutes 40 --lr 5e-4 --drop-text 0.2

``--normalize-channels`` gives every latent channel zero mean and unit std before the UNet
phase, folded exactly into the VAE's 1x1 quant convs (the decoder draws the same pictures;
``scaling_factor`` becomes 1), instead of one scale for the whole latent. The shipped model
does not use it: its channels' stds are 0.42 / 0.51 / 0.15 / 1.82, and a 30-minute
``--resume --normalize-channels`` run did not move the CFG peak
(``benchmarks/results/embedded_cfg_peak.txt``).

``--caption-noise P`` trains on captions that are sometimes wrong, as web alt text is: each
object's shape, colour and size is swapped for a random other value with probability P
(:func:`aipaint_plugins.shapes_world.scene.noisy_caption`; never to the held-out colour or pairs). A model so
trained is less sure of a caption than the caption deserves, so classifier-free guidance is
what makes it adhere, as for Stable Diffusion: the CFG peak moves up with P, at a cost in
adherence at low CFG (``benchmarks/results/embedded_cfg_peak.txt``). ``--caption-noise-on shape``
(a comma-separated subset of shape, colour, size) makes only those attributes uncertain.

``--vae-rgb-probe W`` adds ``W * MSE(probe(z), avgpool4(x))`` to the VAE's loss, where ``probe`` is a
learned 1x1 convolution from the latent to RGB: each latent pixel must then carry the mean colour of
its 4x4 patch linearly, as Stable Diffusion's latents roughly do (its cheap previews are such a map).
Without it the tiny VAE hides colour in a few hundredths of the latent's range and in other pixels
(the shipped latent's linear R^2 is 0.53, ``latent_rgb_r2``); the VAE records the R^2 it reached.

``--phrasings P`` replaces each training caption, with probability P, by a free phrasing of its
scene (:func:`aipaint_plugins.shapes_world.scene.free_caption`: size, position and background left out at random,
words reordered and paraphrased; the held-out arrangements ``HELDOUT_PHRASINGS`` never appear), so
the model follows how people write prompts, not only the canonical template.

``--emphasis P`` multiplies, with probability P per caption, the text encoder's output at one colour
or shape word by a weight drawn from [0.8, 1.6], as ``(red:1.3)`` does with emphasis "none", so an
emphasised word keeps its meaning.

``--schedule moderate`` trains on a v-prediction schedule whose largest sigma is 37.6 (scaled-linear
betas up to 0.017, no zero-terminal-SNR rescale) instead of the shipped zero-terminal-SNR one, whose
first sigma is 4096: Karras and Exponential sigma spacings then spend 6 and 4 of 20 steps above
sigma 13 instead of 13, and the signal left at the first step (1/37.6 of the latent) stays well
below the noise's own spread over an 8x8 latent, so the layout still comes from the prompt.

``--device cuda`` trains on an NVIDIA GPU (TF32 matrix products): the random draws (batches, noise,
timesteps, caption dropout) still come from the same CPU generators, so a GPU run sees the same batches
as a CPU run of the same arguments, but its float results differ in the last bits. ``training.json``
records the device. A GPU run's minutes are not comparable with the CPU's; pass ``--steps``.

``--state PATH`` keeps the optimiser, the raw and EMA weights, the step, the elapsed time and the
random generators there at every checkpoint; a rerun with the same arguments and ``--state``
continues from it.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from aipaint_plugins.shapes_world.render import render_array
from aipaint_plugins.shapes_world.scene import (
    IMAGE_SIZE,
    NOISY_ATTRIBUTES,
    SHAPES,
    TRAIN_COLOURS,
    Scene,
    SceneObject,
    free_caption,
    noisy_caption,
    parse_caption,
    random_scene,
)

MODEL_NAME = "shapes-tiny"

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=16,
    sample_size=IMAGE_SIZE,
)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=64,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // 4,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=16,
)
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    steps_offset=1,
)
#: The second generation's schedule: sigma 0.029 .. 37.6 (see the module docstring).
MODERATE_SCHEDULE = {**SCHEDULE, "beta_end": 0.017, "rescale_betas_zero_snr": False}
SCHEDULES = {"zero-snr": SCHEDULE, "moderate": MODERATE_SCHEDULE}
EMPHASIS_WEIGHTS = (0.8, 1.6)
EOS_ID = TEXT_CONFIG["eos_token_id"]  # also the padding token


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def resumed_schedule(model: Path) -> str:
    """The name of the schedule a trained model's UNet learned (its scheduler config's betas)."""
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    keys = ("beta_start", "beta_end", "beta_schedule", "prediction_type", "rescale_betas_zero_snr")
    for name, schedule in SCHEDULES.items():
        if all(config.get(k) == schedule[k] for k in keys):
            return name
    raise SystemExit(f"{model}: its scheduler ({', '.join(f'{k}={config.get(k)}' for k in keys)}) is none of "
                     f"{', '.join(sorted(SCHEDULES))}; pass --schedule to choose the one to continue with")


# --------------------------------------------------------------------------- data
def _render_chunk(args):
    seed, split, n = args
    rng = np.random.default_rng(seed)
    caps, imgs = [], np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i in range(n):
        s = random_scene(rng, split)
        caps.append(s.caption)
        imgs[i] = render_array(s)
    return caps, imgs


def render_pool(seed: int, split: str, n: int, workers: int = 2, chunk: int = 2000):
    jobs = [(seed * 1000 + i, split, min(chunk, n - i * chunk)) for i in range(math.ceil(n / chunk))]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(workers) as p:
            res = p.map(_render_chunk, jobs)
    else:
        res = [_render_chunk(j) for j in jobs]
    caps = [c for r in res for c in r[0]]
    imgs = np.concatenate([r[1] for r in res])
    return caps, imgs


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class ThreadTuner:
    """Pick 1 or ``max_threads`` torch threads by timing both now and then.

    The CPU here is shared: with another busy process, two spinning OpenMP threads
    can be several times slower than one. Every ``period`` steps it times
    ``probe`` steps with each thread count and keeps the faster one.
    """

    def __init__(self, max_threads: int, period: int = 150, probe: int = 6):
        self.options = sorted({1, max_threads})
        self.period, self.probe = period, probe
        self.current = max_threads
        self.times: dict[int, list[float]] = {}
        self.switches: list[tuple[int, int]] = []
        torch.set_num_threads(self.current)

    def before(self, step: int) -> None:
        if len(self.options) < 2:
            return
        phase = step % self.period
        if phase < self.probe * len(self.options):
            n = self.options[phase // self.probe]
            if phase % self.probe == 0:
                self.times[n] = []
            torch.set_num_threads(n)
        elif phase == self.probe * len(self.options):
            med = {n: float(np.median(v[1:] or v)) for n, v in self.times.items() if v}
            best = min(med, key=med.get) if med else self.current
            if best != self.current:
                self.switches.append((step, best))
            self.current = best
            torch.set_num_threads(best)

    def after(self, step: int, dt: float) -> None:
        phase = step % self.period
        if len(self.options) > 1 and phase < self.probe * len(self.options):
            self.times.setdefault(self.options[phase // self.probe], []).append(dt)


def lr_at(progress: float, step: int, warmup: int, base: float, floor: float = 0.02) -> float:
    w = min(1.0, (step + 1) / warmup)
    c = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base * w * (floor + (1 - floor) * c)


# --------------------------------------------------------------------------- saving
def build_pipeline(vae, text_encoder, unet, tokenizer, schedule: dict | None = None):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    sched = DPMSolverMultistepScheduler(**(schedule or SCHEDULE))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def fold_channel_normalization(vae, raw_latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite ``vae`` so that its latent mean has zero mean and unit std *per channel*.

    ``raw_latents`` are ``vae.encode(x).latent_dist.mean`` over a pool (N, C, h, w). The
    per-channel affine map ``z' = (z - m) / d`` is folded into the VAE's 1x1 ``quant_conv``
    (mean rows scaled and shifted, log-variance rows shifted by ``-2 log d``) and its inverse
    into ``post_quant_conv``, so the VAE keeps the standard diffusers layout and decodes
    ``z'`` exactly as it decoded ``z``. ``scaling_factor`` becomes 1. Returns ``(m, d)``.
    """
    if not getattr(vae.config, "use_quant_conv", True) or not getattr(vae.config, "use_post_quant_conv", True):
        raise ValueError("channel normalization is folded into quant_conv/post_quant_conv; this VAE has none")
    c = raw_latents.shape[1]
    m = raw_latents.mean((0, 2, 3)).double()
    d = raw_latents.std((0, 2, 3)).double()
    with torch.no_grad():
        q, pq = vae.quant_conv, vae.post_quant_conv
        w, b = q.weight.double(), q.bias.double()
        w[:c] /= d.view(-1, 1, 1, 1)
        b[:c] = (b[:c] - m) / d
        b[c:] -= 2 * torch.log(d)
        q.weight.copy_(w)
        q.bias.copy_(b)
        pw, pb = pq.weight.double(), pq.bias.double()
        pb += pw[:, :, 0, 0] @ m
        pw *= d.view(1, -1, 1, 1)
        pq.weight.copy_(pw)
        pq.bias.copy_(pb)
    vae.register_to_config(scaling_factor=1.0)
    return m.float(), d.float()


def save_atomic(out: Path, pipe, record: dict) -> None:
    """Write the pipeline to a temp dir next to ``out`` then swap it in."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    from aipaint_plugins.shapes_world.pack import pack_text_encoder

    pack_text_encoder(tmp)  # ship-size: the token table in float16
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    if old.exists():
        shutil.rmtree(old)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="zoo/models/shapes-tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=40000, help="training captions/latents")
    ap.add_argument("--vae-pool-extra", type=int, default=4000, help="extra held-out images (VAE only)")
    ap.add_argument("--vae-steps", type=int, default=1500, help="VAE steps (capped by --vae-minutes)")
    ap.add_argument("--vae-minutes", type=float, default=24.0, help="VAE wall-clock cap (shared CPUs can be slow)")
    ap.add_argument("--minutes", type=float, default=38.0, help="UNet+text-encoder wall-clock budget")
    ap.add_argument("--steps", type=int, default=0, help="fixed UNet steps (overrides --minutes)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--drop-text", type=float, default=0.1)
    ap.add_argument("--caption-noise", type=float, default=0.0,
                    help="swap each object's shape, colour and size in a training caption for a random other "
                         "value, each with this probability (see aipaint_plugins.shapes_world.scene.noisy_caption)")
    ap.add_argument("--caption-noise-on", default="shape,colour,size",
                    help="comma-separated attributes that --caption-noise swaps (default: all three)")
    ap.add_argument("--vae-rgb-probe", type=float, default=0.0,
                    help="weight of a VAE loss that makes each latent pixel a linear read of its 4x4 patch's mean "
                         "colour, as Stable Diffusion's latents roughly are (0: off, the shipped recipe)")
    ap.add_argument("--phrasings", type=float, default=0.0,
                    help="replace a training caption by a free phrasing of its scene with this probability "
                         "(aipaint_plugins.shapes_world.scene.free_caption; never a held-out arrangement)")
    ap.add_argument("--emphasis", type=float, default=0.0,
                    help="scale the encoder output at one colour or shape word of a caption by a weight in "
                         f"{list(EMPHASIS_WEIGHTS)} with this probability, as (word:w) does")
    ap.add_argument("--schedule", choices=sorted(SCHEDULES),
                    help="noise schedule: 'zero-snr' (zero terminal SNR; the default from scratch) or 'moderate' "
                         "(max sigma 37.6); with --resume the default is the resumed model's own")
    ap.add_argument("--latent-channels", type=int, default=4,
                    help="latent channels of a VAE trained from scratch (the shipped model: 4)")
    ap.add_argument("--state", help="keep the full training state here at each checkpoint and continue from it")
    ap.add_argument("--checkpoint-minutes", type=float, default=6.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N to train on an NVIDIA GPU")
    ap.add_argument("--quick", action="store_true", help="~1-minute smoke run into a temp dir")
    ap.add_argument("--resume", help="continue the UNet + text-encoder phase of this trained model folder "
                                     "(saved back to it unless --out is given)")
    ap.add_argument("--normalize-channels", action="store_true",
                    help="give every latent channel zero mean and unit std (folded into the VAE's quant convs; "
                         "scaling_factor 1) before the UNet phase; with --resume the UNet relearns the new scale")
    a = ap.parse_args(argv)
    bad = set(noise_attributes(a.caption_noise_on)) - set(NOISY_ATTRIBUTES)
    if bad:
        ap.error(f"--caption-noise-on: {', '.join(sorted(bad))} not among {', '.join(NOISY_ATTRIBUTES)}")
    if a.resume and a.vae_rgb_probe:
        ap.error("--vae-rgb-probe shapes a VAE trained from scratch; --resume keeps the model's VAE")
    if a.resume and a.latent_channels != 4:
        ap.error("--latent-channels shapes a VAE trained from scratch; --resume keeps the model's VAE")
    if a.latent_channels != 4:  # the configs are recorded in training.json and saved with the model
        VAE_CONFIG["latent_channels"] = a.latent_channels
        UNET_CONFIG["in_channels"] = UNET_CONFIG["out_channels"] = a.latent_channels
    if a.schedule is None:
        a.schedule = resumed_schedule(Path(a.resume)) if a.resume else "zero-snr"
    out_given = a.out != ap.get_default("out")
    if a.resume and not out_given:
        a.out = a.resume

    if a.quick:
        a.pool, a.vae_pool_extra, a.vae_minutes, a.minutes = 2000, 200, 0.25, 0.5
        a.vae_steps = 30
        a.warmup, a.checkpoint_minutes = 20, 100.0
        if not out_given:
            a.out = tempfile.mkdtemp(prefix="shapes-tiny-quick-")
    if a.device != "cpu":
        if not torch.cuda.is_available():
            ap.error(f"--device {a.device}: this torch sees no CUDA GPU")
        torch.set_float32_matmul_precision("high")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    t_start = time.time()

    import diffusers
    import transformers
    from aipaint_plugins.shapes_world.clip_tokenizer import build_clip_tokenizer
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import AttnProcessor

    record: dict = {
        "model": MODEL_NAME,
        "status": "in-progress",
        "command": "python -m aipaint_plugins.shapes_world.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": a.seed,
        "args": vars(a),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
        "machine": {"cpus": os.cpu_count(), "threads": a.threads, "platform": platform.platform(),
                    "device": a.device if a.device == "cpu" else torch.cuda.get_device_name(a.device)},
        "configs": {"vae": VAE_CONFIG, "text_encoder": TEXT_CONFIG, "unet": UNET_CONFIG,
                    "schedule": SCHEDULES[a.schedule]},
        "recipe": {
            "image_size": IMAGE_SIZE,
            "latent_size": IMAGE_SIZE // 4,
            "text_max_length": 77,
            "text_padding": "max_length (pad = <|endoftext|>)",
            "empty_caption_fraction": a.drop_text,
            "caption_noise": a.caption_noise,
            "caption_noise_on": a.caption_noise_on,
            "free_phrasings": a.phrasings,
            "emphasis_augmentation": a.emphasis,
            "optimizer": "AdamW(betas=(0.9, 0.999), weight_decay=0.01)",
            "lr": a.lr,
            "lr_schedule": f"linear warm-up {a.warmup} steps, cosine over the budget to 2% of lr",
            "batch": a.batch,
            "ema": f"decay min({a.ema}, (1+step)/(10+step))",
            "vae_loss": "MSE + 0.5*L1 + 1e-6*KL(per element), decoder trained on posterior samples"
                        + (f" + {a.vae_rgb_probe}*MSE(linear 1x1 probe of the latent mean, 4x4-pooled image)"
                           if a.vae_rgb_probe > 0 else ""),
            "latents": ("vae.encode(x).latent_dist.mean, each channel at zero mean / unit std (folded into the "
                        "VAE's quant convs), scaling_factor = 1" if a.normalize_channels else
                        "vae.encode(x).latent_dist.mean * scaling_factor, scaling_factor = 1/std(latents)"),
            "trained": "UNet + text encoder jointly; tokenizer is SD1.5's CLIP BPE (fixed)",
        },
        "timings_s": {},
    }
    stage = record  # where this run's UNet numbers go
    if a.resume:
        base_record = json.loads((Path(a.resume) / "training.json").read_text())
        stage = {key: record[key] for key in ("command", "seed", "args", "versions", "machine")}
        stage.update(status="in-progress", lr=a.lr, empty_caption_fraction=a.drop_text, batch=a.batch,
                     pool=a.pool, caption_noise=a.caption_noise,
                     caption_noise_on=a.caption_noise_on, free_phrasings=a.phrasings,
                     emphasis_augmentation=a.emphasis, schedule=SCHEDULES[a.schedule], timings_s={})
        base_record.setdefault("unet_finetunes", []).append(stage)
        base_record["configs"]["schedule"] = SCHEDULES[a.schedule]
        record = base_record

    # ---- 1. data
    t0 = time.time()
    caps, imgs = render_pool(a.seed, "train", a.pool, workers=min(2, a.threads))
    stage["timings_s"]["render"] = round(time.time() - t0, 1)
    tokenizer = build_clip_tokenizer()
    ids = tokenizer(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    if a.resume:
        stage["dataset"] = {"train_pool": len(caps), "unique_train_captions": len(set(caps))}
        log(f"resuming {a.resume}: rendered {len(caps)} train images ({len(set(caps))} unique captions)")
        vae = AutoencoderKL.from_pretrained(a.resume, subfolder="vae", torch_dtype=torch.float32)
        vae.set_attn_processor(AttnProcessor())
        vae.eval()
    else:
        vae = train_vae(a, record, imgs)
        record["dataset"]["unique_train_captions"] = len(set(caps))
    _train_unet(a, record, stage, vae, tokenizer, caps, imgs, ids, empty_ids, out, t_start)
    return 0


def noise_attributes(text: str) -> tuple[str, ...]:
    """``--caption-noise-on``'s comma-separated list."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def emphasis_multipliers(tok: torch.Tensor, words: list[list[int]], rng: np.random.Generator,
                         p: float) -> torch.Tensor:
    """Per-token multipliers (batch, tokens) for emphasis augmentation: with probability ``p`` per
    caption, the tokens of one occurrence of one of ``words`` (token-id sequences) get a weight drawn
    from ``EMPHASIS_WEIGHTS``, as ``(word:w)`` weights them at inference; all others stay 1."""
    mult = torch.ones(tok.shape)
    for i in range(len(tok)):
        if rng.random() >= p:
            continue
        row = tok[i].tolist()
        end = row.index(EOS_ID, 1) if EOS_ID in row[1:] else len(row)  # no word matches in the padding
        spans = [(j, len(w)) for w in words for j in range(end) if row[j : j + len(w)] == w]
        if spans:
            j, n = spans[int(rng.integers(len(spans)))]
            mult[i, j : j + n] = float(rng.uniform(*EMPHASIS_WEIGHTS))
    return mult


def latent_rgb_r2(z: torch.Tensor, x: torch.Tensor) -> float:
    """How well one linear map of a latent pixel (plus a constant) gives the mean colour of its
    4x4 image patch: the R^2 of a least-squares fit, over all pixels of ``z`` (N,C,8,8) and
    ``x`` (N,3,32,32). Stable Diffusion's latents are close to such a map (its cheap previews)."""
    feats = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    feats = torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype)], 1)
    rgb = F.avg_pool2d(x, 4).permute(0, 2, 3, 1).reshape(-1, 3).double()
    coef = torch.linalg.lstsq(feats, rgb).solution
    resid = ((feats @ coef - rgb) ** 2).sum()
    return float(1 - resid / ((rgb - rgb.mean(0)) ** 2).sum())


def train_vae(a, record, imgs):
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import AttnProcessor

    t0 = time.time()
    _, extra_c = render_pool(a.seed + 1, "heldout_combo", a.vae_pool_extra // 2, workers=min(2, a.threads))
    _, extra_o = render_pool(a.seed + 2, "heldout_colour", a.vae_pool_extra // 2, workers=min(2, a.threads))
    vae_imgs = to_tensor(np.concatenate([imgs, extra_c, extra_o]))
    dev = torch.device(a.device)
    record["dataset"] = {
        "train_pool": len(imgs),
        "vae_extra_heldout_images": int(len(extra_c) + len(extra_o)),
        "note": "held-out images (no captions) are shown to the VAE only, so it can represent orange",
    }
    record["timings_s"]["render"] += round(time.time() - t0, 1)
    log(f"rendered {len(imgs)} train images in {record['timings_s']['render']:.1f}s in all with the "
        f"{len(extra_c) + len(extra_o)} extra ones")

    # ---- 2. VAE
    vae = AutoencoderKL(**VAE_CONFIG)
    vae.set_attn_processor(AttnProcessor())
    vae.to(dev)
    params = list(vae.parameters())
    probe = None
    if a.vae_rgb_probe > 0:  # made only when asked: its init draws from the global RNG the recipe's runs rely on
        probe = torch.nn.Conv2d(VAE_CONFIG["latent_channels"], 3, 1).to(dev)  # latent pixel -> its patch's mean RGB
        params += list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=a.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed + 10)
    t0 = time.time()
    step, vae_hist, run = 0, [], []
    budget = a.vae_minutes * 60
    last_log = t0
    tuner = ThreadTuner(a.threads)
    while time.time() - t0 < budget and step < a.vae_steps:
        prog = max((time.time() - t0) / budget, step / a.vae_steps)
        ts = time.time()
        tuner.before(step)
        for pg in opt.param_groups:
            pg["lr"] = lr_at(prog, step, 100 if not a.quick else 10, a.vae_lr)
        idx = torch.randint(0, len(vae_imgs), (a.vae_batch,), generator=g)
        x = vae_imgs[idx].to(dev)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=None)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / (VAE_CONFIG["latent_channels"] * (IMAGE_SIZE // 4) ** 2)
        loss = mse + 0.5 * F.l1_loss(rec, x) + 1e-6 * kl
        if probe is not None:
            loss = loss + a.vae_rgb_probe * F.mse_loss(probe(post.mean), F.avg_pool2d(x, 4))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.append(mse.item())
        tuner.after(step, time.time() - ts)
        step += 1
        if time.time() - last_log > 30:
            last_log = time.time()
            m = float(np.mean(run))
            run = []
            vae_hist.append({"step": step, "t": round(time.time() - t0, 1), "mse": m})
            log(f"vae step {step} mse(-1..1) {m:.5f} lr {opt.param_groups[0]['lr']:.2e} threads {tuner.current}")
    vae.eval()
    # held-out evaluation of reconstruction on fresh images
    with torch.no_grad():
        _, ev = render_pool(a.seed + 99, "train", 512, workers=1)
        xe = to_tensor(ev).to(dev)
        ze = vae.encode(xe).latent_dist.mean
        rec = vae.decode(ze).sample.clamp(-1, 1)
        vae_mse = F.mse_loss(rec, xe).item()
        vae_mse01 = F.mse_loss((rec + 1) / 2, (xe + 1) / 2).item()
        rgb_r2 = latent_rgb_r2(ze.cpu(), xe.cpu())
    torch.set_num_threads(a.threads)
    record["vae"] = {"steps": step, "thread_switches": tuner.switches, "minutes": round((time.time() - t0) / 60, 2), "history": vae_hist,
                     "recon_mse_minus1_1": vae_mse, "recon_mse_0_1": vae_mse01, "latent_rgb_linear_r2": rgb_r2,
                     "params": sum(p.numel() for p in vae.parameters())}
    record["timings_s"]["vae"] = round(time.time() - t0, 1)
    log(f"VAE done: {step} steps, recon MSE {vae_mse:.5f} (-1..1) / {vae_mse01:.5f} (0..1), "
        f"latent -> 4x4-pooled RGB linear R^2 {rgb_r2:.3f}")
    return vae


def _train_unet(a, record, stage, vae, tokenizer, caps, imgs, ids, empty_ids, out, t_start):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextConfig, CLIPTextModel

    # ---- 3. encode pool
    t0 = time.time()
    dev = torch.device(a.device)
    vae.to(dev)
    lat = []
    with torch.no_grad():
        for i in range(0, len(imgs), 1000):
            lat.append(vae.encode(to_tensor(imgs[i : i + 1000]).to(dev)).latent_dist.mean.cpu())
    vae.to("cpu")  # only the saved pipeline needs it from here on
    lat = torch.cat(lat)
    std = lat.std().item()
    normalized = None
    if a.normalize_channels:
        m, d = fold_channel_normalization(vae, lat)
        lat = (lat - m.view(1, -1, 1, 1)) / d.view(1, -1, 1, 1)
        scaling = 1.0
        normalized = {"channel_mean_raw": m.tolist(), "channel_std_raw": d.tolist(),
                      "how": "z' = (z - mean) / std per channel, folded into quant_conv / post_quant_conv"}
        log(f"latent channels normalized: raw means {[round(v, 3) for v in m.tolist()]}, "
            f"stds {[round(v, 3) for v in d.tolist()]}")
    elif a.resume:  # the UNet was trained on latents at this scale: keep it
        scaling = float(vae.config.scaling_factor)
    else:
        scaling = 1.0 / std
        vae.register_to_config(scaling_factor=scaling)
    lat = lat * scaling
    lat_dev = lat.to(dev)
    stage["latents"] = {"count": len(lat), "std_raw": std, "scaling_factor": scaling,
                        "channel_normalization": normalized,
                        "channel_mean_scaled": lat.mean((0, 2, 3)).tolist(),
                        "channel_std_scaled": lat.std((0, 2, 3)).tolist()}
    stage["timings_s"]["encode"] = round(time.time() - t0, 1)
    log(f"encoded {len(lat)} latents in {time.time() - t0:.1f}s, std {std:.4f}, scaling_factor {scaling:.4f}, "
        f"channel means {[round(v, 3) for v in stage['latents']['channel_mean_scaled']]}")
    del imgs

    # ---- 4. UNet + text encoder
    torch.manual_seed(a.seed + 20)
    if a.resume:
        text_encoder = CLIPTextModel.from_pretrained(a.resume, subfolder="text_encoder", torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(a.resume, subfolder="unet", torch_dtype=torch.float32)
    else:
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.set_attn_processor(AttnProcessor())
    unet.to(dev)
    text_encoder.to(dev)
    schedule = SCHEDULES[a.schedule]
    noise_sched = DDPMScheduler(**schedule)
    acp = noise_sched.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    if not a.resume:
        record["params"] = {"unet": sum(p.numel() for p in unet.parameters()),
                            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                            "vae": record["vae"]["params"]}
        log(f"params {record['params']}")

    def snapshot_pipeline():
        # EMA weights into fresh copies of the modules
        te2 = CLIPTextModel(text_encoder.config)  # the trained modules' configs: a resumed model's
        un2 = UNet2DConditionModel.from_config(unet.config)  # latent may have other channels than UNET_CONFIG's
        with torch.no_grad():
            for p, e in zip(list(un2.parameters()) + list(te2.parameters()), ema):
                p.copy_(e)
        te2.eval()
        un2.eval()
        return build_pipeline(vae, te2, un2, tokenizer, schedule)

    g = torch.Generator().manual_seed(a.seed + 30)
    noise_rng = np.random.default_rng(a.seed + 40)
    noise_on = noise_attributes(a.caption_noise_on)
    token_cache: dict[str, torch.Tensor] = {}

    phrase_rng = np.random.default_rng(a.seed + 50)
    emphasis_rng = np.random.default_rng(a.seed + 60)
    # the words whose encoder output emphasis augmentation scales, as token sequences ("cyan" is two)
    emphasis_words = [tokenizer(w).input_ids[1:-1] for w in TRAIN_COLOURS + SHAPES]

    def caption_text(i: int) -> str:
        text = noisy_caption(caps[i], noise_rng, a.caption_noise, noise_on) if a.caption_noise > 0 else caps[i]
        if a.phrasings > 0 and phrase_rng.random() < a.phrasings:
            parsed = parse_caption(text)
            scene = Scene(parsed.background, tuple(SceneObject(*o) for o in parsed.objects))
            text = free_caption(scene, phrase_rng, "train")
        return text

    def batch_ids(idx: torch.Tensor) -> torch.Tensor:
        rows = [int(i) for i in idx]
        texts = [caption_text(i) for i in rows]  # the generators are drawn in batch order, as always
        need = {t for i, t in zip(rows, texts) if t != caps[i] and t not in token_cache}
        new = [t for t in dict.fromkeys(texts) if t in need]
        if new:  # one tokenizer call for the batch's new texts: the same ids as one call each, 2x faster
            got = tokenizer(new, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            token_cache.update(zip(new, got))
        return torch.stack([ids[i] if t == caps[i] else token_cache[t] for i, t in zip(rows, texts)])

    t0 = time.time()
    budget = a.minutes * 60
    step, hist, run = 0, [], []
    elapsed_before = 0.0  # training time of earlier processes of this run (--state)
    state_path = Path(a.state) if a.state else None
    if state_path and state_path.exists():
        st = torch.load(state_path, weights_only=True)
        with torch.no_grad():
            for p, v in zip(params, st["params"]):
                p.copy_(v)
            for e, v in zip(ema, st["ema"]):
                e.copy_(v)
        opt.load_state_dict(st["opt"])
        g.set_state(st["g"])
        noise_rng.bit_generator.state = st["noise_rng"]
        phrase_rng.bit_generator.state = st["phrase_rng"]
        emphasis_rng.bit_generator.state = st["emphasis_rng"]
        step, hist, elapsed_before = st["step"], st["history"], st["elapsed"]
        log(f"continuing from {state_path}: step {step}, {elapsed_before / 60:.1f} min trained")

    def save_state(now: float) -> None:
        tmp = state_path.with_name(state_path.name + ".tmp")
        torch.save({"step": step, "history": hist, "elapsed": elapsed_before + now - t0,
                    "params": [p.detach() for p in params], "ema": ema, "opt": opt.state_dict(),
                    "g": g.get_state(), "noise_rng": noise_rng.bit_generator.state,
                    "phrase_rng": phrase_rng.bit_generator.state,
                    "emphasis_rng": emphasis_rng.bit_generator.state}, tmp)
        os.replace(tmp, state_path)
    last_log = last_ckpt = t0
    unet.train()
    text_encoder.train()
    tuner = ThreadTuner(a.threads)
    while True:
        ts = time.time()
        tuner.before(step)
        el = elapsed_before + time.time() - t0
        if a.steps:
            if step >= a.steps:
                break
            prog = step / a.steps
        else:
            if el >= budget:
                break
            prog = el / budget
        lr = lr_at(prog, step, a.warmup, a.lr)
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(0, len(lat), (a.batch,), generator=g)
        x0 = lat_dev[idx.to(dev)]
        if a.caption_noise > 0 or a.phrasings > 0:
            tok = batch_ids(idx)
        else:
            tok = ids[idx].clone()
        drop = torch.rand(a.batch, generator=g) < a.drop_text
        tok[drop] = empty_ids[0]
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, 1000, (a.batch,), generator=g)
        ab = acp[t].view(-1, 1, 1, 1).to(dev)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        target = ab.sqrt() * noise - (1 - ab).sqrt() * x0  # v
        cond = text_encoder(tok.to(dev))[0]
        if a.emphasis > 0:
            mult = emphasis_multipliers(tok, emphasis_words, emphasis_rng, a.emphasis)
            cond = cond * mult.unsqueeze(-1).to(dev)
        pred = unet(xt, t.to(dev), encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        run.append(loss.item())
        tuner.after(step, time.time() - ts)
        step += 1
        now = time.time()
        if now - last_log > 30:
            last_log = now
            m = float(np.mean(run))
            run = []
            hist.append({"step": step, "t": round(elapsed_before + now - t0, 1), "loss": m, "lr": lr})
            log(f"unet step {step} loss {m:.4f} lr {lr:.2e} ({(elapsed_before + now - t0) / step:.3f}s/step, "
                f"{el / 60:.1f}/{a.minutes} min, threads {tuner.current})")
        if now - last_ckpt > a.checkpoint_minutes * 60:
            last_ckpt = now
            stage["unet_text"] = {"steps": step, "minutes": round((elapsed_before + now - t0) / 60, 2),
                                  "history": hist}
            stage["timings_s"]["unet_text"] = round(elapsed_before + now - t0, 1)
            torch.set_num_threads(tuner.current)
            save_atomic(out, snapshot_pipeline(), record)
            if state_path:
                save_state(now)
            log(f"checkpoint (EMA) saved to {out} at step {step}")

    trained = elapsed_before + time.time() - t0
    stage["unet_text"] = {"steps": step, "minutes": round(trained / 60, 2), "history": hist,
                           "thread_switches": tuner.switches,
                           "final_loss": float(np.mean([h["loss"] for h in hist[-3:]])) if hist else None,
                           "s_per_step": round(trained / max(1, step), 3)}
    stage["timings_s"]["unet_text"] = round(trained, 1)
    stage["timings_s"]["total"] = round(time.time() - t_start, 1)
    stage["status"] = "finished"
    pipe = snapshot_pipeline()
    save_atomic(out, pipe, record)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"done: {step} UNet steps; saved EMA pipeline to {out} ({size / 1e6:.1f} MB) in {stage['timings_s']['total'] / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
