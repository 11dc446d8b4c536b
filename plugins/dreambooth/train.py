"""DreamBooth: teach a model one subject from a few pictures, bound to a rare identifier word.

Ruiz et al. 2022 ("DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation"). The instance images are captioned with a rare word (the
*identifier*, ``sks``) in front of the subject's class (``a sks circle``); the model is
fine-tuned to draw them. Fine-tuning on a handful of pictures makes the model forget what
the class word meant (every circle becomes the subject: "language drift"), so *prior
preservation* mixes in pictures of the class that the model itself draws before training
(``class_prompts``, generated through the pipeline and cached in ``class_dir``), with the
loss ``mse(instance) + prior_loss_weight * mse(class)``.

Two variants:

* full fine-tuning of the UNet (and, if asked, the text encoder): the output folder becomes
  a diffusers model folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``, ``model_index.json``) plus one single-file checkpoint in the original
  Stable Diffusion (LDM) layout, ``<folder name>.safetensors``, which A1111 and ComfyUI read;
* ``lora=True``: peft LoRA layers on the attention projections instead, written as one
  kohya/A1111 LoRA file (``<folder name>.safetensors``) that the LoRA adapter loads with
  ``<lora:name:1>``.

Training follows the model's own noise schedule and prediction type (epsilon, v-prediction,
zero-terminal SNR) through a ``DDPMScheduler`` built from its scheduler config. The loaded
model is never modified: training works on float32 copies. ``training.json`` in the output
folder records every setting and the loss curve's ends. With ``checkpoint_every`` the
trainable weights, the optimiser's moments and the random state are saved as safetensors, and
``resume=True`` continues from there, bit for bit as if the run had not stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
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
ADAPTER_NAME = "aipaint_dreambooth"
CHECKPOINT = "checkpoint.safetensors"
SETTINGS_FILE = "training.json"
Progress = Callable[[int, int, float], None]


@dataclass
class DreamBoothReport:
    """What a run did: the files written, the loss curves, the images used."""

    output: Path
    files: list[Path]
    steps: int
    images: int
    class_images: int
    generated_class_images: int
    seconds: float
    lora: bool
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list)
    prior_losses: list[float] = field(default_factory=list)

    @staticmethod
    def _mean(values: Sequence[float]) -> float:
        return float(sum(values) / len(values)) if values else float("nan")

    @property
    def first_loss(self) -> float:
        """Mean instance loss of the first tenth of the steps."""
        return self._mean(self.losses[: max(1, len(self.losses) // 10)])

    @property
    def final_loss(self) -> float:
        """Mean instance loss of the last tenth of the steps."""
        return self._mean(self.losses[-max(1, len(self.losses) // 10):])


# --------------------------------------------------------------------------- data


def word_pattern(word: str) -> re.Pattern[str]:
    """``word`` as a whole word, case-insensitive (how a caption is checked for the identifier)."""
    return re.compile(rf"(?<![\w]){re.escape(word)}(?![\w])", re.IGNORECASE)


def instance_data(data_dir: Path | str, instance_prompt: str | None, identifier: str | None) -> tuple[list[Path], list[str]]:
    """The instance images and their captions: a same-stem ``.txt`` file, else ``instance_prompt``.

    With ``identifier``, every caption must contain it: a caption without it would teach the
    subject to the class word itself, which is the drift DreamBooth avoids."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InvalidParameter("instance_dir", str(data_dir), "must be a folder of images of the subject")
    images = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InvalidParameter("instance_dir", str(data_dir), f"holds no images ({', '.join(IMAGE_SUFFIXES)})")
    captions = []
    for path in images:
        text = path.with_suffix(".txt")
        if text.is_file():
            captions.append(text.read_text(encoding="utf-8").strip())
        elif instance_prompt:
            captions.append(instance_prompt.strip())
        else:
            raise InvalidParameter(
                "instance_prompt", instance_prompt, f"is needed: {path.name} has no same-name .txt caption",
                "give --instance-prompt 'a sks dog' (the identifier, then the class)",
            )
    if identifier:
        pattern = word_pattern(identifier)
        missing = [p.name for p, c in zip(images, captions) if not pattern.search(c)]
        if missing:
            raise InvalidParameter(
                "identifier", identifier, f"must appear in every instance caption; missing in {', '.join(missing[:5])}"
            )
    return images, captions


def _prompt_key(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:10]


