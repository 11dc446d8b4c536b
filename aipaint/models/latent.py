"""A loaded CLIP-conditioned latent diffusion model, independent of its family.

Families build one of these from their weights; the denoise loop only talks to it
through :meth:`predict`, :meth:`encode_prompts`, :meth:`decode` and :meth:`encode`,
and runtimes (torch, ONNX Runtime, TensorRT) replace the callables behind them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aipaint.models.family import GenerativeModel

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.engine.loop import LoopContributor
    from aipaint.prompt import ParsedPrompt


@dataclass
class Conditioning:
    """What the UNet is conditioned on for one prompt: token embeddings plus extras.

    ``extras`` holds family-specific inputs (SDXL's pooled embeddings and time ids, as
    ``added_cond_kwargs``), batched along dim 0 like ``embeds``.
    """

    embeds: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        extras = {k: torch.cat([c.extras[k] for c in items]) for k in items[0].extras}
        return Conditioning(torch.cat([c.embeds for c in items]), extras)

    def repeat(self, n: int) -> Conditioning:
        return Conditioning(
            self.embeds.repeat(n, *([1] * (self.embeds.dim() - 1))),
            {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in self.extras.items()},
        )


UNetCall = Callable[..., torch.Tensor]


@dataclass
class ModelDefaults:
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "DPM++ 2M"
    schedule: str = "Automatic"
    guidance_rescale: float = 0.0
    emphasis: str = "a1111"  # how prompt weights are normalised (see aipaint.prompt.encode)


class LatentDiffusionModel(GenerativeModel):
    """Components of a Stable-Diffusion-style model plus the calls the loop makes."""

    capabilities = frozenset({"txt2img", "img2img", "inpaint", "outpaint", "refiner", "adapters"})

    def __init__(
        self,
        *,
        family: str,
        name: str,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        scheduler_config: dict[str, Any],
        source_path: Path | None = None,
        hash_path: Path | None = None,
        defaults: ModelDefaults | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.family = family
        self.name = name
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.source_path = source_path
        self.hash_path = hash_path
        self.defaults = defaults or ModelDefaults()
        self.device = torch.device(device)
        self.dtype = dtype
        self.runtime = "torch"
        self.unet_call: UNetCall = self._torch_unet
        self.vae_decode_call: Callable[[torch.Tensor], torch.Tensor] = self._torch_vae_decode
        self.vae_encode_call: Callable[[torch.Tensor], torch.Tensor] = self._torch_vae_encode
        self._hash: str | None = None
        self._encoders: dict[tuple[int, str], Any] = {}

    def job_contributors(
        self, request: GenerationRequest, *, prompt: ParsedPrompt, generators: list[torch.Generator]
    ) -> tuple[list[LoopContributor], dict[str, str]]:
        """What this family adds to one job's loop, and to its PNG parameters.

        Called after the adapters are active and before the starting noise is drawn, so a
        family may draw from each image's generator first (Stable unCLIP's image embedding).
        The base model adds nothing.
        """
        return [], {}

    # --- facts the loop needs -------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def unet_in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """The VAE's latent shift (SD 3, FLUX: latents are ``(z - shift) * scale``; 0 for SD 1.5/SDXL)."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def model_hash(self) -> str:
        """A1111's short hash ("AutoV2"): the first 10 hex digits of the weights' sha256."""
        if self._hash is None:
            from aipaint.plugin.kit.hashing import sha256_file

            path = self.hash_path or self.source_path
            self._hash = sha256_file(path)[:10] if path is not None and path.is_file() else ""
        return self._hash

    def sampling_config(self, width: int, height: int) -> dict[str, Any]:
        """The scheduler config a sampler plans over for a ``width`` × ``height`` image: the
        model's own, unless the schedule depends on the size (FLUX adds the ``mu`` of its dynamic
        shift, from the number of image tokens)."""
        return self.scheduler_config

    def request_sampling_config(self, request: GenerationRequest) -> dict[str, Any]:
        """The scheduler config a request's plan uses: :meth:`sampling_config` at the request's
        size, unless the family adjusts it per request (e.g. a flow shift a request option sets)."""
        return self.sampling_config(request.width, request.height)

    # --- text ---------------------------------------------------------------------------
    def prompt_encoder(self, clip_skip: int = 1, normalization: str = "a1111") -> Any:
        key = (clip_skip, normalization)
        if key not in self._encoders:
            from aipaint.prompt import PromptEncoder

            self._encoders[key] = PromptEncoder(self.tokenizer, self.text_encoder, clip_skip=clip_skip, normalization=normalization)
        return self._encoders[key]

    def encode_texts(self, texts: list[str], clip_skip: int = 1, normalization: str = "a1111") -> list[Conditioning]:
        """Encode several prompts to conditionings of one common length."""
        encoder = self.prompt_encoder(clip_skip, normalization)
        chunks = max(len(encoder.count_tokens(t)) for t in texts)
        with torch.inference_mode():
            out = [encoder.encode(t, min_chunks=chunks) for t in texts]
        return [Conditioning(e.to(self.device, self.dtype)) for e in out]

    def request_conditioning(self, cond: Conditioning, *, text: str, negative: bool, request: Any) -> Conditioning:
        """Add to one encoded prompt what depends on the request rather than on the text.

        Called once per distinct prompt of a generation, for the positive parts and for the
        negative (``negative=True``). Families whose networks take more than the text (size
        and crop conditioning, aesthetic scores, zeroed empty negatives) override it; the
        base model adds nothing.
        """
        return cond

    # --- networks ---------------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, **extra: Any) -> torch.Tensor:
        kwargs = dict(extra)
        if cond.extras:
            # A contributor's own added inputs (IP-Adapter's image_embeds) join the family's.
            kwargs["added_cond_kwargs"] = {**cond.extras, **extra.get("added_cond_kwargs", {})}
        return self.unet_call(latents, t, cond.embeds, **kwargs)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [0, 1], NCHW float32 on the CPU."""
        images = self.vae_decode_call(latents / self.scaling_factor + self.shift_factor)
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] (NCHW) → scaled latents (the mean of the VAE posterior)."""
        x = (images.to(self.device, self.dtype) * 2 - 1)
        return (self.vae_encode_call(x) - self.shift_factor) * self.scaling_factor

    def _torch_unet(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.unet(latents, t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]

    def _torch_vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.dtype), return_dict=False)[0]

    def _torch_vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images, return_dict=False)[0].mode()

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} family={self.family} runtime={self.runtime} device={self.device}>"
