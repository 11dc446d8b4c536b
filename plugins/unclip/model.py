"""A loaded unCLIP (DALL·E 2 style, Karlo) model: prior, decoder, super-resolution, CLIP encoders.

Built from diffusers *models* (``PriorTransformer``, ``UnCLIPTextProjModel``,
``UNet2DConditionModel``, ``UNet2DModel``) and schedulers, and transformers' CLIP text and
vision encoders. The text folder (``UnCLIPPipeline``, e.g. ``kakaobrain/karlo-v1-alpha``)
gives text-to-image; an image-variations folder (``UnCLIPImageVariationPipeline``) adds
the CLIP image encoder that variations and blends need. The loop is in :mod:`.loop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aipaint.errors import ModelLoadError
from aipaint.models.family import GenerativeModel, read_model_index, read_scheduler_config, require_subfolders
from aipaint.models.latent import ModelDefaults

if TYPE_CHECKING:
    from collections.abc import Callable

    from aipaint.api.request import GenerationRequest
    from aipaint.api.result import Result
    from aipaint.plugin.host import PluginHost

TEXT_PIPELINE = "UnCLIPPipeline"
VARIATION_PIPELINE = "UnCLIPImageVariationPipeline"


@dataclass
class UnCLIPDefaults:
    """diffusers' defaults for Karlo: 25 prior, 25 decoder and 7 super-resolution steps."""

    prior_steps: int = 25
    decoder_steps: int = 25
    super_res_steps: int = 7
    prior_cfg_scale: float = 4.0
    decoder_cfg_scale: float = 8.0


class UnCLIPModel(GenerativeModel):
    """The components of an unCLIP model; ``prior`` is None when only variations are loaded,
    ``image_encoder`` is None when only text-to-image is. Its capabilities follow: ``txt2img``
    with a prior, ``variations`` and ``blend`` with an image encoder."""

    def __init__(
        self,
        *,
        family: str,
        name: str,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        text_proj: torch.nn.Module,
        decoder: torch.nn.Module,
        super_res_first: torch.nn.Module,
        super_res_last: torch.nn.Module,
        scheduler_configs: dict[str, dict[str, Any]],
        prior: torch.nn.Module | None = None,
        image_encoder: torch.nn.Module | None = None,
        feature_extractor: Any = None,
        source_path: Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.family = family
        self.name = name
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_proj = text_proj
        self.decoder = decoder
        self.super_res_first = super_res_first
        self.super_res_last = super_res_last
        self.scheduler_configs = scheduler_configs
        self.prior = prior
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.source_path = source_path
        self.device = torch.device(device)
        self.dtype = dtype
        self.runtime = "torch"
        self.capabilities = frozenset(
            ({"txt2img"} if prior is not None else set()) | ({"variations", "blend"} if image_encoder is not None else set())
        )
        self.unclip_defaults = UnCLIPDefaults()
        size = int(super_res_first.config.sample_size)
        self.defaults = ModelDefaults(width=size, height=size, steps=self.unclip_defaults.decoder_steps,
                                      cfg_scale=self.unclip_defaults.decoder_cfg_scale)

    def missing_hint(self, feature: str) -> str:
        if feature == "txt2img" and self.prior is None:
            return "It has no prior (an image-variations folder): use variations() or blend(), or load the text folder"
        if feature in ("variations", "blend") and self.image_encoder is None:
            return "It has no CLIP image encoder: load it with image_encoder=<an UnCLIPImageVariationPipeline folder>"
        return ""

    def generate(
        self,
        request: GenerationRequest,
        *,
        host: PluginHost,
        progress: Callable[[int, int], None] | None = None,
        preview: Callable[[Any], None] | None = None,
    ) -> Result:
        """Prior (or image prompts) → decoder → super-resolution (:func:`aipaint_plugins.unclip.loop.run_unclip`);
        the stages are pixels and embeddings, with no latent preview to give."""
        from aipaint_plugins.unclip.loop import run_unclip

        return run_unclip(self, request, progress=progress)

    def modules(self) -> dict[str, torch.nn.Module]:
        parts = {
            "text_encoder": self.text_encoder, "text_proj": self.text_proj, "decoder": self.decoder,
            "super_res_first": self.super_res_first, "super_res_last": self.super_res_last,
            "prior": self.prior, "image_encoder": self.image_encoder,
        }
        return {k: v for k, v in parts.items() if v is not None}

    def __repr__(self) -> str:
        modes = [m for m, ok in (("text", self.prior is not None), ("image", self.image_encoder is not None)) if ok]
        return f"<UnCLIPModel {self.name!r} inputs={'+'.join(modes)} device={self.device}>"


# --- loading ---------------------------------------------------------------------------------


def load_folder(path: Path, dtype: torch.dtype, safetensors_only: bool | None) -> dict[str, Any]:
    """The components of a Karlo text folder or image-variations folder, by name."""
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    cls = read_model_index(path).get("_class_name")
    if cls not in (TEXT_PIPELINE, VARIATION_PIPELINE):
        raise ModelLoadError(f"{path} holds a {cls or 'unknown'} pipeline, not {TEXT_PIPELINE} or {VARIATION_PIPELINE}")
    common = ("text_encoder", "tokenizer", "text_proj", "decoder", "super_res_first", "super_res_last",
              "decoder_scheduler", "super_res_scheduler")
    extra = ("prior", "prior_scheduler") if cls == TEXT_PIPELINE else ("image_encoder", "feature_extractor")
    require_subfolders(path, common + extra, f"a Karlo {cls} folder")
    diffusers_options = {"torch_dtype": dtype, "use_safetensors": safetensors_only}
    te_options: dict[str, Any] = {"dtype": dtype, "use_safetensors": safetensors_only, "local_files_only": True}
    try:
        parts: dict[str, Any] = {
            "kind": cls,
            "text_encoder": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **te_options),
            "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
            "text_proj": UnCLIPTextProjModel.from_pretrained(path, subfolder="text_proj", **diffusers_options),
            "decoder": UNet2DConditionModel.from_pretrained(path, subfolder="decoder", **diffusers_options),
            "super_res_first": UNet2DModel.from_pretrained(path, subfolder="super_res_first", **diffusers_options),
            "super_res_last": UNet2DModel.from_pretrained(path, subfolder="super_res_last", **diffusers_options),
            "scheduler_configs": {name: read_scheduler_config(path, name) for name in ("decoder_scheduler", "super_res_scheduler")},
        }
        if cls == TEXT_PIPELINE:
            parts["prior"] = PriorTransformer.from_pretrained(path, subfolder="prior", **diffusers_options)
            parts["scheduler_configs"]["prior_scheduler"] = read_scheduler_config(path, "prior_scheduler")
        else:
            from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

            parts["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(path, subfolder="image_encoder", **te_options)
            parts["feature_extractor"] = CLIPImageProcessor.from_pretrained(path, subfolder="feature_extractor", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the unCLIP folder {path}: {exc}") from exc
    return parts
