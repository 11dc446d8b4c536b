"""The commands about model files and where they come from: ``get`` (download from Civitai, the
Hugging Face Hub or a URL into the right folder), ``models`` (what is installed, with each
card), ``identify`` (a local file's card, found on Civitai by its hash) and ``triggers`` (a
prompt with its LoRAs' trigger words added). HTTP libraries load only inside the commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

KIND_CHOICES = "checkpoint, lora, embedding, vae, controlnet, upscaler"


def _progress(enabled: bool) -> tuple[Any, Any]:
    """``(update, close)`` of a byte progress bar on stderr (None, no-op when disabled)."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total or None, initial=0, unit="B", unit_scale=True, unit_divisor=1024,
                                      file=sys.stderr, leave=False)
        bar.update(done - bar.n)

    def close() -> None:
        if "bar" in state:
            state["bar"].close()

    return update, close


def _describe(card: dict[str, Any]) -> str:
    parts = []
    name = card.get("name")
    if name:
        parts.append(f"{name} {card['version']}" if card.get("version") else str(name))
    if card.get("base_model"):
        family = f" ({card['family']})" if card.get("family") else ""
        parts.append(f"for {card['base_model']}{family}")
    return ", ".join(parts)


def cmd_get(args: argparse.Namespace) -> int:
    from aipaint.sources import get
    from aipaint.sources.base import kind_words

    update, close = _progress(not args.no_progress and sys.stderr.isatty())
    try:
        result = get(args.source, kind=args.kind, name=args.name, file=args.file, sha256=args.sha256, folder=args.dir,
                     allow_pickle=args.allow_pickle, force=args.force, progress=update)
    finally:
        close()
    card = result.card
    verb = "installed" if result.downloaded else "already installed (sha256 verified)"
    about = _describe(card)
    print(f"{verb}: {kind_words(card['kind'])} {result.path}" + (f" — {about}" if about else ""))
    words = card.get("trigger_words") or []
    if words:
        print(f"trigger words: {', '.join(words)}")
    if card.get("license"):
        print(f"licence: {card['license']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from aipaint.sources import installed
    from aipaint.sources.base import KINDS, folder_for

    models = installed(args.kind)
    if args.json:
        print(json.dumps([m.as_dict() for m in models], indent=2))
        return 0
    if not models:
        kinds = [args.kind] if args.kind else list(KINDS)
        print("no models installed in " + ", ".join(str(folder_for(k)) for k in kinds), file=sys.stderr)
        return 0
    for model in models:
        info = model.as_dict()
        family = info["family"] or "?"
        if not model.card:
            detail = "(no card: `aipaint identify FILE` looks it up)"
        else:
            detail = " ".join(filter(None, [
                f"[{info['base_model']}]" if info["base_model"] else "",
                f"triggers: {', '.join(info['trigger_words'])}" if info["trigger_words"] else "",
                f"weight {info['recommended_weight']}" if info["recommended_weight"] is not None else "",
                info["link"] or "",
            ]))
        print(f"{model.kind:<11} {model.name:<32} {family:<8} {detail}")
    return 0


def cmd_identify(args: argparse.Namespace) -> int:
    from aipaint.sources import identify
    from aipaint.sources.base import kind_words
    from aipaint.sources.cards import card_path

    card = identify(args.file, write=not args.no_write)
    about = _describe(card)
    print(f"{args.file}: {kind_words(card['kind'])}" + (f" — {about}" if about else "") + (f" {card['link']}" if card.get("link") else ""))
    if card.get("trigger_words"):
        print(f"trigger words: {', '.join(card['trigger_words'])}")
    if not args.no_write:
        print(f"card written to {card_path(args.file)}")
    return 0


def cmd_triggers(args: argparse.Namespace) -> int:
    from aipaint.sources import prompt_with_trigger_words

    prompt, added = prompt_with_trigger_words(args.prompt, lora_folder=args.lora_dir)
    print(prompt)
    if added:
        print(f"(added: {', '.join(added)})", file=sys.stderr)
    return 0


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "get", help="download a model, LoRA, embedding, VAE, ControlNet or upscaler from Civitai, the Hub or a URL",
        description="Download a file into its folder under the aipaint home ($AIPAINT_HOME, by default ~/.aipaint), "
        "verified against the sha256 its source publishes, with its card beside it. SOURCE: a Civitai model link "
        "(https://civitai.com/models/ID?modelVersionId=V), an AIR (urn:air:sd1:lora:civitai:ID@V), civitai:ID[@V], "
        "a file's sha256 or AutoV2 hash (looked up on Civitai), a Hugging Face repo or file link (or hf:ORG/NAME/FILE), "
        "or an https URL with --sha256. Tokens: $CIVITAI_API_TOKEN, $HF_TOKEN or $AIPAINT_HOME/tokens.json.")
    p.add_argument("source", help="what to download (see above)")
    p.add_argument("--kind", help=f"what it is, when the source does not say: {KIND_CHOICES}")
    p.add_argument("--name", help="install under this file name instead of the one the source gives")
    p.add_argument("--file", help="which of the source's files (by name), when it has several")
    p.add_argument("--sha256", help="the sha256 the file must have (required for a plain URL)")
    p.add_argument("--dir", help="install into this folder instead of the kind's folder")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a pickle-based file (.pt, .ckpt, .bin, .pth) when the source has no .safetensors")
    p.add_argument("--force", action="store_true", help="replace a different file of the same name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_get)

    p = subparsers.add_parser("models", help="list installed models, LoRAs, embeddings, … with their cards")
    p.add_argument("--kind", help=f"only this kind: {KIND_CHOICES}")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = subparsers.add_parser("identify", help="find a local model file on Civitai by its hash and write its card")
    p.add_argument("file")
    p.add_argument("--no-write", action="store_true", help="print what was found; write no card")
    p.set_defaults(func=cmd_identify)

    p = subparsers.add_parser("triggers", help="print a prompt with the trigger words of the LoRAs it names added")
    p.add_argument("prompt")
    p.add_argument("--lora-dir", help="the LoRA folder (default: $AIPAINT_LORA_DIR or $AIPAINT_HOME/loras)")
    p.set_defaults(func=cmd_triggers)
