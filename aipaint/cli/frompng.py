"""``--from-png``: the request fields an A1111-style PNG recorded, and the model it names."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from aipaint.errors import AipaintError


def png_request_fields(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The request fields ``args.from_png`` recorded, and its raw parameters (what plugins'
    builders read). Without ``-m``, ``args.model`` becomes the model the PNG names when that is
    a zoo model available here."""
    from aipaint.infotext import Infotext, generation_kwargs, read_png_parameters

    text = read_png_parameters(args.from_png)
    if not text:
        raise AipaintError(f"{args.from_png} carries no generation parameters to regenerate from")
    info = Infotext.from_text(text)
    fields = generation_kwargs(info)
    size = info.size()
    if size and "width" not in fields and getattr(args, "image", None) is None:
        # An outpainted PNG's Size is its canvas, which generation_kwargs leaves to
        # outpainting (it works the canvas out from the image); txt2img redraws that
        # canvas. The image commands keep their input image's size.
        fields["width"], fields["height"] = size
    if args.model is None:
        _model_from_png(args, info.params)
    return fields, info.params


def _available_here(card: Any) -> str | None:
    """Why the zoo model ``card`` cannot be loaded here without a download, or None when it can."""
    from pathlib import Path

    from aipaint.models import zoo
    from aipaint.plugin.host import default_host

    if card.family not in default_host().registry.families:
        return f"it needs the model family {card.family!r}, which no installed plugin provides"
    source = card.source
    kind = source.get("kind")
    if kind == "embedded" and (zoo.zoo_root() / source.get("path", "")).exists():
        return None
    if kind == "local" and Path(source.get("path", "")).expanduser().exists():
        return None
    if kind == "hub":
        try:
            import huggingface_hub

            if source.get("file"):
                if isinstance(huggingface_hub.try_to_load_from_cache(source["repo"], source["file"]), str):
                    return None
            else:
                huggingface_hub.snapshot_download(source["repo"], local_files_only=True)
                return None
        except Exception:  # not in the local cache (the error types vary between hub versions)
            pass
        return "it is not downloaded yet"
    return "its files are not on this machine"


def _model_from_png(args: argparse.Namespace, params: dict[str, str]) -> None:
    """Use the model the PNG names when it is a zoo model available here, else keep the
    default and say on stderr which model the PNG names."""
    from aipaint.models import zoo

    name = params.get("Model", "").strip()
    digest = params.get("Model hash", "").strip().lower()
    if not name and not digest:
        return
    card = zoo.find(name) if name else None
    if card is None and len(digest) >= 8:  # A1111's short hash: the first 10 hex digits of the file's sha256
        card = next((c for c in zoo.cards() if any(str(f.get("sha256", "")).lower().startswith(digest) for f in c.files)), None)
    problem = _available_here(card) if card is not None else None
    if card is not None and problem is None:
        args.model = card.id
        return
    named = f"the model {name!r}" + (f" (hash {digest})" if digest else "") if name else f"the model of hash {digest}"
    if card is not None:
        why, advice = f"the zoo model {card.id!r}, but {problem}", f"pass -m {card.id} to use it"
    else:
        why, advice = "which is not in the zoo", "pass -m with that model (a file, folder or hub id) to use it"
    print(f"aipaint: warning: {args.from_png} was made with {named}, {why}; using the default model "
          f"{zoo.DEFAULT_MODEL!r} instead ({advice})", file=sys.stderr)
