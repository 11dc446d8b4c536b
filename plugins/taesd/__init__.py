"""Tiny autoencoders (TAESD, TAESDXL, TAESD3, TAEF1: diffusers' ``AutoencoderTiny``) for fast
final decoding and live previews.

A tiny autoencoder decodes the model's latents about as a full VAE does, from a network a few
times smaller (madebyollin's distilled decoders; ~1.2 M parameters for SD's). It is a per-job
option: ``options={"vae_decoder": {"kind": "taesd", "path": "/models/taesd"}}``, on the command
line ``--vae-decoder taesd:/models/taesd``. While the job runs it replaces the model's VAE
decoder for the final images (``decode``, default on) and is the decoder ``"auto"`` previews use
(``previews``, default on); the model's own VAE is untouched and still encodes (img2img,
inpainting). Recorded in the PNG as ``Tiny VAE decoder: taesd (<folder name>)``.

Only diffusers-format folders (``config.json`` + ``diffusion_pytorch_model.safetensors``, as
``madebyollin/taesd`` and ``madebyollin/taesdxl`` publish them) are read, and only as
safetensors. The folder's latent channels must match the model's (4 for SD and SDXL, 16 for
SD3 and FLUX) and the kind's; kind ``custom`` is for one distilled for another latent (the
embedded model's is ``custom:benchmarks/results/taesd-embedded``, 8 channels).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from aipaint import hookimpl
from aipaint.api.options import OptionGroup
from aipaint.errors import InvalidParameter, ModelLoadError
from aipaint.plugin.adapters import AdapterActivation, AdapterSpec

if TYPE_CHECKING:
    from aipaint.plugin.adapters import AdapterContext

KINDS: dict[str, int | None] = {"taesd": 4, "taesdxl": 4, "taesd3": 16, "taef1": 16, "custom": None}
"""The tiny autoencoder formats (madebyollin's names) and their latent channels; ``custom`` is one
distilled for another latent (e.g. ``benchmarks/taesd_embedded.py``'s, 8 channels for the embedded
model), checked only against the model it decodes for."""


@dataclass(frozen=True)
class TinyVAEOptions(OptionGroup):
    """Which tiny autoencoder decodes this job's latents (and its previews)."""

    namespace: ClassVar[str] = "vae_decoder"
    description: ClassVar[str] = "a tiny autoencoder (TAESD family) for the final decode and the previews"
    kind: str = "taesd"
    path: str = ""
    decode: bool = True
    previews: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidParameter("vae_decoder.kind", self.kind, f"must be one of {', '.join(KINDS)}")
        if not self.path:
            raise InvalidParameter("vae_decoder.path", self.path, "must be the folder of a diffusers AutoencoderTiny "
                                                                  "(config.json and diffusion_pytorch_model.safetensors)")


def parse_decoder_argument(text: str) -> dict[str, str]:
    """``--vae-decoder KIND:PATH`` as the ``vae_decoder`` options (``PATH`` alone means ``taesd``)."""
    kind, sep, path = text.partition(":")
    if not sep or kind.lower() not in KINDS:
        if sep and len(kind) > 1:  # a KIND: prefix that is not one of ours
            raise InvalidParameter("--vae-decoder", text, f"must be KIND:PATH with KIND one of {', '.join(KINDS)}")
        return {"kind": "taesd", "path": text}
    return {"kind": kind.lower(), "path": path}


_cache: dict[tuple[str, float], Any] = {}


def load_tiny_autoencoder(path: str | Path, kind: str = "taesd") -> Any:
    """An ``AutoencoderTiny`` from a diffusers folder (safetensors only), cached by path and time."""
    folder = Path(path).expanduser()
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not (folder / "config.json").is_file() or not weights.is_file():
        raise ModelLoadError(f"{folder} is not a diffusers AutoencoderTiny folder (config.json and "
                             f"diffusion_pytorch_model.safetensors); e.g. `hf download madebyollin/{kind} "
                             f"--local-dir <folder>` on a connected machine")
    key = (str(folder.resolve()), weights.stat().st_mtime)
    if key not in _cache:
        from diffusers import AutoencoderTiny

        try:
            tiny = AutoencoderTiny.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"could not load the tiny autoencoder {folder}: {exc}") from exc
        _cache.clear()  # one at a time
        _cache[key] = tiny.eval()
    tiny = _cache[key]
    if KINDS[kind] is not None and int(tiny.config.latent_channels) != KINDS[kind]:
        raise ModelLoadError(f"{folder} has {tiny.config.latent_channels} latent channels; a {kind} has {KINDS[kind]}")
    return tiny


def tiny_decode_call(tiny: Any, model: Any) -> Callable[[Any], Any]:
    """A replacement for ``model.vae_decode_call``: the model hands it ``latents / scaling_factor``
    (the full VAE's input); a tiny autoencoder reads the latents the UNet sees (its own scaling
    factor is 1), so the model's factor is put back first."""
    factor = float(model.scaling_factor) / float(tiny.config.scaling_factor)

    def call(latents: Any) -> Any:
        return tiny.decode(latents.to(tiny.device, tiny.dtype) * factor, return_dict=False)[0]

    return call


@contextmanager
def activate(context: AdapterContext) -> Iterator[AdapterActivation]:
    from aipaint.api.options import option_group

    options = option_group(context.request.options or {}, TinyVAEOptions)
    model = context.model
    tiny = load_tiny_autoencoder(options.path, options.kind)
    if int(tiny.config.latent_channels) != model.latent_channels:
        raise InvalidParameter("vae_decoder.path", options.path,
                               f"is a {tiny.config.latent_channels}-channel tiny autoencoder; this model's latents "
                               f"have {model.latent_channels} channels")
    tiny.to(model.device, model.dtype)
    saved_call, saved_preview = model.vae_decode_call, getattr(model, "preview_decoder", None)
    try:
        if options.decode:
            model.vae_decode_call = tiny_decode_call(tiny, model)
        if options.previews:
            model.preview_decoder = tiny
        name = Path(options.path).expanduser().name
        yield AdapterActivation(infotext={"Tiny VAE decoder": f"{options.kind} ({name})" if options.decode
                                          else f"{options.kind} ({name}), previews only"})
    finally:
        model.vae_decode_call = saved_call
        model.preview_decoder = saved_preview


def wants(context: AdapterContext) -> bool:
    return (context.request.options or {}).get("vae_decoder") is not None


def options_from_args(args: argparse.Namespace, png_params: dict[str, str]) -> dict[str, dict[str, Any]]:
    given = getattr(args, "vae_decoder", None)
    return {"vae_decoder": parse_decoder_argument(given)} if given else {}


@hookimpl
def register_options(register: Callable[[type[OptionGroup]], None]) -> None:
    register(TinyVAEOptions)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(AdapterSpec(name="tiny_vae", activate=activate, wants=wants,
                         description="a tiny autoencoder (TAESD, TAESDXL, TAESD3, TAEF1) decodes the job's images "
                                     "and previews, through the vae_decoder option"))


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_request_options_builder, generation_parsers

    for parser in generation_parsers(subparsers):
        parser.add_argument("--vae-decoder", metavar="KIND:PATH",
                            help="decode with a tiny autoencoder folder (KIND: " + ", ".join(KINDS)
                                 + "); previews asked for with the 'auto' method use it too")
        add_request_options_builder(parser, options_from_args)
