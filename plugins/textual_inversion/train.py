"""Textual inversion training: learn new token vectors for a subject or style, the model untouched.

Gal et al. 2022 ("An Image is Worth One Word"). A new word (the embedding's name, e.g.
``sks``) gets ``vectors`` fresh rows in the text encoder's token-embedding table, started from
the embedding of an initializer word (A1111's "initialization text", default ``*``); only those
rows train, with the diffusion loss of the model's own noise schedule and prediction type
(``DDPMScheduler`` from its scheduler config: epsilon, v-prediction, zero-terminal SNR). The
UNet, VAE and the rest of the text encoder stay frozen, and the loaded model is not modified:
the tokenizer and text encoder are copied, and the UNet's ``requires_grad`` flags are put back.

The data folder holds images and same-stem ``.txt`` captions that contain the name as a whole
word (``a big sks circle on the left, on a white background``); images without a caption use
``caption`` (``a sks circle``). The file written is the one-key safetensors layout A1111 and
kohya's sd-scripts write for SD1.x/2.x embeddings, ``{"emb_params": [vectors, hidden]}``,
with the training settings in its metadata; its name in prompts is its file name, so
``sks.safetensors`` in the embeddings folder is used wherever a prompt says ``sks``.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import InvalidParameter, UnsupportedFeature

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
Progress = Callable[[int, int, float], None]

if TYPE_CHECKING:  # torch loads when training runs: the module also registers the command (aipaint --help)
    import torch


@dataclass
class EmbeddingReport:
    """What a run did: the file, the loss curve, the vectors learned."""

    output: Path
    name: str
    vectors: int
    steps: int
    images: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @staticmethod
    def _mean(values: Sequence[float]) -> float:
        return float(sum(values) / len(values)) if values else float("nan")

    @property
    def first_loss(self) -> float:
        """Mean loss of the first tenth of the steps."""
        return self._mean(self.losses[: max(1, len(self.losses) // 10)])

    @property
    def final_loss(self) -> float:
        """Mean loss of the last tenth of the steps."""
        return self._mean(self.losses[-max(1, len(self.losses) // 10):])


def _word(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])", re.IGNORECASE)


def training_data(data_dir: Path | str, name: str, caption: str | None) -> tuple[list[Path], list[str]]:
    """Images and captions (a same-stem ``.txt``, else ``caption``); every caption must name the embedding."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InvalidParameter("data_dir", str(data_dir), "must be a folder of images")
    images = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InvalidParameter("data_dir", str(data_dir), f"holds no images ({', '.join(IMAGE_SUFFIXES)})")
    captions = []
    for path in images:
        text_file = path.with_suffix(".txt")
        if text_file.is_file():
            captions.append(text_file.read_text(encoding="utf-8").strip())
        elif caption:
            captions.append(caption.strip())
        else:
            raise InvalidParameter("caption", caption, f"is needed: {path.name} has no same-name .txt caption",
                                   f"give --caption 'a {name} dog'")
    pattern = _word(name)
    missing = [p.name for p, c in zip(images, captions) if not pattern.search(c)]
    if missing:
        raise InvalidParameter(
            "name", name, f"must appear in every caption as a word (it is what prompts will say); missing in "
            f"{', '.join(missing[:5])}",
        )
    return images, captions


def initial_vectors(tokenizer: Any, table: torch.Tensor, init_text: str, vectors: int) -> torch.Tensor:
    """A1111's start: the token embeddings of ``init_text``, cycled to ``vectors`` rows (an empty text: zeros)."""
    import torch

    ids = tokenizer(init_text, add_special_tokens=False)["input_ids"] if init_text else []
    if not ids:
        return torch.zeros(vectors, table.shape[1], dtype=table.dtype)
    rows = table[torch.tensor(ids)]
    return torch.stack([rows[i % len(ids)] for i in range(vectors)]).clone()


def _extended_embedding_class() -> type:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ExtendedEmbedding(nn.Module):
        """The frozen token table plus trainable rows for the new tokens: only ``new`` gets gradients
        and optimiser state (SD's table has 49408 rows; training or copying it each step would dominate)."""

        def __init__(self, base: nn.Embedding, ids: list[int], start: torch.Tensor) -> None:
            super().__init__()
            self.base = base
            self.ids = list(ids)
            self.new = nn.Parameter(start.detach().clone())

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            known = input_ids.clamp(max=self.base.num_embeddings - 1)
            out = F.embedding(known, self.base.weight)
            for k, token in enumerate(self.ids):
                out = torch.where((input_ids == token)[..., None], self.new[k].to(out.dtype), out)
            return out

    return ExtendedEmbedding