def class_images(
    pipe: Any,
    class_dir: Path | str,
    prompts: Sequence[str],
    count: int,
    *,
    seed: int = 0,
    generation: dict[str, Any] | None = None,
    show_progress: bool = False,
) -> tuple[list[Path], list[str], int]:
    """``count`` class images (spread evenly over ``prompts``) drawn by ``pipe`` itself, cached in ``class_dir``.

    Each image is saved with its prompt as a same-stem ``.txt`` caption; images already there
    whose caption is one of ``prompts`` are reused, so a second run (or a resumed one) only
    draws what is missing. Returns the paths, their captions and how many were drawn now."""
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    wanted = {prompt: count // len(prompts) + (1 if i < count % len(prompts) else 0) for i, prompt in enumerate(prompts)}
    have: dict[str, list[Path]] = {prompt: [] for prompt in prompts}
    for path in sorted(class_dir.glob("*.png")):
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8").strip()
            if caption in have:
                have[caption].append(path)
    missing = {p: max(0, n - len(have[p])) for p, n in wanted.items()}
    total_missing = sum(missing.values())
    generated = 0
    if total_missing:
        if not hasattr(pipe, "txt2img"):
            raise InvalidParameter(
                "model_or_pipeline", type(pipe).__name__, "must be an aipaint Pipeline to draw the class images",
                "pass the pipeline (aipaint.load(...)), or fill class_dir with captioned class images",
            )
        bar = _progress_bar(total_missing, "class images") if show_progress else None
        try:
            for index, prompt in enumerate(prompts):
                need = missing[prompt]
                done = len(have[prompt])
                while need > 0:
                    batch = min(need, 8)
                    result = pipe.txt2img(prompt, seed=seed + 100_000 * index + done, batch_size=batch,
                                          **(generation or {}))
                    for image in result.images:
                        path = class_dir / f"{_prompt_key(prompt)}-{done:05d}.png"
                        image.save(path)
                        path.with_suffix(".txt").write_text(prompt, encoding="utf-8")
                        have[prompt].append(path)
                        done += 1
                    need -= batch
                    generated += batch
                    if bar is not None:
                        bar.update(batch)
        finally:
            if bar is not None:
                bar.close()
    paths = [p for prompt in prompts for p in sorted(have[prompt])[: wanted[prompt]]]
    captions = [prompt for prompt in prompts for _ in sorted(have[prompt])[: wanted[prompt]]]
    return paths, captions, generated


# --------------------------------------------------------------------------- model pieces


def _plain(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "_orig_mod", module)


def _trainable_copy(module: torch.nn.Module, lora: bool, targets: Sequence[str], rank: int, alpha: float) -> torch.nn.Module:
    """A float32 copy of ``module``: every weight trains, or (``lora``) only peft LoRA layers on ``targets``."""
    if lora:
        return peft_lora_copy(module, targets, rank, alpha, adapter_name=ADAPTER_NAME)
    trainable = copy.deepcopy(_plain(module)).float()
    trainable.requires_grad_(True)
    return trainable


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="step" if desc.startswith("train") else "image", file=sys.stderr, desc=desc,
                dynamic_ncols=True)


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file, then a rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, step: int, fingerprint: str, params: list[torch.Tensor], optimizer: Any,
                     generator: torch.Generator, losses: list[float], prior_losses: list[float]) -> None:
    """Trainable tensors, AdamW's moments and the random state, so a resumed run continues exactly."""
    state: dict[str, torch.Tensor] = {f"param.{i}": p.detach() for i, p in enumerate(params)}
    for index, moments in optimizer.state_dict()["state"].items():
        for name, value in moments.items():
            state[f"optim.{index}.{name}"] = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value)
    state["generator"] = generator.get_state()
    state["losses"] = torch.tensor(losses, dtype=torch.float64)
    state["prior_losses"] = torch.tensor(prior_losses, dtype=torch.float64)
    save_safetensors(state, path, {"step": str(step), "fingerprint": fingerprint})


def _load_checkpoint(path: Path, fingerprint: str, params: list[torch.Tensor], optimizer: Any,
                     generator: torch.Generator) -> tuple[int, list[float], list[float]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("fingerprint") != fingerprint:
            raise InvalidParameter(
                "resume", str(path), "was written by a run with other settings (model, data or options)",
                "resume with the same settings (only --steps may grow), or delete the checkpoint",
            )
        state = {k: f.get_tensor(k) for k in f.keys()}
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(state[f"param.{i}"])
    saved = optimizer.state_dict()
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": moments, "param_groups": saved["param_groups"]})
    generator.set_state(state["generator"])
    return int(metadata["step"]), state["losses"].tolist(), state["prior_losses"].tolist()


# --------------------------------------------------------------------------- training


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidParameter(name, value, f"must be a whole number of at least {low}")


def _check_rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < 1):
        raise InvalidParameter(name, value, "must be a number between 0 and 1 (exclusive)")


