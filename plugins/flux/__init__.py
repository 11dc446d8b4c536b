"""The FLUX.1 family: dev (guidance-distilled) and schnell (timestep-distilled).

FLUX is a rectified-flow transformer over 16-channel latents, conditioned on T5-XXL's token
embeddings and CLIP-L's pooled embedding. It runs in the core's latent loop through its flow
form (``FlowPlan``): this plugin packs latents into the transformer's 2×2 patches, computes
the size-dependent shift, and feeds dev's *distilled guidance* — a number the transformer
takes as an input, Forge's "Distilled CFG Scale" — while real CFG stays at 1 (no negative
pass) unless asked for.

Loads diffusers folders, and single-file transformer checkpoints (BFL's ``flux1-dev``/
``flux1-schnell.safetensors`` and fine-tunes in that format, with or without ComfyUI's
``model.diffusion_model.`` prefix) with the configs in ``zoo/configs/flux1-dev`` and
``zoo/configs/flux1-schnell``; the VAE and text encoders then come from a diffusers FLUX
folder given as the config.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.api.options import OptionGroup
from aipaint.errors import ModelLoadError
from aipaint.models.family import LoadOptions, ModelFamily, ModelSource

if TYPE_CHECKING:
    import torch
    from aipaint_plugins.flux.model import FluxModel

PIPELINE_CLASSES = {"FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"}
# BFL's transformer keys (ComfyUI's all-in-one files prefix them with model.diffusion_model.)
TRANSFORMER_KEY = "double_blocks.0.img_attn.qkv.weight"
GUIDANCE_KEY = "guidance_in.in_layer.weight"  # dev only
PREFIXES = ("", "model.diffusion_model.")
DEV_STEPS, SCHNELL_STEPS = 28, 4  # diffusers' FluxPipeline default; schnell's 4 steps
T5_LENGTH = {"dev": 512, "schnell": 256}  # diffusers' max_sequence_length for each


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


class Flux(ModelFamily):
    name = "flux"
    load_options = ()
    aliases = ("flux1", "flux.1", "flux-dev", "flux-schnell", "flux1-dev", "flux1-schnell")
    base_models = (r"flux[.\- ]?1(?!\d)", r"black-forest-labs/flux\.1")  # FLUX.1, not FLUX.2
    air_ecosystem = "flux1"
    description = "FLUX.1 dev and schnell (rectified-flow transformer; T5-XXL + CLIP-L; dev's distilled guidance)"
    default_size = (1024, 1024)

    def identify(self, source: ModelSource) -> bool:
        if source.kind == "folder":
            index = source.model_index()
            return index.get("_class_name") in PIPELINE_CLASSES and "transformer" in index
        if source.path.suffix != ".safetensors":
            return False
        keys = set(source.checkpoint_keys())
        return any(prefix + TRANSFORMER_KEY in keys for prefix in PREFIXES)

    def load(self, source: ModelSource, options: LoadOptions) -> FluxModel:
        model = self._load_folder(source, options) if source.kind == "folder" else self._load_file(source, options)
        for module in model.modules().values():
            module.eval().requires_grad_(False)
        return model

    def _load_folder(self, source: ModelSource, options: LoadOptions, transformer: Any = None,
                     hash_path: Path | None = None) -> FluxModel:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        path = source.path
        parts = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"]
        parts += [] if transformer is not None else ["transformer"]
        for part in parts:
            if not (path / part).is_dir():
                raise ModelLoadError(f"{path} is not a FLUX folder: it has no {part}/ sub-folder")
        dtype = _torch_dtype(options.dtype)
        safetensors_only = None if source.allow_pickle else True
        te_options: dict[str, Any] = {"dtype": dtype, "use_safetensors": safetensors_only, "local_files_only": True}
        try:
            if transformer is None:
                transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype,
                                                                     use_safetensors=safetensors_only)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, use_safetensors=safetensors_only)
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **te_options)
            text_encoder_2 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", **te_options)
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
            tokenizer_2 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load the FLUX folder {path}: {exc}") from exc
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        if hash_path is None:
            weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
            hash_path = weights if weights.is_file() else None
        components = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                      "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2}
        return self._assemble(source, options, components, scheduler_config, hash_path)

    def _load_file(self, source: ModelSource, options: LoadOptions) -> FluxModel:
        """A BFL-format transformer file; everything else from a diffusers FLUX folder (``config``)."""
        keys = set(source.checkpoint_keys())
        variant = "dev" if any(prefix + GUIDANCE_KEY in keys for prefix in PREFIXES) else "schnell"
        card_config = (source.card or {}).get("config")
        config = options.config or (default_config(card_config.removeprefix("configs/")) if card_config else None)
        config = Path(config or default_config(f"flux1-{variant}"))
        if not _has_weights(config):
            raise ModelLoadError(
                f"{source.path.name} holds only the FLUX transformer; its VAE, CLIP-L and T5-XXL text encoders and "
                f"tokenizers come from a diffusers FLUX.1 folder: pass one as the config (`--config FOLDER`, "
                f"config=FOLDER), e.g. a download of black-forest-labs/FLUX.1-{variant} ({config} has configs only)"
            )
        from aipaint_plugins.flux.checkpoint import load_transformer

        try:
            transformer = load_transformer(str(source.path), str(config / "transformer"), _torch_dtype(options.dtype))
        except Exception as exc:
            raise ModelLoadError(
                f"could not load {source.path.name} as a FLUX.1 {variant} transformer with the config {config}: {exc}"
            ) from exc
        from aipaint.models.loading import refuse_missing_weights

        refuse_missing_weights(source.path, config, {"transformer": transformer}, "FLUX")
        folder = ModelSource(config, "folder", source.name, source.card, source.allow_pickle)
        model = self._load_folder(folder, options, transformer=transformer, hash_path=source.path)
        model.source_path = source.path
        return model

    def _assemble(self, source: ModelSource, options: LoadOptions, components: dict[str, Any],
                  scheduler_config: dict[str, Any], hash_path: Path | None) -> FluxModel:
        from aipaint_plugins.flux.model import FluxModel

        from aipaint.models.latent import ModelDefaults

        transformer = components["transformer"]
        vae = components["vae"]
        latent_channels = int(vae.config.latent_channels)
        if int(transformer.config.in_channels) != 4 * latent_channels:
            raise ModelLoadError(
                f"{source.path}: the FLUX transformer takes {transformer.config.in_channels} input channels, not "
                f"{4 * latent_channels} (4 × the VAE's latent channels); FLUX.1 Fill, Depth and Canny models "
                "(extra input channels) are not supported"
            )
        if options.dtype == "float16" and getattr(vae.config, "force_upcast", False):
            vae = vae.float()
        dev = bool(transformer.config.guidance_embeds)
        defaults = ModelDefaults(width=self.default_size[0], height=self.default_size[1],
                                 steps=DEV_STEPS if dev else SCHNELL_STEPS, cfg_scale=1.0, sampler="Euler")

        def place(module: Any) -> Any:
            return module.to(options.device)

        return FluxModel(
            family=self.name,
            name=source.name,
            transformer=place(transformer),
            vae=place(vae),
            text_encoder=place(components["text_encoder"]),
            tokenizer=components["tokenizer"],
            text_encoder_2=place(components["text_encoder_2"]),
            tokenizer_2=components["tokenizer_2"],
            max_sequence_length=T5_LENGTH["dev" if dev else "schnell"],
            scheduler_config=scheduler_config,
            source_path=source.path,
            hash_path=hash_path if hash_path is not None and hash_path.is_file() else None,
            defaults=defaults,
            device=options.device,
            dtype=_torch_dtype(options.dtype),
        )


def _has_weights(folder: Path) -> bool:
    """Whether a config folder also holds the VAE's and text encoders' weights (a real FLUX folder)."""
    return all(any((folder / part).glob("*.safetensors")) or any((folder / part).glob("*.bin"))
               for part in ("vae", "text_encoder", "text_encoder_2"))


def default_config(name: str) -> Path:
    from aipaint.models.zoo import zoo_root

    return zoo_root() / "configs" / name


def options_from_png(args: argparse.Namespace, png_params: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``--distilled-cfg-scale``, else the "Distilled CFG Scale" a ``--from-png`` image recorded (Forge's name)."""
    from aipaint_plugins.flux.options import INFOTEXT_KEY

    given = getattr(args, "distilled_cfg_scale", None)
    if given is not None:
        return {"flux": {"distilled_cfg_scale": given}}
    recorded = png_params.get(INFOTEXT_KEY, "").strip()
    return {"flux": {"distilled_cfg_scale": recorded}} if recorded else {}


@hookimpl
def register_options(register: Callable[[type[OptionGroup]], None]) -> None:
    from aipaint_plugins.flux.options import FluxOptions

    register(FluxOptions)


@hookimpl
def register_models(register: Callable[[ModelFamily], None]) -> None:
    register(Flux())


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_request_options_builder, generation_parsers

    for parser in generation_parsers(subparsers):
        parser.add_argument("--distilled-cfg-scale", type=float, default=None, metavar="G",
                            help="FLUX.1 dev's distilled guidance (Forge's 'Distilled CFG Scale', default 3.5); "
                                 "real CFG (--cfg-scale) stays 1 for FLUX")
        add_request_options_builder(parser, options_from_png)