def _ExtendedEmbedding(base: Any, ids: list[int], start: Any) -> Any:  # noqa: N802 - a class, built lazily
    return _extended_embedding_class()(base, ids, start)


def train_embedding(
    model_or_pipeline: Any,
    data_dir: Path | str,
    out_file: Path | str,
    *,
    caption: str | None = None,
    vectors: int = 1,
    init_text: str = "*",
    steps: int = 500,
    learning_rate: float = 5e-3,
    lr_scheduler: str = "constant",
    lr_warmup_steps: int = 0,
    batch_size: int = 4,
    resolution: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    show_progress: bool = False,
) -> EmbeddingReport:
    """Learn an embedding named ``out_file``'s stem from ``data_dir`` and write it to ``out_file``.

    ``vectors`` tokens per use (A1111's "number of vectors per token"), started from
    ``init_text``'s token embeddings; AdamW at ``learning_rate`` (A1111's default 0.005), no
    weight decay, on the schedule ``lr_scheduler`` with ``lr_warmup_steps`` of warm-up (see
    :func:`aipaint.plugin.kit.training.learning_rate_schedule`). ``progress(step, steps, loss)`` is
    called after every step; ``show_progress`` draws a tqdm bar on stderr. The model is not modified.
    """
    import torch
    import torch.nn.functional as F

    model = getattr(model_or_pipeline, "model", model_or_pipeline)
    if getattr(model, "text_encoder_2", None) is not None or getattr(model, "text_encoder", None) is None:
        raise UnsupportedFeature(
            f"embedding training supports models with one text encoder (SD1.x, SD2.x), not {model.name!r} "
            f"(family {model.family})"
        )
    out_file = Path(out_file)
    if out_file.suffix != ".safetensors":
        raise InvalidParameter("out_file", str(out_file), "must end in .safetensors (A1111's emb_params layout)")
    name = out_file.stem
    if not name or not re.fullmatch(r"[\w.\-]+", name):
        raise InvalidParameter("out_file", str(out_file), "must be named as prompts will say it: letters, digits, _ . -")
    for what, value, low in (("vectors", vectors, 1), ("steps", steps, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidParameter(what, value, f"must be a whole number of at least {low}")
    if vectors > 75:
        raise InvalidParameter("vectors", vectors, "must be at most 75 (one prompt chunk)")
    if isinstance(learning_rate, bool) or not (isinstance(learning_rate, (int, float)) and 0 < learning_rate < 1):
        raise InvalidParameter("learning_rate", learning_rate, "must be a number between 0 and 1", "A1111 uses 0.005")
    from aipaint.plugin.kit.training import (
        check_lr_schedule,
        learning_rate_schedule,
        loss_target,
        noise_scheduler,
        square_image_tensor,
    )

    lr_scheduler = check_lr_schedule(lr_scheduler, lr_warmup_steps, steps)
    size = int(resolution or model.defaults.width)
    if size % model.vae_scale_factor:
        raise InvalidParameter("resolution", size, f"must be a multiple of {model.vae_scale_factor} for this model")

    started = time.perf_counter()
    paths, captions = training_data(data_dir, name, caption)
    device = model.device
    generator = torch.Generator("cpu").manual_seed(seed)

    # 1. Latents once; the VAE does not train.
    with torch.no_grad():
        pixels = square_image_tensor(paths, size)
        latents = torch.cat([model.encode(pixels[i : i + 16].to(device)).float() for i in range(0, len(pixels), 16)])

    # 2. A copy of the tokenizer and text encoder with the new tokens; only their rows will change.
    tokenizer = copy.deepcopy(model.tokenizer)
    text_encoder = copy.deepcopy(getattr(model.text_encoder, "_orig_mod", model.text_encoder)).float().to(device)
    text_encoder.requires_grad_(False)
    tokens = [f"<aipaint_ti_train_{k}>" for k in range(vectors)]
    if tokenizer.add_tokens(tokens) != vectors:
        raise RuntimeError("the tokenizer already knows the training placeholder tokens")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    base = text_encoder.get_input_embeddings()
    start = initial_vectors(tokenizer, base.weight.detach(), init_text, vectors).to(base.weight)
    table = _ExtendedEmbedding(base, ids, start)
    text_encoder.set_input_embeddings(table)
    spelled = " ".join(tokens)
    pattern = _word(name)
    texts = [pattern.sub(spelled, c) for c in captions]

    from aipaint.prompt import PromptEncoder

    encoder = PromptEncoder(tokenizer, text_encoder)
    chunks = max(len(encoder.count_tokens(t)) for t in texts)
    optimizer = torch.optim.AdamW([table.new], lr=learning_rate, weight_decay=0.0)
    rates = learning_rate_schedule(optimizer, lr_scheduler, warmup_steps=lr_warmup_steps, total_steps=steps)
    scheduler = noise_scheduler(model)
    train_steps = int(scheduler.config.num_train_timesteps)

    # 3. The loop, with the UNet frozen (its flags restored afterwards).
    unet = model.unet
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.requires_grad_(False)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", file=sys.stderr, desc="train embedding", dynamic_ncols=True)
    losses: list[float] = []
    try:
        for step in range(steps):
            index = torch.randint(0, len(paths), (batch_size,), generator=generator)
            clean = latents[index].to(device)
            noise = torch.randn(clean.shape, generator=generator).to(device)
            timesteps = torch.randint(0, train_steps, (batch_size,), generator=generator).to(device)
            noisy = scheduler.add_noise(clean, noise, timesteps)
            conditioning = torch.cat([encoder.encode(texts[int(i)], min_chunks=chunks) for i in index])
            dtype = next(unet.parameters()).dtype
            prediction = unet(noisy.to(dtype), timesteps, encoder_hidden_states=conditioning.to(dtype), return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), loss_target(scheduler, clean, noise, timesteps, what="embedding training").float())
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
        for n, p in unet.named_parameters():
            p.requires_grad_(flags[n])
        if bar is not None:
            bar.close()

    # 4. Save A1111's one-key layout, atomically, the settings in the header.
    learned = table.new.detach().to("cpu", torch.float32).contiguous()
    metadata = {
        "name": name,
        "step": str(steps),
        "vectors": str(vectors),
        "init_text": init_text,
        "learning_rate": f"{learning_rate:g}",
        "lr_scheduler": lr_scheduler,
        "lr_warmup_steps": str(lr_warmup_steps),
        "batch_size": str(batch_size),
        "resolution": str(size),
        "images": str(len(paths)),
        "seed": str(seed),
        "sd_checkpoint_name": str(getattr(model, "name", "")),
        "trained_with": "aipaint train embedding",
    }
    _save_atomic({"emb_params": learned}, out_file, metadata)
    return EmbeddingReport(out_file, name, vectors, steps, len(paths), time.perf_counter() - started, losses)


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


def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    """``aipaint train embedding DATA_DIR -o NAME.safetensors``."""
    from aipaint.cli.api import command_group
    from aipaint.plugin.kit.training import add_lr_schedule_options

    train = command_group(subparsers, "train", "train adapters (LoRA, …) on your images")
    p = train.add_parser(
        "embedding",
        help="train a textual-inversion embedding (A1111 format) from a folder of images",
        description="Textual inversion: learn token vectors for a new word from images whose captions use it; "
        "writes an A1111-compatible embedding (safetensors, emb_params) named as prompts will say it.",
    )
    p.add_argument("data_dir", help="folder of images (png/jpg/webp); a same-name .txt is the caption and must say NAME")
    p.add_argument("-o", "--output", required=True,
                   help="output NAME.safetensors; NAME is the word prompts use (put it in the embeddings folder)")
    p.add_argument("-m", "--model", help="base model (default: the embedded shapes-tiny)")
    p.add_argument("--caption", help="caption for images without a .txt file, e.g. 'a NAME dog'")
    p.add_argument("--vectors", type=int, default=1, help="vectors per token (1)")
    p.add_argument("--init-text", default="*", help="initialization text (A1111's default '*')")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", "--learning-rate", type=float, dest="learning_rate", default=5e-3)
    add_lr_schedule_options(p)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--resolution", type=int, help="training size in pixels (default: the model's default size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_cmd_train_embedding)


def _cmd_train_embedding(args: argparse.Namespace) -> int:
    import torch

    import aipaint

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = aipaint.load(args.model, device=args.device)
    report = train_embedding(
        pipe, args.data_dir, args.output, caption=args.caption, vectors=args.vectors, init_text=args.init_text,
        steps=args.steps, learning_rate=args.learning_rate, lr_scheduler=args.lr_scheduler or "constant",
        lr_warmup_steps=args.lr_warmup_steps or 0, batch_size=args.batch_size, resolution=args.resolution,
        seed=args.seed, show_progress=True,
    )
    print(report.output)
    print(f"{report.name}: {report.vectors} vector(s), {report.steps} steps on {report.images} images in "
          f"{report.seconds:.0f} s; loss {report.first_loss:.4f} -> {report.final_loss:.4f}; use it by writing "
          f"'{report.name}' in a prompt with --embeddings-dir {report.output.parent}", file=sys.stderr)
    return 0
