"""``aipaint train lora``, ``aipaint lora list``, ``--lora-dir`` of the generation commands, and the
LoRA units ``--from-png`` regenerates. Heavy imports stay inside the handlers."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import (
        add_adapter_unit_builder,
        add_request_options_builder,
        command_group,
        generation_parsers,
    )
    from aipaint.plugin.kit.training import add_lora_targets_option, add_lr_schedule_options

    train = command_group(subparsers, "train", "train adapters (LoRA, …) on your images")
    p = train.add_parser(
        "lora",
        help="train a LoRA from a folder of images and same-name .txt captions",
        description="Train a LoRA with peft on the UNet attention projections (optionally the text encoder) "
        "and save it in the kohya/A1111 key format.",
    )
    p.add_argument("data_dir", help="folder of images (png/jpg/webp) with same-name .txt captions")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("-m", "--model", help="base model (default: the embedded shapes-tiny)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    add_lora_targets_option(p)
    p.add_argument("--steps", type=int, help="optimiser steps (default: the model card's, else 500)")
    p.add_argument("--lr", "--learning-rate", type=float, dest="learning_rate",
                   help="AdamW learning rate (default: the model card's, else 1e-4)")
    add_lr_schedule_options(p, defaults="the model card's, else constant, no warm-up")
    p.add_argument("--batch-size", type=int, help="images per step (default: the model card's, else 4)")
    p.add_argument("--resolution", type=int, help="training size in pixels (default: the model's default size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="also train LoRA layers on the text encoder (default: the model card's, else off)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_train_lora)

    group = command_group(subparsers, "lora", "LoRA files: list the LoRA folder")
    p = group.add_parser("list", help="list LoRAs in the LoRA folder")
    p.add_argument("--dir", help="LoRA folder (default: $AIPAINT_LORA_DIR or $AIPAINT_HOME/loras)")
    p.add_argument("--hashes", action="store_true", help="also print the A1111 short hash (reads every file)")
    p.set_defaults(func=cmd_lora_list)

    for parser in generation_parsers(subparsers):
        parser.add_argument_group("LoRA").add_argument(
            "--lora-dir", metavar="DIR",
            help="the LoRA folder <lora:NAME> tags are looked up in (default: $AIPAINT_LORA_DIR or $AIPAINT_HOME/loras)")
        add_adapter_unit_builder(parser, recorded_units)
        add_request_options_builder(parser, lora_dir_option)


def lora_dir_option(args: argparse.Namespace, png_params: dict[str, str]) -> dict[str, Any]:
    """``--lora-dir DIR`` as the request's ``lora.folder`` option."""
    folder = getattr(args, "lora_dir", None)
    return {"lora": {"folder": folder}} if folder else {}


def recorded_units(args: argparse.Namespace, png_params: dict[str, str]) -> list[Any]:
    """The API LoRA units a ``--from-png`` image recorded in ``Lora units`` (its prompt tags need nothing:
    they come back with the prompt)."""
    from aipaint_plugins.lora import RECORDED_UNITS, uses_from_recorded_units

    from aipaint.plugin.adapters import AdapterUnit

    text = png_params.get(RECORDED_UNITS)
    if not text:
        return []
    return [
        AdapterUnit("lora", {"name": use.name, "weight": use.unet_weight,
                             **({} if use.te_weight is None else {"te_weight": use.te_weight})})
        for use in uses_from_recorded_units(text)
    ]


#: ``aipaint train lora``'s own defaults, for a model whose card has no ``lora_training`` section.
TRAINING_DEFAULTS: dict[str, Any] = {"steps": 500, "learning_rate": 1e-4, "batch_size": 4, "train_text_encoder": False,
                                     "lr_scheduler": "constant", "lr_warmup_steps": 0}


def training_settings(args: argparse.Namespace, card: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Each of :data:`TRAINING_DEFAULTS` from the command line, else from the model card's
    ``lora_training`` section (a small model trains best with other settings than a full-size
    one: the embedded model's card carries its recipe), else the command's own default; and
    the names that came from the card."""
    section = (card or {}).get("lora_training") or {}
    settings, from_card = {}, []
    for name, default in TRAINING_DEFAULTS.items():
        value = getattr(args, name, None)  # a caller that has no such option leaves it to the card or default
        if value is None and name in section:
            value = type(default)(section[name])
            from_card.append(name)
        settings[name] = default if value is None else value
    return settings, from_card


def cmd_train_lora(args: argparse.Namespace) -> int:
    import torch
    from aipaint_plugins.lora.train import train_lora

    import aipaint
    from aipaint.plugin.kit.training import lora_targets

    unet_targets, text_encoder_targets = lora_targets(args.targets or "attention")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = aipaint.load(args.model, device=args.device)
    settings, from_card = training_settings(args, getattr(pipe.model, "card", None))
    if from_card:
        print("from the model card: " + ", ".join(f"{name} {settings[name]}" for name in from_card), file=sys.stderr)
    report = train_lora(
        pipe,
        args.data_dir,
        args.output,
        rank=args.rank,
        alpha=args.alpha,
        unet_targets=unet_targets,
        text_encoder_targets=text_encoder_targets,
        resolution=args.resolution,
        seed=args.seed,
        show_progress=True,
        **settings,
    )
    print(report.output)
    print(
        f"{report.steps} steps on {report.images} images in {report.seconds:.0f} s; "
        f"loss {report.first_loss:.4f} -> {report.final_loss:.4f}; {report.modules} modules, rank {report.rank}, "
        f"alpha {report.alpha:g}",
        file=sys.stderr,
    )
    return 0


def cmd_lora_list(args: argparse.Namespace) -> int:
    from aipaint_plugins.lora.api import lora_folder
    from aipaint_plugins.lora.library import short_hash

    folder = lora_folder(args.dir, allow_pickle=True)
    files = folder.files()
    if not files:
        print(f"no LoRAs in {folder.root}")
        return 0
    rows: list[tuple[Any, ...]] = []
    for file in files:
        size = file.path.stat().st_size / 2**20
        note = "  (pickle: needs allow_pickle)" if file.is_pickle else ""
        digest = f"{short_hash(file.path)}  " if args.hashes else ""
        rows.append((file.name, digest, size, note))
    width = max(len(r[0]) for r in rows)
    for name, digest, size, note in rows:
        print(f"{name:<{width}}  {digest}{size:8.1f} MiB{note}")
    return 0
