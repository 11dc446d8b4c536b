"""DreamBooth: ``aipaint train dreambooth`` fine-tunes a model on a few pictures of one subject.

The subject is bound to a rare identifier word (``a sks circle``); prior preservation trains
on pictures the model itself draws of the subject's class, so the class word keeps its
meaning. Full fine-tuning writes a diffusers folder plus a single-file checkpoint; ``--lora``
trains peft LoRA layers instead and writes a kohya/A1111 LoRA file the LoRA adapter loads.
See ``docs/training.md``; the Python API is :func:`aipaint_plugins.dreambooth.train.train_dreambooth`.
"""

from __future__ import annotations

import argparse
from typing import Any

from aipaint import hookimpl

__all__ = ["train_dreambooth"]


def __getattr__(name: str) -> Any:
    # torch-heavy modules load on first use, so plugin registration and `aipaint --help` stay quick.
    if name == "train_dreambooth":
        from aipaint_plugins.dreambooth.train import train_dreambooth

        return train_dreambooth
    raise AttributeError(f"module 'aipaint_plugins.dreambooth' has no attribute {name!r}")


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint_plugins.dreambooth.commands import add_commands

    add_commands(subparsers)
