"""The Stable Diffusion 1.x model family (and every model with its architecture,
such as aipaint's embedded shapes-tiny model).

Loads diffusers folders and single-file checkpoints as shared on model sites; the
latter offline, with the diffusers config shipped in ``zoo/configs/sd15``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aipaint import hookimpl
from aipaint.errors import ModelLoadError
from aipaint.models.family import LoadOptions, ModelFamily, ModelSource

if TYPE_CHECKING:
    from aipaint.models.latent import LatentDiffusionModel

PIPELINE_CLASSES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}
SD1_TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD_UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


class StableDiffusion15(ModelFamily):
    name = "sd15"
    load_options = ()
    aliases = ("sd1", "sd1.5", "stable-diffusion-1.5", "sd")
    base_models = (r"^sd ?1\.", r"stable-diffusion-v1", r"sd-v1-", r"v1-5", r"sd15", r"^sd1\b")
    air_ecosystem = "sd1"
    description = "Stable Diffusion 1.x (CLIP ViT-L text encoder, 4-channel latents)"
    default_size = (512, 512)

    def identify(self, source: ModelSource) -> bool:
        if source.kind == "folder":
            index = source.model_index()
            if index.get("_class_name") in PIPELINE_CLASSES:
                return "text_encoder_2" not in index
            return False
        if source.path.suffix != ".safetensors" and not _trusted_pickle(source):
            return False
        keys = set(source.checkpoint_keys())
        return SD_UNET_KEY in keys and SD1_TEXT_KEY in keys

    def load(self, source: ModelSource, options: LoadOptions) -> LatentDiffusionModel:
        if source.kind == "folder":
            model = self._load_folder(source, options)
        else:
            model = self._load_file(source, options)
        for module in model.modules().values():
            module.eval().requires_grad_(False)
        return model

    def _load_folder(self, source: ModelSource, options: LoadOptions) -> LatentDiffusionModel:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        path = source.path
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not (path / part).is_dir():
                raise ModelLoadError(f"{path} is not a Stable Diffusion folder: it has no {part}/ sub-folder")
        dtype = _torch_dtype(options.dtype)
        safetensors_only = None if source.allow_pickle else True
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, use_safetensors=safetensors_only)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, use_safetensors=safetensors_only)
            text_encoder = CLIPTextModel.from_pretrained(
                path, subfolder="text_encoder", dtype=dtype, use_safetensors=safetensors_only, local_files_only=True
            )
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load the Stable Diffusion folder {path}: {exc}") from exc
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        unet_weights = path / "unet" / "diffusion_pytorch_model.safetensors"
        return self._assemble(source, options, unet, vae, text_encoder, tokenizer, scheduler_config, unet_weights)

    def _load_file(self, source: ModelSource, options: LoadOptions) -> LatentDiffusionModel:
        from diffusers import StableDiffusionPipeline

        config = options.config or _default_config()
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(source.path),
                config=str(config),
                local_files_only=True,
                torch_dtype=_torch_dtype(options.dtype),
                safety_checker=None,
                requires_safety_checker=False,
            )
        except Exception as exc:
            _raise_pickle_problem(source)
            raise ModelLoadError(f"could not load {source.path.name} as a Stable Diffusion 1.x checkpoint: {exc}") from exc
        from aipaint.models.loading import refuse_missing_weights

        refuse_missing_weights(source.path, config, {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder},
                               "Stable Diffusion 1.x")
        scheduler_config = dict(pipe.scheduler.config)
        return self._assemble(
            source, options, pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler_config, source.path
        )

    def _assemble(self, source, options, unet, vae, text_encoder, tokenizer, scheduler_config, hash_path: Path):
        from aipaint.models.latent import LatentDiffusionModel, ModelDefaults

        model = LatentDiffusionModel(
            family=self.name,
            name=source.name,
            unet=unet.to(options.device),
            vae=vae.to(options.device),
            text_encoder=text_encoder.to(options.device),
            tokenizer=tokenizer,
            scheduler_config=scheduler_config,
            source_path=source.path,
            hash_path=hash_path if hash_path.is_file() else None,
            defaults=ModelDefaults(width=self.default_size[0], height=self.default_size[1]),
            device=options.device,
            dtype=_torch_dtype(options.dtype),
        )
        return model


def _trusted_pickle(source: ModelSource) -> bool:
    """A ``.ckpt``-style file the user opted into (``allow_pickle``): many SD1.x models are
    shared only that way. Its keys are read through ``aipaint.models.weights.load_state_dict``
    (``torch.load(weights_only=True)``), and diffusers' ``from_single_file`` reads it with
    ``weights_only=True`` too (tests/test_single_file.py checks both)."""
    from aipaint.models.weights import PICKLE_SUFFIXES

    return source.allow_pickle and source.path.suffix in PICKLE_SUFFIXES


def _raise_pickle_problem(source: ModelSource) -> None:
    """diffusers hides why ``torch.load(weights_only=True)`` refused a pickle ("Unable to load
    weights"); after a failed load, re-read it through aipaint to raise the real reason
    (e.g. the forbidden global a smuggled object needs). Costs nothing on success."""
    if not _trusted_pickle(source):
        return
    from aipaint.models.weights import load_state_dict

    load_state_dict(source.path, allow_pickle=True)  # raises ModelLoadError naming the cause, if any


def _default_config() -> Path:
    from aipaint.models.zoo import zoo_root

    return zoo_root() / "configs" / "sd15"


@hookimpl
def register_models(register: Callable[[ModelFamily], None]) -> None:
    register(StableDiffusion15())
