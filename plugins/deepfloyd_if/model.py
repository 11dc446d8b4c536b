"""The loaded DeepFloyd IF cascade: stage I, and optionally stage II and the stage III upscaler.

Each stage is a diffusers folder, loaded from diffusers *models* and *schedulers* (and the
T5 encoder through transformers); the loop that runs them is in :mod:`.loop`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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

STAGE_NAMES = ("stage I", "stage II", "stage III")


@dataclass
class StageDefaults:
    """What a stage runs with when the request leaves it open (diffusers' and DeepFloyd's defaults)."""

    steps: int
    cfg_scale: float
    noise_level: int | None = None  # for the stages that take a low-resolution image


DEFAULT_STAGE_SETTINGS = (StageDefaults(100, 7.0), StageDefaults(50, 4.0, 250), StageDefaults(75, 9.0, 100))


@dataclass
class IFStage:
    """One stage of the cascade.

    ``kind`` is ``"base"`` (text → 64×64 pixels), ``"super_resolution"`` (pixels × 4,
    conditioned on T5 and a noised low-resolution image) or ``"upscaler"`` (Stable
    Diffusion's latent ×4 upscaler with its own CLIP text encoder and VAE).
    """

    kind: str
    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    noise_scheduler_config: dict[str, Any] | None = None
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: Any = None
    max_noise_level: int | None = None
    source: Path | None = None
    defaults: StageDefaults = field(default_factory=lambda: DEFAULT_STAGE_SETTINGS[0])

    @property
    def sample_size(self) -> int:
        return int(self.unet.config.sample_size)

    def modules(self, prefix: str) -> dict[str, torch.nn.Module]:
        parts = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        return {f"{prefix}.{k}": v for k, v in parts.items() if v is not None}


class IFCascade(GenerativeModel):
    """DeepFloyd IF as loaded: the T5 encoder and tokenizer plus one to three stages.

    It paints from text only: no init image, mask, image prompt or adapter units.
    """

    capabilities = frozenset({"txt2img"})

    def __init__(
        self,
        *,
        family: str,
        name: str,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        stages: list[IFStage],
        source_path: Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.family = family
        self.name = name
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.stages = stages
        self.source_path = source_path
        self.device = torch.device(device)
        self.dtype = dtype
        self.runtime = "torch"
        base = stages[0].sample_size
        self.defaults = ModelDefaults(width=base, height=base, steps=stages[0].defaults.steps, cfg_scale=stages[0].defaults.cfg_scale)

    def generate(
        self,
        request: GenerationRequest,
        *,
        host: PluginHost,
        progress: Callable[[int, int], None] | None = None,
        preview: Callable[[Any], None] | None = None,
    ) -> Result:
        """Run the cascade (:func:`aipaint_plugins.deepfloyd_if.loop.run_cascade`); the stages are
        read in pixels, so there is no latent preview to give."""
        from aipaint_plugins.deepfloyd_if.loop import run_cascade

        return run_cascade(self, request, progress=progress)

    def modules(self) -> dict[str, torch.nn.Module]:
        found: dict[str, torch.nn.Module] = {"text_encoder": self.text_encoder}
        for index, stage in enumerate(self.stages, start=1):
            found.update(stage.modules(f"stage{index}"))
        return found

    def __repr__(self) -> str:
        kinds = "+".join(stage.kind for stage in self.stages)
        return f"<IFCascade {self.name!r} stages={kinds} device={self.device}>"


# --- loading ---------------------------------------------------------------------------------


def load_text_encoder(path: Path, dtype: torch.dtype, safetensors_only: bool | None) -> tuple[torch.nn.Module, Any]:
    """The T5 v1.1 XXL encoder and its tokenizer, through transformers."""
    from transformers import T5EncoderModel, T5Tokenizer

    require_subfolders(path, ("text_encoder", "tokenizer"), "a DeepFloyd IF stage I folder")
    try:
        text_encoder = T5EncoderModel.from_pretrained(
            path, subfolder="text_encoder", dtype=dtype, use_safetensors=safetensors_only, local_files_only=True
        )
        tokenizer = T5Tokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"could not load the T5 text encoder of {path}: {exc}") from exc
    return text_encoder, tokenizer


def load_stage(path: Path, dtype: torch.dtype, safetensors_only: bool | None, position: int) -> IFStage:
    """Load a stage folder, telling its kind from ``model_index.json``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    index = read_model_index(path)
    cls = index.get("_class_name", "")
    defaults = DEFAULT_STAGE_SETTINGS[min(position, 2)]
    try:
        if cls == "IFPipeline":
            require_subfolders(path, ("unet", "scheduler"), "a DeepFloyd IF stage I folder")
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, use_safetensors=safetensors_only)
            return IFStage("base", unet, read_scheduler_config(path, "scheduler"), source=path, defaults=defaults)
        if cls == "IFSuperResolutionPipeline":
            require_subfolders(path, ("unet", "scheduler", "image_noising_scheduler"), "a DeepFloyd IF stage II folder")
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, use_safetensors=safetensors_only)
            return IFStage(
                "super_resolution", unet, read_scheduler_config(path, "scheduler"), read_scheduler_config(path, "image_noising_scheduler"),
                source=path, defaults=defaults,
            )
        if cls == "StableDiffusionUpscalePipeline":
            from transformers import CLIPTextModel, CLIPTokenizer

            require_subfolders(path, ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler"), "an x4 upscaler folder")
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, use_safetensors=safetensors_only)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, use_safetensors=safetensors_only)
            text_encoder = CLIPTextModel.from_pretrained(
                path, subfolder="text_encoder", dtype=dtype, use_safetensors=safetensors_only, local_files_only=True
            )
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
            return IFStage(
                "upscaler", unet, read_scheduler_config(path, "scheduler"), read_scheduler_config(path, "low_res_scheduler"), vae=vae,
                text_encoder=text_encoder, tokenizer=tokenizer, max_noise_level=int(index.get("max_noise_level", 350)),
                source=path, defaults=defaults,
            )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the IF stage folder {path}: {exc}") from exc
    raise ModelLoadError(
        f"{path} holds a {cls or 'unknown'} pipeline; an IF cascade takes IFPipeline (stage I), "
        "IFSuperResolutionPipeline (stage II) and StableDiffusionUpscalePipeline (stage III) folders"
    )
