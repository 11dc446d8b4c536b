"""The Stable Diffusion XL family: the base model and the refiner.

SDXL is a CLIP-conditioned latent model, so it runs in the core's latent loop: this
plugin only teaches it what differs — two text encoders (CLIP ViT-L and OpenCLIP bigG,
read at their penultimate layer and concatenated), the pooled embedding of the second,
and the size/crop (base) or aesthetic-score (refiner) conditioning. Prompt syntax,
samplers, image modes, adapters and the refiner hand-off are the core's.

Loads diffusers folders, and single-file checkpoints offline with the configs in
``zoo/configs/sdxl-base`` and ``zoo/configs/sdxl-refiner``.
"""

from __future__ import annotations

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
    from aipaint_plugins.sdxl.model import SDXLModel

PIPELINE_CLASSES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
BASE_TEXT_KEY = "conditioner.embedders.1.model.positional_embedding"  # OpenCLIP bigG as the second embedder
REFINER_TEXT_KEY = "conditioner.embedders.0.model.positional_embedding"  # OpenCLIP bigG alone


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    load_options = ()
    aliases = ("sdxl-base", "sdxl-refiner", "stable-diffusion-xl", "sd-xl")
    # Pony (up to V6), Illustrious and NoobAI are SDXL fine-tunes; Pony V7 is AuraFlow.
    base_models = (r"sdxl", r"stable-diffusion-xl", r"^pony(?! v7)", r"illustrious", r"noobai", r"playground v2", r"sd-xl")
    air_ecosystem = "sdxl"
    description = "Stable Diffusion XL base and refiner (two CLIP text encoders, size conditioning)"
    default_size = (1024, 1024)

    def identify(self, source: ModelSource) -> bool:
        if source.kind == "folder":
            index = source.model_index()
            return index.get("_class_name") in PIPELINE_CLASSES and "text_encoder_2" in index
        if source.path.suffix != ".safetensors":
            return False
        keys = set(source.checkpoint_keys())
        return UNET_KEY in keys and (BASE_TEXT_KEY in keys or REFINER_TEXT_KEY in keys)

    def load(self, source: ModelSource, options: LoadOptions) -> SDXLModel:
        model = self._load_folder(source, options) if source.kind == "folder" else self._load_file(source, options)
        for module in model.modules().values():
            module.eval().requires_grad_(False)
        return model

    def _load_folder(self, source: ModelSource, options: LoadOptions) -> SDXLModel:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        path = source.path
        index = source.model_index()
        has_first_encoder = bool(index.get("text_encoder") and index["text_encoder"][0])
        parts = ["unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"]
        parts += ["text_encoder", "tokenizer"] if has_first_encoder else []
        for part in parts:
            if not (path / part).is_dir():
                raise ModelLoadError(f"{path} is not an SDXL folder: it has no {part}/ sub-folder")
        dtype = _torch_dtype(options.dtype)
        safetensors_only = None if source.allow_pickle else True
        te_options: dict[str, Any] = {"dtype": dtype, "use_safetensors": safetensors_only, "local_files_only": True}
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, use_safetensors=safetensors_only)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, use_safetensors=safetensors_only)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **te_options)
            tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
            text_encoder = tokenizer = None
            if has_first_encoder:
                text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **te_options)
                tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load the SDXL folder {path}: {exc}") from exc
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        components = {
            "unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2,
        }
        unet_weights = path / "unet" / "diffusion_pytorch_model.safetensors"
        return self._assemble(source, options, components, scheduler_config, index, unet_weights)

    def _load_file(self, source: ModelSource, options: LoadOptions) -> SDXLModel:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        refiner = REFINER_TEXT_KEY in set(source.checkpoint_keys())
        card_config = (source.card or {}).get("config")
        config = options.config or (default_config(card_config.removeprefix("configs/")) if card_config else None)
        config = config or default_config("sdxl-refiner" if refiner else "sdxl-base")
        pipeline_class = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
        try:
            pipe = pipeline_class.from_single_file(
                str(source.path), config=str(config), local_files_only=True, torch_dtype=_torch_dtype(options.dtype)
            )
        except Exception as exc:
            raise ModelLoadError(f"could not load {source.path.name} as an SDXL checkpoint with the config {config}: {exc}") from exc
        components = {name: getattr(pipe, name, None) for name in
                      ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
        from aipaint.models.loading import refuse_missing_weights

        refuse_missing_weights(source.path, config, {name: components[name] for name in
                               ("unet", "vae", "text_encoder", "text_encoder_2")}, "SDXL")
        index = json.loads((Path(config) / "model_index.json").read_text())
        return self._assemble(source, options, components, dict(pipe.scheduler.config), index, source.path)

    def _assemble(
        self,
        source: ModelSource,
        options: LoadOptions,
        components: dict[str, Any],
        scheduler_config: dict[str, Any],
        index: dict[str, Any],
        hash_path: Path,
    ) -> SDXLModel:
        from aipaint_plugins.sdxl.model import SDXLModel

        from aipaint.models.latent import ModelDefaults

        def place(module: Any) -> Any:
            return module.to(options.device) if module is not None else None

        vae = place(components["vae"])
        if options.dtype == "float16" and getattr(vae.config, "force_upcast", False):
            vae = vae.float()
        return SDXLModel(
            family=self.name,
            name=source.name,
            unet=place(components["unet"]),
            vae=vae,
            text_encoder=place(components["text_encoder"]),
            tokenizer=components["tokenizer"],
            text_encoder_2=place(components["text_encoder_2"]),
            tokenizer_2=components["tokenizer_2"],
            scheduler_config=scheduler_config,
            requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            source_path=source.path,
            hash_path=hash_path if hash_path.is_file() else None,
            defaults=ModelDefaults(width=self.default_size[0], height=self.default_size[1]),
            device=options.device,
            dtype=_torch_dtype(options.dtype),
        )


def default_config(name: str) -> Path:
    from aipaint.models.zoo import zoo_root

    return zoo_root() / "configs" / name


@hookimpl
def register_options(register: Callable[[type[OptionGroup]], None]) -> None:
    from aipaint_plugins.sdxl.options import SDXLOptions

    register(SDXLOptions)


@hookimpl
def register_models(register: Callable[[ModelFamily], None]) -> None:
    register(StableDiffusionXL())
