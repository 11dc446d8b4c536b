"""What the training commands share (LoRA, DreamBooth, textual inversion): their pictures as
tensors, the model's own noise schedule for training, the loss target it implies, a
trainable copy of a network with peft LoRA layers, and the learning-rate schedule."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import InvalidParameter, UnsupportedFeature

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads LR_SCHEDULERS without it
    import torch

__all__ = ["LORA_TARGETS", "LR_SCHEDULERS", "add_lora_targets_option", "add_lr_schedule_options", "lora_targets", "check_lr_schedule", "learning_rate_schedule", "loss_target",
           "noise_scheduler", "peft_lora_copy", "square_image_tensor"]

# Which layers a trained LoRA adapts, as peft target_modules for (the UNet, the text encoder):
# "attention", the diffusers training examples' choice (the attention projections), and "kohya",
# kohya sd-scripts' networks.lora default (every Linear and 1x1 Conv2d of the UNet's transformer
# blocks: attention, feed-forward, proj_in / proj_out; the text encoder's attention and MLP).
LORA_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "attention": (("to_q", "to_k", "to_v", "to_out.0"), ("q_proj", "k_proj", "v_proj", "out_proj")),
    "kohya": (("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
              ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
}

# diffusers' schedule names (kohya's and the diffusers training examples' --lr_scheduler), less
# piecewise_constant, whose rules string no training command takes.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def square_image_tensor(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Images in [0, 1], NCHW, each centre-cropped to a square and resized to ``size``
    (bicubic when enlarging, Lanczos when shrinking)."""
    import numpy as np
    import torch
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


def check_lr_schedule(name: str, warmup_steps: int, total_steps: int) -> str:
    """The schedule a training of ``total_steps`` steps will follow: ``name`` checked against
    :data:`LR_SCHEDULERS` and the warm-up against the steps (clear errors before any work), and
    ``"constant"`` with a warm-up read as ``"constant_with_warmup"`` (diffusers would drop the
    warm-up without a word)."""
    if name not in LR_SCHEDULERS:
        raise InvalidParameter("lr_scheduler", name, f"one of {', '.join(LR_SCHEDULERS)}")
    for what, value, low in (("total_steps", total_steps, 1), ("lr_warmup_steps", warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidParameter(what, value, f"must be a whole number, at least {low}")
    if warmup_steps >= total_steps:
        raise InvalidParameter("lr_warmup_steps", warmup_steps, f"must be fewer than the {total_steps} training steps")
    return "constant_with_warmup" if name == "constant" and warmup_steps else name


def learning_rate_schedule(optimizer: torch.optim.Optimizer, name: str = "constant", *, warmup_steps: int = 0,
                           total_steps: int, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' learning-rate schedule ``name`` (one of :data:`LR_SCHEDULERS`, checked by
    :func:`check_lr_schedule`) over ``total_steps`` optimiser steps, the first ``warmup_steps`` of
    them rising linearly from 0; call its ``step()`` after each ``optimizer.step()``. Each parameter
    group's own learning rate is the peak it scales. ``start_step`` puts the schedule where a run
    resumed at that step left it (create it after loading the optimizer's state), so a resumed run
    follows the same rates as one that never stopped."""
    from diffusers.optimization import get_scheduler

    name = check_lr_schedule(name, warmup_steps, total_steps)
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step <= total_steps:
        raise InvalidParameter("start_step", start_step, f"must be a whole number from 0 to {total_steps}")
    # LambdaLR scales each group's "initial_lr", which it sets from "lr" unless a loaded state has it.
    schedule = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    if start_step:
        import warnings

        schedule.last_epoch = start_step - 1
        with warnings.catch_warnings():  # a resumed optimizer has stepped, in the run that saved it
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            schedule.step()  # every group's rate for step start_step, as start_step calls of step() set it
    return schedule


def add_lr_schedule_options(parser: Any, *, defaults: str = "constant, no warm-up") -> None:
    """``--lr-scheduler`` and ``--lr-warmup-steps`` on a training command's argparse ``parser``,
    both ``None`` when not given (the command applies its defaults, said in ``defaults``)."""
    parser.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default=None,
                        help=f"learning-rate schedule, diffusers' and kohya's names (default: {defaults})")
    parser.add_argument("--lr-warmup-steps", type=int, default=None, metavar="N",
                        help="steps over which the learning rate rises linearly from 0 (default: 0)")


def lora_targets(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (UNet, text encoder) peft ``target_modules`` of the :data:`LORA_TARGETS` set ``name``."""
    if name not in LORA_TARGETS:
        raise InvalidParameter("targets", name, f"one of {', '.join(LORA_TARGETS)}")
    return LORA_TARGETS[name]


def add_lora_targets_option(parser: Any, *, when: str = "") -> None:
    """``--targets`` (a :data:`LORA_TARGETS` name, ``None`` when not given: the command reads that as
    ``"attention"``) on a training command's argparse ``parser``; ``when`` says when it applies."""
    parser.add_argument("--targets", choices=tuple(LORA_TARGETS), default=None,
                        help=f"{when}the layers the LoRA adapts: attention (the attention projections; the default) "
                        "or kohya (also the transformer blocks' feed-forward and proj_in/proj_out layers and the "
                        "text encoder's MLP, as kohya's networks.lora)")
