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
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", "--learning-rate", type=float, default=1e-4, dest="learning_rate")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--resolution", type=int, help="training size in pixels (default: the model's default size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-text-encoder", action="store_true", help="also train LoRA layers on the text encoder")
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


def cmd_train_lora(args: argparse.Namespace) -> int:
    import torch
    from aipaint_plugins.lora.train import train_lora

    import aipaint

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = aipaint.load(args.model, device=args.device)
    report = train_lora(
        pipe,
        args.data_dir,
        args.output,
        rank=args.rank,
        alpha=args.alpha,
        steps=args.steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        resolution=args.resolution,
        seed=args.seed,
        train_text_encoder=args.train_text_encoder,
        show_progress=True,
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
