"""A loaded Stable unCLIP model (``stabilityai/stable-diffusion-2-1-unclip``, ``-unclip-small``).

A Stable Diffusion 2.1 latent model whose UNet also takes a noise-augmented CLIP image
embedding as its class label, so it runs in the core's latent loop. Around it:

* an image normaliser (the CLIP embeddings' mean and std) and the DDPM schedule that noises
  the normalised embedding to ``noise_level``;
* the CLIP image encoder (``StableUnCLIPImg2ImgPipeline`` folders): variations and blends;
* a prior (``StableUnCLIPPipeline`` folders, or Karlo's prior for the ViT-L ``-small``
  model): text-to-image.

Its capabilities follow what is loaded (``txt2img`` with a prior, ``variations`` and ``blend``
with an image encoder, adapters always); the UNet's class labels join each job through
:meth:`StableUnCLIPModel.job_contributors` (see :mod:`.stable_labels`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aipaint.errors import ModelLoadError
from aipaint.models.family import read_model_index, read_scheduler_config, require_subfolders
from aipaint.models.latent import LatentDiffusionModel, ModelDefaults

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.engine.loop import LoopContributor
    from aipaint.prompt import ParsedPrompt

IMAGE_PIPELINE = "StableUnCLIPImg2ImgPipeline"
TEXT_PIPELINE = "StableUnCLIPPipeline"
KARLO_TEXT_PIPELINE = "UnCLIPPipeline"
FOLDER_CLASSES = (IMAGE_PIPELINE, TEXT_PIPELINE)
# diffusers' defaults for both Stable unCLIP pipelines (the prior's are Karlo's).
DEFAULT_STEPS, DEFAULT_CFG_SCALE, DEFAULT_SAMPLER = 20, 10.0, "DDIM"
DEFAULT_PRIOR_STEPS, DEFAULT_PRIOR_CFG_SCALE = 25, 4.0


class StableUnCLIPModel(LatentDiffusionModel):
    """The latent model plus what turns images or text into the UNet's class label.

    ``image_encoder`` is None without variations and blends, ``prior`` None without text-to-image.
    """

    def __init__(
        self,
        *,
        image_normalizer: torch.nn.Module,
        noising_scheduler_config: dict[str, Any],
        image_encoder: torch.nn.Module | None = None,
        feature_extractor: Any = None,
        prior: torch.nn.Module | None = None,
        prior_text_encoder: torch.nn.Module | None = None,
        prior_tokenizer: Any = None,
        prior_scheduler_config: dict[str, Any] | None = None,
        **latent_parts: Any,
    ) -> None:
        super().__init__(**latent_parts)
        self.image_normalizer = image_normalizer
        self.noising_scheduler_config = noising_scheduler_config
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.prior = prior
        self.prior_text_encoder = prior_text_encoder
        self.prior_tokenizer = prior_tokenizer
        self.prior_scheduler_config = prior_scheduler_config
        # No img2img, inpainting or refiner: the UNet needs an image embedding the image modes would not give it.
        self.capabilities = frozenset(
            {"adapters"} | ({"txt2img"} if prior is not None else set())
            | ({"variations", "blend"} if image_encoder is not None else set())
        )

    def missing_hint(self, feature: str) -> str:
        if feature == "txt2img" and self.prior is None:
            return ("It has no prior, so no text-to-image: use variations() or blend(), or load it with "
                    "prior=<a Karlo UnCLIPPipeline or StableUnCLIPPipeline folder> (Karlo's prior fits the ViT-L -small model)")
        if feature in ("variations", "blend") and self.image_encoder is None:
            return "It has no CLIP image encoder: load it with image_encoder=<a StableUnCLIPImg2ImgPipeline folder>"
        if feature in ("img2img", "inpaint", "outpaint", "refiner"):
            return "Its UNet needs a CLIP image embedding: use txt2img (with a prior), variations(image) or blend(images)"
        return ""

    def job_contributors(
        self, request: GenerationRequest, *, prompt: ParsedPrompt, generators: list[torch.Generator]
    ) -> tuple[list[LoopContributor], dict[str, str]]:
        """The noise-augmented image embedding of the prior or of the image prompts, as the UNet's class labels."""
        from aipaint_plugins.unclip.stable_labels import image_embedding_labels

        return image_embedding_labels(self, request, prompt, generators)

    @property
    def embedding_dim(self) -> int:
        return int(self.image_normalizer.config.embedding_dim)

    @property
    def max_noise_level(self) -> int:
        return int(self.noising_scheduler_config.get("num_train_timesteps", 1000)) - 1

    def modules(self) -> dict[str, torch.nn.Module]:
        parts = {**super().modules(), "image_normalizer": self.image_normalizer, "image_encoder": self.image_encoder,
                 "prior": self.prior, "prior_text_encoder": self.prior_text_encoder}
        return {name: module for name, module in parts.items() if module is not None}


# --- loading ---------------------------------------------------------------------------------