def train_dreambooth(
    model_or_pipeline: Any,
    instance_dir: Path | str,
    output_dir: Path | str,
    *,
    instance_prompt: str | None = None,
    identifier: str | None = None,
    class_prompts: Sequence[str] = (),
    class_dir: Path | str | None = None,
    num_class_images: int = 100,
    prior_loss_weight: float = 1.0,
    class_generation: dict[str, Any] | None = None,
    steps: int = 400,
    learning_rate: float | None = None,
    batch_size: int = 1,
    resolution: int | None = None,
    seed: int = 0,
    train_text_encoder: bool = False,
    text_encoder_learning_rate: float | None = None,
    lr_scheduler: str = "constant",
    lr_warmup_steps: int = 0,
    lora: bool = False,
    rank: int = 4,
    alpha: float | None = None,
    unet_targets: Sequence[str] = UNET_TARGETS,
    text_encoder_targets: Sequence[str] = TEXT_ENCODER_TARGETS,
    max_grad_norm: float = 1.0,
    checkpoint_every: int = 0,
    resume: bool = False,
    single_file: bool = True,
    progress: Progress | None = None,
    show_progress: bool = False,
) -> DreamBoothReport:
    """Fine-tune on the subject in ``instance_dir`` and write the result to ``output_dir``.

    ``class_prompts`` turns prior preservation on: ``num_class_images`` pictures drawn by the
    model for those prompts (before training, cached in ``class_dir``, default
    ``output_dir/class_images``) are trained on beside the instance images, weighted by
    ``prior_loss_weight``. ``learning_rate`` defaults to 5e-6 for full fine-tuning and 1e-4
    with ``lora`` (the diffusers examples' values for Stable Diffusion). Each step uses
    ``batch_size`` instance images and as many class images. ``progress(step, steps, loss)``
    is called after every step. The model itself is not modified.
    """
    pipe = model_or_pipeline
    model = getattr(model_or_pipeline, "model", model_or_pipeline)
    if getattr(model, "text_encoder_2", None) is not None or getattr(model, "text_encoder", None) is None:
        raise UnsupportedFeature(
            f"DreamBooth training supports models with one text encoder (SD1.x, SD2.x), not {model.name!r} "
            f"(family {model.family}); train SDXL with diffusers' train_dreambooth_lora_sdxl.py, whose LoRA files "
            "aipaint loads"
        )
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("rank", rank, 1),
                             ("checkpoint_every", checkpoint_every, 0)):
        _check_int(name, value, low)
    learning_rate = (1e-4 if lora else 5e-6) if learning_rate is None else learning_rate
    _check_rate("learning_rate", learning_rate)
    if text_encoder_learning_rate is not None:
        _check_rate("text_encoder_learning_rate", text_encoder_learning_rate)
    lr_scheduler = check_lr_schedule(lr_scheduler, lr_warmup_steps, steps)
    class_prompts = [p.strip() for p in class_prompts if p and p.strip()]
    if class_prompts:
        _check_int("num_class_images", num_class_images, 1)
        if isinstance(prior_loss_weight, bool) or not (isinstance(prior_loss_weight, (int, float))
                                                       and 0 < prior_loss_weight <= 100):
            raise InvalidParameter("prior_loss_weight", prior_loss_weight, "must be a number above 0, at most 100")
    if identifier is not None and (not identifier.strip() or re.search(r"\s", identifier.strip())):
        raise InvalidParameter("identifier", identifier, "must be one word (a rare token such as 'sks')")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise InvalidParameter("alpha", alpha, "must be a positive number", "the LoRA's scale is alpha / rank")
    output_dir = Path(output_dir)
    if output_dir.suffix == ".safetensors":
        raise InvalidParameter("output_dir", str(output_dir), "must be a folder (the files are written inside it)")
    size = int(resolution or model.defaults.width)
    if size % model.vae_scale_factor:
        raise InvalidParameter("resolution", size, f"must be a multiple of {model.vae_scale_factor} for this model")

    started = time.perf_counter()
    paths, captions = instance_data(instance_dir, instance_prompt, identifier)
    output_dir.mkdir(parents=True, exist_ok=True)

    # 1. Class images, drawn by the model itself before it changes (cached: a rerun draws only what is missing).
    class_paths: list[Path] = []
    class_captions: list[str] = []
    generated = 0
    if class_prompts:
        class_dir = Path(class_dir) if class_dir is not None else output_dir / "class_images"
        class_paths, class_captions, generated = class_images(
            pipe, class_dir, class_prompts, num_class_images, seed=seed, generation=class_generation,
            show_progress=show_progress,
        )

    settings = {
        "method": "dreambooth-lora" if lora else "dreambooth",
        "base_model": str(getattr(model, "name", "")),
        "base_model_path": str(getattr(model, "source_path", "") or ""),
        "instance_dir": str(instance_dir),
        "instance_images": [p.name for p in paths],
        "instance_captions": captions,
        "identifier": identifier,
        "prior_preservation": bool(class_prompts),
        "class_prompts": class_prompts,
        "class_dir": str(class_dir) if class_prompts else None,
        "num_class_images": len(class_paths),
        "prior_loss_weight": float(prior_loss_weight) if class_prompts else None,
        "class_generation": class_generation or {},
        "learning_rate": learning_rate,
        "text_encoder_learning_rate": text_encoder_learning_rate if train_text_encoder else None,
        "lr_scheduler": lr_scheduler,
        "lr_warmup_steps": lr_warmup_steps,
        "batch_size": batch_size,
        "resolution": size,
        "seed": seed,
        "train_text_encoder": train_text_encoder,
        "rank": rank if lora else None,
        "alpha": alpha if lora else None,
        "unet_targets": list(unet_targets) if lora else None,
        "text_encoder_targets": list(text_encoder_targets) if lora and train_text_encoder else None,
        "max_grad_norm": max_grad_norm,
        "prediction_type": model.scheduler_config.get("prediction_type", "epsilon"),
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    device = model.device
    generator = torch.Generator("cpu").manual_seed(seed)

    # 2. Latents of every image, once (the VAE does not train).
    with torch.no_grad():
        pixels = square_image_tensor(paths + class_paths, size)
        latents = torch.cat([model.encode(pixels[i : i + 16].to(device)).float() for i in range(0, len(pixels), 16)])

    # 3. Trainable copies; the loaded model stays untouched.
    from aipaint.prompt import PromptEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _trainable_copy(model.unet, lora, unet_targets, rank, alpha).to(device)
        text_encoder = (
            _trainable_copy(model.text_encoder, lora, text_encoder_targets, rank, alpha).to(device)
            if train_text_encoder else None
        )
    encoder = PromptEncoder(model.tokenizer, text_encoder if text_encoder is not None else model.text_encoder)
    all_captions = captions + class_captions
    chunks = max(len(encoder.count_tokens(c)) for c in all_captions)
    fixed: torch.Tensor | None = None
    if text_encoder is None:
        with torch.no_grad():
            fixed = torch.cat([encoder.encode(c, min_chunks=chunks).float() for c in all_captions])

    unet_params = [p for p in unet.parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": learning_rate}]
    params = list(unet_params)
    if text_encoder is not None:
        te_params = [p for p in text_encoder.parameters() if p.requires_grad]
        groups.append({"params": te_params, "lr": text_encoder_learning_rate or learning_rate})
        params += te_params
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-2)
    scheduler = noise_scheduler(model)
    train_steps = int(scheduler.config.num_train_timesteps)

    checkpoint = output_dir / CHECKPOINT
    start, losses, prior_losses = 0, [], []
    if resume and checkpoint.is_file():
        start, losses, prior_losses = _load_checkpoint(checkpoint, fingerprint, params, optimizer, generator)
        if start > steps:
            raise InvalidParameter("steps", steps, f"must be at least the checkpoint's {start} steps to resume")
    rates = learning_rate_schedule(optimizer, lr_scheduler, warmup_steps=lr_warmup_steps, total_steps=steps,
                                   start_step=start)

    def conditioning(indices: torch.Tensor) -> torch.Tensor:
        if fixed is not None:
            return fixed[indices].to(device)
        return torch.cat([encoder.encode(all_captions[int(i)], min_chunks=chunks) for i in indices]).float()

    # 4. The loop: noise at a random timestep, predict what the model predicts, MSE (+ the prior's MSE).
    unet.train()
    if text_encoder is not None:
        text_encoder.train()
    bar = _progress_bar(steps, "train dreambooth") if show_progress else None
    if bar is not None and start:
        bar.update(start)
    try:
        for step in range(start, steps):
            index = torch.randint(0, len(paths), (batch_size,), generator=generator)
            if class_prompts:
                index = torch.cat([index, len(paths) + torch.randint(0, len(class_paths), (batch_size,), generator=generator)])
            clean = latents[index].to(device)
            noise = torch.randn(clean.shape, generator=generator).to(device)
            timesteps = torch.randint(0, train_steps, (len(index),), generator=generator).to(device)
            noisy = scheduler.add_noise(clean, noise, timesteps)
            prediction = unet(noisy, timesteps, encoder_hidden_states=conditioning(index), return_dict=False)[0].float()
            target = loss_target(scheduler, clean, noise, timesteps, what="DreamBooth training").float()
            loss = F.mse_loss(prediction[:batch_size], target[:batch_size])
            total = loss
            if class_prompts:
                prior = F.mse_loss(prediction[batch_size:], target[batch_size:])
                total = loss + prior_loss_weight * prior
                prior_losses.append(float(prior.detach()))
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            rates.step()
            value = float(loss.detach())
            losses.append(value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if progress is not None:
                progress(step + 1, steps, value)
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                _save_checkpoint(checkpoint, step + 1, fingerprint, params, optimizer, generator, losses, prior_losses)
    finally:
        if bar is not None:
            bar.close()

    # 5. Save: a kohya LoRA file, or a diffusers folder plus a single-file checkpoint.
    unet.eval()
    name = output_dir.name or "dreambooth"
    files: list[Path] = []
    if lora:
        state = kohya_state(unet, "unet", alpha, adapter_name=ADAPTER_NAME)
        if text_encoder is not None:
            state.update(kohya_state(text_encoder, "text_encoder", alpha, adapter_name=ADAPTER_NAME))
        info = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": f"{alpha:g}",
            "ss_output_name": name,
            "ss_steps": str(steps),
            "ss_learning_rate": f"{learning_rate:g}",
            "ss_lr_scheduler": lr_scheduler,
            "ss_lr_warmup_steps": str(lr_warmup_steps),
            "ss_resolution": f"({size}, {size})",
            "ss_num_train_images": str(len(paths)),
            "ss_num_reg_images": str(len(class_paths)),
            "ss_prior_loss_weight": f"{prior_loss_weight:g}" if class_prompts else "0",
            "ss_sd_model_name": str(getattr(model, "name", "")),
            "ss_training_comment": "DreamBooth-LoRA trained with aipaint train dreambooth --lora (peft)",
        }
        lora_file = output_dir / f"{name}.safetensors"
        save_safetensors(state, lora_file, info)
        files.append(lora_file)
    else:
        files += save_diffusers_folder(model, output_dir, unet, text_encoder)
        if single_file:
            from aipaint_plugins.dreambooth.single_file import save_single_file

            te = text_encoder if text_encoder is not None else _plain(model.text_encoder)
            files.append(save_single_file(output_dir / f"{name}.safetensors", unet, _plain(model.vae), te,
                                          {"aipaint_training": "dreambooth", "base_model": str(getattr(model, "name", ""))}))
    seconds = time.perf_counter() - started
    report = DreamBoothReport(output_dir, files, steps, len(paths), len(class_paths), generated, seconds, lora, start,
                              losses, prior_losses)
    record = {
        **settings,
        "steps": steps,
        "resumed_from_step": start,
        "seconds": round(seconds, 1),
        "generated_class_images": generated,
        "loss_first_tenth": report.first_loss,
        "loss_last_tenth": report.final_loss,
        "prior_loss_last_tenth": DreamBoothReport._mean(prior_losses[-max(1, len(prior_losses) // 10):]) if prior_losses else None,
        "files": [str(f.relative_to(output_dir)) if f.is_relative_to(output_dir) else str(f) for f in files],
        "torch": torch.__version__,
    }
    (output_dir / SETTINGS_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    if checkpoint.is_file():
        checkpoint.unlink()  # finished: the outputs supersede it
    return report


def save_diffusers_folder(model: Any, folder: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> list[Path]:
    """The trained UNet (and text encoder, else the base one) with the base model's VAE, tokenizer and
    scheduler, as a diffusers Stable Diffusion folder that ``aipaint.load(folder)`` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    te = text_encoder if text_encoder is not None else _plain(model.text_encoder)
    te.save_pretrained(folder / "text_encoder", safe_serialization=True)
    _plain(model.vae).save_pretrained(folder / "vae", safe_serialization=True)
    model.tokenizer.save_pretrained(str(folder / "tokenizer"))
    scheduler_config = dict(model.scheduler_config)
    scheduler_class = scheduler_config.get("_class_name", "DDPMScheduler")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config, indent=2) + "\n", encoding="utf-8")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", type(te).__name__],
        "tokenizer": ["transformers", type(model.tokenizer).__name__],
        "unet": ["diffusers", type(_plain(unet)).__name__],
        "vae": ["diffusers", type(_plain(model.vae)).__name__],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [folder]

