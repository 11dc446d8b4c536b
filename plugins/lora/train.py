"""Train a LoRA on a folder of captioned images, with peft, and save it in the kohya / A1111 format.

The data folder holds images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``) and, for each, a
caption with the same stem (``cat1.png`` + ``cat1.txt``). Training follows the model's
own noise schedule and prediction type (epsilon, v-prediction, zero-terminal SNR) by
building a ``DDPMScheduler`` from the model's scheduler config, so the LoRA learns
what the sampler will later ask of it. The UNet (and the text encoder, if asked) is
copied before peft injects its layers: the loaded model is never modified.

The file written uses kohya's keys (``lora_unet_…_to_q.lora_down.weight``,
``.lora_up.weight``, ``.alpha``) so A1111, ComfyUI and kohya's tools read it, and aipaint
loads it back through the LoRA folder.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.plugin.kit.kohya import kohya_state
from aipaint.plugin.kit.training import (
    LORA_TARGETS,
    check_lr_schedule,
    learning_rate_schedule,
    loss_target,
    noise_scheduler,
    peft_lora_copy,
    square_image_tensor,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
UNET_TARGETS, TEXT_ENCODER_TARGETS = LORA_TARGETS["attention"]
ADAPTER_NAME = "aipaint_train"
Progress = Callable[[int, int, float], None]


@dataclass
class TrainReport:
    """What a training run did: the file, the loss curve, the size of the LoRA."""

    output: Path
    steps: int
    images: int
    seconds: float
    rank: int
    alpha: float
    modules: int
    losses: list[float] = field(default_factory=list)

    def _mean(self, values: Sequence[float]) -> float:
        return float(sum(values) / len(values)) if values else float("nan")

    @property
    def first_loss(self) -> float:
        """Mean loss of the first tenth of the steps."""
        return self._mean(self.losses[: max(1, len(self.losses) // 10)])

    @property
    def final_loss(self) -> float:
        """Mean loss of the last tenth of the steps."""
        return self._mean(self.losses[-max(1, len(self.losses) // 10):])


def load_captioned_images(data_dir: Path | str) -> tuple[list[Path], list[str]]:
    """Image files and their captions; every image needs a same-stem ``.txt`` file."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InvalidParameter("data_dir", str(data_dir), "must be a folder of images with same-name .txt captions")
    images = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InvalidParameter("data_dir", str(data_dir), f"holds no images ({', '.join(IMAGE_SUFFIXES)})")
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise InvalidParameter(
            "data_dir", str(data_dir), f"has images without a caption file: {', '.join(missing[:5])}",
            "write each caption to a .txt file with the image's name",
        )
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]
    return images, captions


def _kohya_state(module: torch.nn.Module, component: str, alpha: float) -> dict[str, torch.Tensor]:
    """This trainer's peft LoRA tensors under kohya keys (lora_A → lora_down, lora_B → lora_up, plus
    alpha); also what benchmarks/lcm_lora.py saves its student with."""
    return kohya_state(module, component, alpha, adapter_name=ADAPTER_NAME)


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="step", file=sys.stderr, desc="train lora", dynamic_ncols=True)