def _options(dtype: torch.dtype, safetensors_only: bool | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """from_pretrained keywords for diffusers models and for transformers models."""
    return ({"torch_dtype": dtype, "use_safetensors": safetensors_only},
            {"dtype": dtype, "use_safetensors": safetensors_only, "local_files_only": True})


def load_folder(path: Path, dtype: torch.dtype, safetensors_only: bool | None) -> dict[str, Any]:
    """The components of a Stable unCLIP folder, by the names :class:`StableUnCLIPModel` takes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    cls = read_model_index(path).get("_class_name")
    if cls not in FOLDER_CLASSES:
        raise ModelLoadError(f"{path} holds a {cls or 'unknown'} pipeline, not {IMAGE_PIPELINE} or {TEXT_PIPELINE}")
    common = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "image_normalizer", "image_noising_scheduler")
    require_subfolders(path, common + (("image_encoder", "feature_extractor") if cls == IMAGE_PIPELINE else ()),
             f"a Stable unCLIP {cls} folder")
    diffusers_options, te_options = _options(dtype, safetensors_only)
    try:
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", **diffusers_options),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **diffusers_options),
            "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **te_options),
            "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
            "image_normalizer": StableUnCLIPImageNormalizer.from_pretrained(path, subfolder="image_normalizer",
                                                                            **diffusers_options),
            "scheduler_config": read_scheduler_config(path, "scheduler"),
            "noising_scheduler_config": read_scheduler_config(path, "image_noising_scheduler"),
        }
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the Stable unCLIP folder {path}: {exc}") from exc
    if cls == IMAGE_PIPELINE:
        parts.update(load_image_encoder(path, dtype, safetensors_only))
    else:
        parts.update(load_prior(path, dtype, safetensors_only))
    return parts


def load_image_encoder(path: Path, dtype: torch.dtype, safetensors_only: bool | None) -> dict[str, Any]:
    """The CLIP image encoder and its preprocessor of a ``StableUnCLIPImg2ImgPipeline`` folder."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    cls = read_model_index(path).get("_class_name")
    if cls != IMAGE_PIPELINE:
        raise ModelLoadError(f"{path} holds a {cls or 'unknown'} pipeline: image_encoder= takes a {IMAGE_PIPELINE} folder")
    require_subfolders(path, ("image_encoder", "feature_extractor"), f"a Stable unCLIP {cls} folder")
    _, te_options = _options(dtype, safetensors_only)
    try:
        return {
            "image_encoder": CLIPVisionModelWithProjection.from_pretrained(path, subfolder="image_encoder", **te_options),
            "feature_extractor": CLIPImageProcessor.from_pretrained(path, subfolder="feature_extractor", local_files_only=True),
        }
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the CLIP image encoder of {path}: {exc}") from exc


def load_prior(path: Path, dtype: torch.dtype, safetensors_only: bool | None) -> dict[str, Any]:
    """A text-to-image-embedding prior with its CLIP text encoder: from a ``StableUnCLIPPipeline``
    folder (``prior_*`` sub-folders) or a Karlo ``UnCLIPPipeline`` folder (whose text encoder
    is the prior's)."""
    from diffusers import PriorTransformer
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    cls = read_model_index(path).get("_class_name")
    if cls == TEXT_PIPELINE:
        names = {"text_encoder": "prior_text_encoder", "tokenizer": "prior_tokenizer"}
    elif cls == KARLO_TEXT_PIPELINE:
        names = {"text_encoder": "text_encoder", "tokenizer": "tokenizer"}
    else:
        raise ModelLoadError(
            f"{path} holds a {cls or 'unknown'} pipeline: a prior comes from a {TEXT_PIPELINE} or a Karlo "
            f"{KARLO_TEXT_PIPELINE} folder (e.g. kakaobrain/karlo-v1-alpha)"
        )
    require_subfolders(path, ("prior", "prior_scheduler", *names.values()), f"a {cls} folder with a prior")
    diffusers_options, te_options = _options(dtype, safetensors_only)
    try:
        return {
            "prior": PriorTransformer.from_pretrained(path, subfolder="prior", **diffusers_options),
            "prior_text_encoder": CLIPTextModelWithProjection.from_pretrained(path, subfolder=names["text_encoder"],
                                                                              **te_options),
            "prior_tokenizer": CLIPTokenizer.from_pretrained(path, subfolder=names["tokenizer"], local_files_only=True),
            "prior_scheduler_config": read_scheduler_config(path, "prior_scheduler"),
        }
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the prior of {path}: {exc}") from exc


def default_settings(unet: torch.nn.Module, vae: torch.nn.Module) -> ModelDefaults:
    """diffusers' defaults: the UNet's native size (768 px for the published models), 20 DDIM steps, CFG 10."""
    size = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    return ModelDefaults(width=size, height=size, steps=DEFAULT_STEPS, cfg_scale=DEFAULT_CFG_SCALE, sampler=DEFAULT_SAMPLER)
