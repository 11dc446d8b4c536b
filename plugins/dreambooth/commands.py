"""``aipaint train dreambooth``. Heavy imports stay inside the handler."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import command_group
    from aipaint.plugin.kit.training import add_lora_targets_option, add_lr_schedule_options

    train = command_group(subparsers, "train", "train adapters (LoRA, …) on your images")
    p = train.add_parser(
        "dreambooth",
        help="fine-tune a model on a few images of a subject bound to a rare word (DreamBooth, optionally LoRA)",
        description="DreamBooth: fine-tune the UNet (optionally the text encoder) on a few images of one subject, "
        "captioned with a rare identifier word ('a sks dog'), with prior preservation on class images the model "
        "draws itself. Writes a diffusers folder plus a single-file checkpoint, or with --lora a kohya/A1111 LoRA file.",
    )
    p.add_argument("instance_dir", help="folder of the subject's images (png/jpg/webp); a same-name .txt is its caption")
    p.add_argument("-o", "--output", required=True, help="output folder (model folder, single file, training.json)")
    p.add_argument("-m", "--model", help="base model (default: the embedded shapes-tiny)")
    p.add_argument("--instance-prompt", help="caption of the images without a .txt file, e.g. 'a sks dog'")
    p.add_argument("--identifier", help="the rare word; checked to be in every instance caption (e.g. sks)")
    p.add_argument("--class-prompt", action="append", default=[], metavar="TEXT",
                   help="prompt of the subject's class ('a dog'); repeat for several. Turns prior preservation on")
    p.add_argument("--class-dir", help="where the class images are drawn and cached (default: OUTPUT/class_images)")
    p.add_argument("--num-class-images", type=int, default=100, help="class images for prior preservation (100)")
    p.add_argument("--prior-loss-weight", type=float, default=1.0, help="weight of the class images' loss (1.0)")
    p.add_argument("--steps", type=int, default=400, help="optimiser steps (400)")
    p.add_argument("--lr", "--learning-rate", type=float, dest="learning_rate",
                   help="AdamW learning rate (default 5e-6; with --lora 1e-4)")
    p.add_argument("--text-encoder-lr", type=float, help="learning rate of the text encoder (default: --lr)")
    add_lr_schedule_options(p)
    p.add_argument("--batch-size", type=int, default=1, help="instance images per step, and as many class images (1)")
    p.add_argument("--resolution", type=int, help="training size in pixels (default: the model's default size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-text-encoder", action="store_true", help="also fine-tune the text encoder")
    p.add_argument("--lora", action="store_true", help="train peft LoRA layers and write one LoRA file instead")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (with --lora)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    add_lora_targets_option(p, when="with --lora, ")
    p.add_argument("--no-single-file", action="store_true", help="write only the diffusers folder")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save a resumable checkpoint every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.safetensors if it is there")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_train_dreambooth)


def cmd_train_dreambooth(args: argparse.Namespace) -> int:
    import torch
    from aipaint_plugins.dreambooth.train import train_dreambooth

    import aipaint
    from aipaint.errors import InvalidParameter
    from aipaint.plugin.kit.training import lora_targets

    if args.targets and not args.lora:
        raise InvalidParameter("targets", args.targets, "only means something with --lora (full fine-tuning trains every layer)")
    unet_targets, text_encoder_targets = lora_targets(args.targets or "attention")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = aipaint.load(args.model, device=args.device)
    report = train_dreambooth(
        pipe,
        args.instance_dir,
        args.output,
        instance_prompt=args.instance_prompt,
        identifier=args.identifier,
        class_prompts=args.class_prompt,
        class_dir=args.class_dir,
        num_class_images=args.num_class_images,
        prior_loss_weight=args.prior_loss_weight,
        steps=args.steps,
        learning_rate=args.learning_rate,
        text_encoder_learning_rate=args.text_encoder_lr,
        lr_scheduler=args.lr_scheduler or "constant",
        lr_warmup_steps=args.lr_warmup_steps or 0,
        batch_size=args.batch_size,
        resolution=args.resolution,
        seed=args.seed,
        train_text_encoder=args.train_text_encoder,
        lora=args.lora,
        rank=args.rank,
        alpha=args.alpha,
        unet_targets=unet_targets,
        text_encoder_targets=text_encoder_targets,
        single_file=not args.no_single_file,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        show_progress=True,
    )
    for path in report.files:
        print(path)
    out = Path(report.output)
    resumed = f" (resumed at step {report.resumed_from})" if report.resumed_from else ""
    prior = (f"; {report.class_images} class images ({report.generated_class_images} drawn now)"
             if report.class_images else "; no prior preservation")
    print(f"{report.steps} steps{resumed} on {report.images} images{prior} in {report.seconds:.0f} s; "
          f"loss {report.first_loss:.4f} -> {report.final_loss:.4f}; settings in {out / 'training.json'}",
          file=sys.stderr)
    if not report.lora:
        print(f"use it: aipaint generate -m {out} ... (the single file loads with its folder as the config)",
              file=sys.stderr)
    return 0
