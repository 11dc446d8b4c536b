"""The loaded SDXL model: the core's latent model plus a second text encoder and extra UNet inputs.

Imported only when a model is loaded (it imports torch), so plugin registration stays light.
"""

from __future__ import annotations

from typing import Any

import torch
from aipaint_plugins.sdxl.options import SDXLOptions

from aipaint.models.latent import Conditioning, LatentDiffusionModel


class SDXLModel(LatentDiffusionModel):
    """An SDXL base or refiner: a latent model with two text encoders and extra UNet inputs.

    ``text_encoder`` is ``None`` for the refiner, which has only the OpenCLIP encoder.
    ``force_zeros_for_empty_prompt`` makes an empty negative prompt all zeros (what SDXL was
    trained with, and what A1111 and diffusers do); ``requires_aesthetics_score`` selects the
    refiner's time ids ``(h, w, top, left, score)`` instead of ``(h, w, top, left, h, w)``.
    """

    def __init__(
        self,
        *,
        text_encoder_2: torch.nn.Module,
        tokenizer_2: Any,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.requires_aesthetics_score = requires_aesthetics_score
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self._sdxl_encoders: dict[tuple[int, str], list[Any]] = {}

    @property
    def is_refiner(self) -> bool:
        return self.text_encoder is None

    def prompt_encoders(self, clip_skip: int = 1, normalization: str = "a1111") -> list[Any]:
        """One :class:`aipaint.prompt.PromptEncoder` per text encoder, reading the penultimate
        layer without the final layer norm (SDXL's native layer; ``clip_skip`` skips further)."""
        key = (clip_skip, normalization)
        if key not in self._sdxl_encoders:
            from aipaint.prompt import PromptEncoder

            pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
            self._sdxl_encoders[key] = [
                PromptEncoder(tok, enc, clip_skip=clip_skip, normalization=normalization, layer_offset=1, final_layer_norm=False)
                for tok, enc in pairs
                if enc is not None
            ]
        return self._sdxl_encoders[key]

    def prompt_encoder(self, clip_skip: int = 1, normalization: str = "a1111") -> Any:
        # Token counting and chunking are the same for both tokenizers (one BPE vocabulary).
        return self.prompt_encoders(clip_skip, normalization)[0]

    def encode_texts(self, texts: list[str], clip_skip: int = 1, normalization: str = "a1111") -> list[Conditioning]:
        """Both encoders' token embeddings concatenated on the feature axis, plus the pooled
        embedding of the last encoder's first chunk (as A1111 does) as ``text_embeds``."""
        encoders = self.prompt_encoders(clip_skip, normalization)
        chunks = max(len(enc.count_tokens(t)) for enc in encoders for t in texts)
        out = []
        with torch.inference_mode():
            for text in texts:
                parts, pooled = [], None
                for enc in encoders:
                    embeds, pooled = enc.encode_with_pooled(text, min_chunks=chunks)
                    parts.append(embeds)
                assert pooled is not None
                out.append(
                    Conditioning(
                        torch.cat(parts, dim=-1).to(self.device, self.dtype),
                        {"text_embeds": pooled.to(self.device, self.dtype)},
                    )
                )
        return out

    def request_conditioning(self, cond: Conditioning, *, text: str, negative: bool, request: Any) -> Conditioning:
        if negative and text == "" and self.force_zeros_for_empty_prompt:
            cond = Conditioning(torch.zeros_like(cond.embeds), {k: torch.zeros_like(v) for k, v in cond.extras.items()})
        size = [float(request.height), float(request.width)]
        options = request.option(SDXLOptions)
        crop = [float(options.crop_top), float(options.crop_left)]
        if self.requires_aesthetics_score:
            score = options.negative_aesthetic_score if negative else options.aesthetic_score
            ids = size + crop + [score]
        else:
            ids = size + crop + size
        time_ids = torch.tensor([ids], device=self.device, dtype=self.dtype)
        return Conditioning(cond.embeds, {**cond.extras, "time_ids": time_ids})

    # The SDXL VAE overflows in float16: it stays in float32 when its config says so.
    def _torch_vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    def _torch_vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images.to(self.vae.dtype), return_dict=False)[0].mode()

    def modules(self) -> dict[str, torch.nn.Module]:
        parts = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {name: module for name, module in parts.items() if module is not None}
