"""What the training commands share (LoRA, DreamBooth, textual inversion): their pictures as
tensors, the model's own noise schedule for training, the loss target it implies, and a
trainable copy of a network with peft LoRA layers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aipaint.errors import UnsupportedFeature

__all__ = ["loss_target", "noise_scheduler", "peft_lora_copy", "square_image_tensor"]


def square_image_tensor(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Images in [0, 1], NCHW, each centre-cropped to a square and resized to ``size``
    (bicubic when enlarging, Lanczos when shrinking)."""
    import numpy as np
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            if image.size != (size, size):
                image = image.resize((size, size), Image.BICUBIC if side < size else Image.LANCZOS)
            arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def noise_scheduler(model: Any) -> Any:
    """A ``DDPMScheduler`` with the model's own schedule and prediction type (epsilon, v, sample;
    zero-terminal SNR where the model has it): what its training noises latents with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config({k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})


def loss_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, *,
                what: str = "training") -> torch.Tensor:
    """What the UNet should predict for ``latents`` noised with ``noise`` at ``timesteps``: the
    noise, the velocity or the sample, as ``scheduler``'s prediction type says. ``what`` names the
    training in the error for a prediction type none of these is."""
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction == "sample":
        return latents
    raise UnsupportedFeature(f"{what} does not know the prediction type {prediction!r}")


def peft_lora_copy(module: torch.nn.Module, targets: Sequence[str], rank: int, alpha: float, *,
                   adapter_name: str) -> torch.nn.Module:
    """A float32 copy of ``module`` (a ``torch.compile`` wrapper looked through) with peft LoRA
    layers of ``rank`` and ``alpha`` on the modules ``targets`` names (peft's ``target_modules``),
    as adapter ``adapter_name``; only they train, ``module`` is left as it was. peft's default
    initialisation (``lora_B`` zero) draws from torch's global generator: seed it for a repeatable
    run. :func:`aipaint.plugin.kit.kohya.kohya_state` saves the layers under kohya keys."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    trainable = copy.deepcopy(getattr(module, "_orig_mod", module)).float()
    trainable.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    return inject_adapter_in_model(config, trainable, adapter_name=adapter_name)