def train_lora(
    model_or_pipeline: Any,
    data_dir: Path | str,
    out_file: Path | str,
    *,
    rank: int = 4,
    alpha: float | None = None,
    steps: int = 500,
    learning_rate: float = 1e-4,
    batch_size: int = 4,
    resolution: int | None = None,
    seed: int = 0,
    train_text_encoder: bool = False,
    text_encoder_learning_rate: float | None = None,
    lr_scheduler: str = "constant",
    lr_warmup_steps: int = 0,
    unet_targets: Sequence[str] = UNET_TARGETS,
    text_encoder_targets: Sequence[str] = TEXT_ENCODER_TARGETS,
    progress: Progress | None = None,
    show_progress: bool = False,
    metadata: dict[str, str] | None = None,
) -> TrainReport:
    """Train a LoRA on ``data_dir`` and write it to ``out_file`` (kohya keys). The model is not modified.

    ``alpha`` defaults to ``rank`` (scale 1). ``lr_scheduler`` is diffusers' (and kohya's) schedule
    name, ``lr_warmup_steps`` its linear warm-up from 0 (see
    :func:`aipaint.plugin.kit.training.learning_rate_schedule`). ``progress(step, steps, loss)`` is
    called after every step; ``show_progress`` draws a tqdm bar with the running loss on stderr.
    """
    model = getattr(model_or_pipeline, "model", model_or_pipeline)
    if getattr(model, "text_encoder_2", None) is not None or model.text_encoder is None:
        raise UnsupportedFeature(
            f"LoRA training supports models with one text encoder (SD1.x, SD2.x), not {model.name!r} "
            f"(family {model.family}, with a second text encoder and added conditioning); train SDXL LoRAs with "
            "kohya's sd-scripts or diffusers' SDXL script, whose files aipaint loads"
        )
    for name, value, low in (("rank", rank, 1), ("steps", steps, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidParameter(name, value, f"must be a whole number of at least {low}")
    if not (isinstance(learning_rate, (int, float)) and 0 < learning_rate < 1):
        raise InvalidParameter("learning_rate", learning_rate, "must be a number between 0 and 1", "1e-4 is a common start")
    lr_scheduler = check_lr_schedule(lr_scheduler, lr_warmup_steps, steps)
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise InvalidParameter("alpha", alpha, "must be a positive number", "the LoRA's scale is alpha / rank")
    out_file = Path(out_file)
    if out_file.suffix != ".safetensors":
        raise InvalidParameter("out_file", str(out_file), "must end in .safetensors")
    size = int(resolution or model.defaults.width)
    if size % model.vae_scale_factor:
        raise InvalidParameter("resolution", size, f"must be a multiple of {model.vae_scale_factor} for this model")

    started = time.perf_counter()
    paths, captions = load_captioned_images(data_dir)
    device = model.device
    generator = torch.Generator("cpu").manual_seed(seed)

    # 1. Latents of the images, once (the VAE does not train).
    with torch.no_grad():
        pixels = square_image_tensor(paths, size)
        latents = torch.cat([model.encode(pixels[i : i + 16]).float() for i in range(0, len(pixels), 16)])

    # 2. Trainable copies with peft LoRA layers; the loaded model stays untouched.
    from aipaint.prompt import PromptEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = peft_lora_copy(model.unet, unet_targets, rank, alpha, adapter_name=ADAPTER_NAME).to(device)
        text_encoder = (peft_lora_copy(model.text_encoder, text_encoder_targets, rank, alpha, adapter_name=ADAPTER_NAME)
                        .to(device) if train_text_encoder else None)
    encoder = PromptEncoder(model.tokenizer, text_encoder if text_encoder is not None else model.text_encoder)
    chunks = max(len(encoder.count_tokens(c)) for c in captions)
    fixed_conditioning = None
    if text_encoder is None:
        with torch.no_grad():
            fixed_conditioning = torch.cat([encoder.encode(c, min_chunks=chunks).float() for c in captions])

    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": learning_rate}]
    if text_encoder is not None:
        groups.append(
            {"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": text_encoder_learning_rate or learning_rate}
        )
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-2)
    rates = learning_rate_schedule(optimizer, lr_scheduler, warmup_steps=lr_warmup_steps, total_steps=steps)
    scheduler = noise_scheduler(model)
    train_steps = int(scheduler.config.num_train_timesteps)

    # 3. The loop: noise at a random timestep, predict what the model predicts, MSE.
    unet.train()
    if text_encoder is not None:
        text_encoder.train()
    bar = _progress_bar(steps) if show_progress else None
    losses: list[float] = []
    try:
        for step in range(steps):
            index = torch.randint(0, len(paths), (batch_size,), generator=generator)
            clean = latents[index].to(device)
            noise = torch.randn(clean.shape, generator=generator).to(device)
            timesteps = torch.randint(0, train_steps, (batch_size,), generator=generator).to(device)
            noisy = scheduler.add_noise(clean, noise, timesteps)
            if fixed_conditioning is not None:
                conditioning = fixed_conditioning[index].to(device)
            else:
                conditioning = torch.cat([encoder.encode(captions[int(i)], min_chunks=chunks) for i in index]).float()
            prediction = unet(noisy, timesteps, encoder_hidden_states=conditioning, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), loss_target(scheduler, clean, noise, timesteps, what="LoRA training").float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rates.step()
            value = float(loss.detach())
            losses.append(value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if progress is not None:
                progress(step + 1, steps, value)
    finally:
        if bar is not None:
            bar.close()

    # 4. Save in kohya's layout, atomically.
    state = _kohya_state(unet, "unet", alpha)
    if text_encoder is not None:
        state.update(_kohya_state(text_encoder, "text_encoder", alpha))
    info = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_output_name": out_file.stem,
        "ss_steps": str(steps),
        "ss_learning_rate": f"{learning_rate:g}",
        "ss_lr_scheduler": lr_scheduler,
        "ss_lr_warmup_steps": str(lr_warmup_steps),
        "ss_resolution": f"({size}, {size})",
        "ss_num_train_images": str(len(paths)),
        "ss_sd_model_name": str(getattr(model, "name", "")),
        "ss_training_comment": "trained with aipaint train lora (peft)",
        **(metadata or {}),
    }
    _save_atomic(state, out_file, info)
    modules = sum(1 for k in state if k.endswith(".alpha"))
    return TrainReport(out_file, steps, len(paths), time.perf_counter() - started, rank, alpha, modules, losses)


def _save_atomic(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
