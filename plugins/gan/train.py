"""Train the GAN: a generator and a Wasserstein critic against each other.

Two losses, as the papers wrote them:

* ``wgan`` (Arjovsky, Chintala & Bottou, 2017): the critic maximises ``E[D(real)] - E[D(fake)]``
  with its weights clipped to ``[-clip, clip]`` after every update (a crude way to keep it
  Lipschitz), RMSprop at 5e-5, five critic updates per generator update.
* ``wgan-gp`` (Gulrajani et al., 2017): no clipping; a penalty ``λ (‖∇D(x̂)‖ - 1)²`` on random
  interpolates ``x̂`` of real and fake pictures, Adam at 1e-4 with β = (0, 0.9), λ = 10, five
  critic updates per generator update.

The generator minimises ``-E[D(G(z, c))]`` in both. ``E[D(real)] - E[D(fake)]`` is the critic's
estimate of the Wasserstein distance; it and both losses are recorded every few steps in
``training.json`` (the curves the docs plot). A conditioned GAN (``condition="words"``) sees
each training caption as a bag of words of which every word is dropped with probability
``word_dropout``, so that a short request ("a red circle") asks for a subset of attributes it
has seen during training, and the rest are left to the noise.

The data are a folder of pictures with same-name ``.txt`` captions (what ``aipaint train lora``
reads), or pictures and captions in memory. Every picture is resized to 32×32.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from aipaint_plugins.gan.model import (
    CONDITIONS,
    CONFIG_FILE,
    CRITIC_FILE,
    GENERATOR_FILE,
    LOSSES,
    TRAINING_FILE,
    GANConfig,
    is_gan_folder,
)
from aipaint_plugins.gan.networks import IMAGE_SIZE, Vocabulary, init_weights

from aipaint import __version__
from aipaint.api.request import check_range
from aipaint.errors import AipaintError, InvalidParameter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: The papers' optimiser settings per loss: (learning rate, what the optimiser is).
PAPER_LEARNING_RATES = {"wgan": 5e-5, "wgan-gp": 1e-4}


@dataclass
class TrainingReport:
    """What a training run did; ``curves`` is what ``training.json`` holds under ``curves``."""

    output: Path
    loss: str
    condition: str
    steps: int
    images: int
    seconds: float
    cpu_seconds: float = 0.0
    curves: dict[str, list[float]] = field(default_factory=dict)

    @property
    def final_wasserstein(self) -> float:
        """The critic's Wasserstein estimate, averaged over the last tenth of the records."""
        values = self.curves.get("wasserstein", [])
        tail = values[-max(1, len(values) // 10):]
        return float(np.mean(tail)) if tail else float("nan")


def load_captioned_folder(data_dir: Path | str) -> tuple[list[Any], list[str]]:
    """Pictures (PIL, RGB) and their captions from a folder where every picture has a same-stem ``.txt``."""
    from PIL import Image

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InvalidParameter("data_dir", str(data_dir), "must be a folder of images with same-name .txt captions")
    paths = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise InvalidParameter("data_dir", str(data_dir), f"holds no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = [p.name for p in paths if not p.with_suffix(".txt").is_file()]
    if missing:
        raise InvalidParameter("data_dir", str(data_dir), f"has images without a caption file: {', '.join(missing[:5])}",
                               "write each caption to a .txt file with the image's name")
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images, [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in paths]


def image_tensor(images: Sequence[Any]) -> torch.Tensor:
    """Pictures as NCHW float32 in [-1, 1] at 32×32 (other sizes are resized, area-averaged)."""
    from PIL import Image

    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
        arrays.append(np.asarray(image, dtype=np.float32))
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def train_gan(
    data: Path | str | tuple[Sequence[Any], Sequence[str]],
    output: Path | str,
    *,
    loss: str = "wgan-gp",
    condition: str = "words",
    steps: int | None = None,
    minutes: float | None = None,
    batch_size: int = 64,
    learning_rate: float | None = None,
    n_critic: int = 5,
    clip_value: float = 0.01,
    gp_weight: float = 10.0,
    word_dropout: float = 0.5,
    z_dim: int = 64,
    channels: int = 32,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_record: Callable[[dict[str, float]], None] | None = None,
) -> TrainingReport:
    """Train a GAN on ``data`` and save it as a model folder at ``output``.

    ``steps`` counts generator updates (each after ``n_critic`` critic updates); ``minutes`` caps
    the wall-clock time; with both, whichever comes first stops training; with neither, 2000
    steps. ``learning_rate`` defaults to the paper's for the loss (:data:`PAPER_LEARNING_RATES`).
    ``progress(done, total)`` counts steps, or whole seconds when only ``minutes`` is given;
    ``on_record(record)`` gets every loss record as it is made.
    """
    # 1. Check the settings before any work.
    if loss not in LOSSES:
        raise InvalidParameter("loss", loss, f"must be one of {', '.join(LOSSES)}")
    if condition not in CONDITIONS:
        raise InvalidParameter("condition", condition, f"must be one of {', '.join(CONDITIONS)}")
    if steps is None and minutes is None:
        steps = 2000
    if steps is not None:
        check_range("steps", steps, 1, 10_000_000, int)
    if minutes is not None:
        check_range("minutes", minutes, 0.001, 100_000.0, float)
    check_range("batch_size", batch_size, 2, 4096, int)
    check_range("n_critic", n_critic, 1, 100, int)
    check_range("clip_value", clip_value, 1e-6, 10.0, float)
    check_range("gp_weight", gp_weight, 0.0, 1e4, float)
    check_range("word_dropout", word_dropout, 0.0, 0.99, float)
    check_range("z_dim", z_dim, 1, 4096, int)
    check_range("channels", channels, 1, 1024, int)
    lr = PAPER_LEARNING_RATES[loss] if learning_rate is None else learning_rate
    check_range("learning_rate", lr, 1e-8, 1.0, float)
    output = Path(output)
    check_output(output, overwrite)

    # 2. The data: pictures in [-1, 1], captions as multi-hot word vectors.
    images, captions = load_captioned_folder(data) if isinstance(data, (str, Path)) else data
    if len(images) != len(captions) or not images:
        raise InvalidParameter("data", f"{len(images)} images, {len(captions)} captions",
                               "must be as many captions as images, at least one")
    pixels = image_tensor(images)
    vocab = Vocabulary.from_captions(captions) if condition == "words" else Vocabulary(())
    if condition == "words" and not len(vocab):
        raise InvalidParameter("condition", condition, "needs captions with words; these have none",
                               "train with condition='none'")
    words = vocab.encode(list(captions)) if condition == "words" else None
    config = GANConfig(z_dim=z_dim, channels=channels, condition=condition, vocabulary=vocab.words, loss=loss)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator, critic = config.build_generator(), config.build_critic()
        init_weights(generator)
        init_weights(critic)
        # 3. The optimisers the papers use.
        if loss == "wgan":
            opt_g = torch.optim.RMSprop(generator.parameters(), lr=lr)
            opt_c = torch.optim.RMSprop(critic.parameters(), lr=lr)
        else:
            opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.0, 0.9))
            opt_c = torch.optim.Adam(critic.parameters(), lr=lr, betas=(0.0, 0.9))
        rng = torch.Generator().manual_seed(seed)
        curves: dict[str, list[float]] = {k: [] for k in ("step", "seconds", "critic_loss", "generator_loss",
                                                            "wasserstein", "gradient_penalty")}
        log_every = max(1, (steps or 2000) // 250) if steps is not None else 10
        window: dict[str, list[float]] = {k: [] for k in ("critic_loss", "generator_loss", "wasserstein",
                                                           "gradient_penalty")}
        started, cpu_started = time.perf_counter(), time.process_time()
        deadline = started + minutes * 60 if minutes is not None else math.inf
        step = 0
        generator.train()
        critic.train()

        def batch() -> tuple[torch.Tensor, torch.Tensor | None]:
            index = torch.randint(len(pixels), (batch_size,), generator=rng)
            if words is None:
                return pixels[index], None
            keep = (torch.rand(batch_size, words.shape[1], generator=rng) >= word_dropout).float()
            return pixels[index], words[index] * keep

        # 4. The loop: n_critic critic updates, then one generator update.
        while (steps is None or step < steps) and time.perf_counter() < deadline:
            for _ in range(n_critic):
                real, cond = batch()
                z = torch.randn(batch_size, z_dim, generator=rng)
                with torch.no_grad():
                    fake = generator(z, cond)
                real_score, fake_score = critic(real, cond).mean(), critic(fake, cond).mean()
                critic_loss = fake_score - real_score
                penalty = torch.zeros(())
                if loss == "wgan-gp":
                    penalty = gradient_penalty(critic, real, fake, cond, rng)
                    critic_loss = critic_loss + gp_weight * penalty
                opt_c.zero_grad(set_to_none=True)
                critic_loss.backward()
                opt_c.step()
                if loss == "wgan":
                    with torch.no_grad():
                        for p in critic.parameters():
                            p.clamp_(-clip_value, clip_value)
                window["critic_loss"].append(critic_loss.item())
                window["wasserstein"].append((real_score - fake_score).item())
                window["gradient_penalty"].append(penalty.item())
            _, cond = batch()
            z = torch.randn(batch_size, z_dim, generator=rng)
            generator_loss = -critic(generator(z, cond), cond).mean()
            opt_g.zero_grad(set_to_none=True)
            generator_loss.backward()
            opt_g.step()
            window["generator_loss"].append(generator_loss.item())
            step += 1
            if not all(math.isfinite(v[-1]) for v in window.values()):
                raise AipaintError(f"GAN training diverged at step {step} (a loss is not finite); nothing saved. "
                                   "Try a lower learning_rate")
            if step % log_every == 0:
                record = {"step": float(step), "seconds": time.perf_counter() - started,
                          **{k: float(np.mean(v)) for k, v in window.items()}}
                for k, v in record.items():
                    curves[k].append(v)
                window = {k: [] for k in window}
                if on_record is not None:
                    on_record(record)
            if progress is not None:
                if steps is not None:
                    progress(step, steps)
                else:
                    progress(min(int(time.perf_counter() - started), int(minutes * 60)), int(minutes * 60))
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

    # 5. Save: weights (safetensors), config, curves; written next to the target, then moved in place.
    report = TrainingReport(output=output, loss=loss, condition=condition, steps=step, images=len(images),
                            seconds=seconds, cpu_seconds=cpu_seconds, curves=curves)
    training = {
        "aipaint": __version__, "loss": loss, "condition": condition, "steps": step, "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2), "images": len(images), "batch_size": batch_size, "learning_rate": lr,
        "n_critic": n_critic,
        "clip_value": clip_value if loss == "wgan" else None, "gp_weight": gp_weight if loss == "wgan-gp" else None,
        "word_dropout": word_dropout if condition == "words" else None, "seed": seed,
        "optimiser": "RMSprop" if loss == "wgan" else "Adam(0.0, 0.9)", "curves": curves,
    }
    save_folder(output, config, generator, critic, training, overwrite=overwrite)
    return report


def check_output(output: Path, overwrite: bool) -> None:
    """:class:`InvalidParameter` unless ``output`` is free, or ``overwrite`` and it is an empty folder or
    a GAN folder (the only folders replacing may delete)."""
    if not output.exists():
        return
    if not overwrite:
        raise InvalidParameter("output", str(output), "exists already", "choose a new folder or pass overwrite")
    if not output.is_dir() or not (is_gan_folder(output) or not any(output.iterdir())):
        raise InvalidParameter("output", str(output), "exists and is not a GAN model folder; only a GAN folder or "
                               "an empty folder is replaced")


def gradient_penalty(critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor, cond: torch.Tensor | None,
                     rng: torch.Generator) -> torch.Tensor:
    """``E[(‖∇D(x̂)‖₂ - 1)²]`` at random points ``x̂`` between real and fake pictures (WGAN-GP)."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=rng)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    score = critic(mixed, cond)
    (grad,) = torch.autograd.grad(score.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def save_folder(output: Path, config: GANConfig, generator: torch.nn.Module, critic: torch.nn.Module,
                training: dict[str, Any], *, overwrite: bool = False) -> None:
    """Write a complete model folder at ``output``, never a half-written one."""
    from safetensors.torch import save_file

    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        save_file({k: v.detach().contiguous() for k, v in generator.state_dict().items()},
                  str(staging / GENERATOR_FILE), metadata={"format": "pt"})
        save_file({k: v.detach().contiguous() for k, v in critic.state_dict().items()},
                  str(staging / CRITIC_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n", encoding="utf-8")
        (staging / TRAINING_FILE).write_text(json.dumps(training) + "\n", encoding="utf-8")
        if output.exists():
            check_output(output, overwrite)
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
