"""The loaded SD 3 model: the core's latent model with an MMDiT and three text encoders.

Imported only when a model is loaded (it imports torch), so plugin registration stays light.
"""

from __future__ import annotations

from typing import Any

import torch

from aipaint.errors import UnsupportedFeature
from aipaint.models.latent import Conditioning, LatentDiffusionModel


class SD3Model(LatentDiffusionModel):
    """An SD 3 / 3.5 model.

    The MMDiT (``SD3Transformer2DModel``) is :attr:`transformer`; it is also stored as
    ``unet``, the attribute runtimes and precision settings move, cast and compile, so they
    work on it as on a UNet. Features that need a UNet's blocks (UNet ControlNets, DeepCache,
    ToMe, …) refuse it with :class:`aipaint.errors.UnsupportedFeature`; diffusers'
    ``SD3ControlNetModel`` runs inside :meth:`predict` (see
    :class:`aipaint.plugin.kit.controlnets.TransformerControlNetRuns`). Perturbed-attention
    guidance perturbs the MMDiT's joint attention itself (its processors); the model only names
    the default layers, :attr:`pag_default_layers`.

    ``text_encoder_3``/``tokenizer_3`` (T5-XXL) may be ``None``: its part of the conditioning
    is then zeros, as in diffusers.
    """

    # Adapter units: SD 3 ControlNets; the UNet-only adapters refuse the MMDiT themselves.
    # No SDXL-style refiner hand-off.
    capabilities = frozenset({"txt2img", "img2img", "inpaint", "outpaint", "adapters"})
    # The layers perturbed-attention guidance perturbs when a request names none: diffusers'
    # StableDiffusion3PAGPipeline's default (a regular expression searched in module names; like
    # diffusers it also matches transformer_blocks.10-19 in SD 3's 24- and 38-block MMDiTs).
    pag_default_layers = "blocks.1"

    def __init__(
        self,
        *,
        text_encoder_2: torch.nn.Module,
        tokenizer_2: Any,
        text_encoder_3: torch.nn.Module | None = None,
        tokenizer_3: Any = None,
        max_sequence_length: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_3 = text_encoder_3
        self.tokenizer_3 = tokenizer_3
        self.max_sequence_length = int(max_sequence_length)
        self._sd3_encoders: dict[tuple[int, str], list[Any]] = {}
        self._t5_encoders: dict[str, Any] = {}

    @property
    def transformer(self) -> torch.nn.Module:
        return self.unet


    # --- facts the loop needs -------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return "flow_prediction"


    # --- text ----------------------------------------------------------------------------------
    def prompt_encoders(self, clip_skip: int = 1, normalization: str = "a1111") -> list[Any]:
        """CLIP-L and CLIP-G, read at their penultimate layer without the final layer norm (as
        diffusers' SD 3 pipeline does; ``clip_skip`` skips further)."""
        key = (clip_skip, normalization)
        if key not in self._sd3_encoders:
            from aipaint.prompt import PromptEncoder

            self._sd3_encoders[key] = [
                PromptEncoder(tok, enc, clip_skip=clip_skip, normalization=normalization, layer_offset=1, final_layer_norm=False)
                for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
            ]
        return self._sd3_encoders[key]

    def prompt_encoder(self, clip_skip: int = 1, normalization: str = "a1111") -> Any:
        return self.prompt_encoders(clip_skip, normalization)[0]

    def t5_encoder(self, normalization: str = "a1111") -> Any:
        if self.text_encoder_3 is None:
            return None
        if normalization not in self._t5_encoders:
            from aipaint.plugin.kit.t5 import T5PromptEncoder

            self._t5_encoders[normalization] = T5PromptEncoder(
                self.tokenizer_3, self.text_encoder_3, max_length=self.max_sequence_length, normalization=normalization
            )
        return self._t5_encoders[normalization]

    @property
    def joint_attention_dim(self) -> int:
        return int(self.unet.config.joint_attention_dim)

    def encode_texts(self, texts: list[str], clip_skip: int = 1, normalization: str = "a1111") -> list[Conditioning]:
        """diffusers' ``StableDiffusion3Pipeline.encode_prompt``, with A1111's prompt syntax:
        CLIP-L and CLIP-G side by side, zero-padded to T5's width, then T5's tokens (zeros
        without T5) on the sequence axis; the pooled projections of both CLIPs, concatenated.

        Prompts past 75 CLIP tokens take more 77-token CLIP chunks (the pooled embedding is the
        first chunk's, as A1111 does for SDXL); T5 reads up to ``max_sequence_length`` tokens."""
        encoders = self.prompt_encoders(clip_skip, normalization)
        t5 = self.t5_encoder(normalization)
        chunks = max(len(enc.count_tokens(t)) for enc in encoders for t in texts)
        width = self.joint_attention_dim
        out = []
        with torch.inference_mode():
            for text in texts:
                parts, pooled = [], []
                for enc in encoders:
                    embeds, pool = enc.encode_with_pooled(text, min_chunks=chunks)
                    parts.append(embeds.to(self.device, self.dtype))
                    pooled.append(pool.to(self.device, self.dtype))
                clip = torch.cat(parts, dim=-1)
                if t5 is not None:
                    t5_embeds = t5.encode(text).to(self.device, self.dtype)
                    width = t5_embeds.shape[-1]
                else:
                    t5_embeds = torch.zeros((1, self.max_sequence_length, width), device=self.device, dtype=self.dtype)
                clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
                out.append(Conditioning(torch.cat([clip, t5_embeds], dim=-2), {"pooled_projections": torch.cat(pooled, dim=-1)}))
        return out

    # --- networks ----------------------------------------------------------------------------------
    # --- the flow shift per job (sd3.shift) ------------------------------------------------
    def request_sampling_config(self, request: Any) -> dict[str, Any]:
        """The model's scheduler config, with the request's ``sd3.shift`` when it sets one."""
        from aipaint_plugins.sd3.options import SD3Options

        config = super().request_sampling_config(request)
        shift = request.option(SD3Options).shift
        return config if shift is None else {**config, "shift": float(shift), "use_dynamic_shifting": False}

    def job_contributors(self, request: Any, *, prompt: Any, generators: list[torch.Generator]) -> tuple[list[Any], dict[str, str]]:
        from aipaint_plugins.sd3.options import INFOTEXT_KEY, SD3Options

        from aipaint.infotext import format_number

        shift = request.option(SD3Options).shift
        return [], ({INFOTEXT_KEY: format_number(float(shift))} if shift is not None else {})

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, **extra: Any) -> torch.Tensor:
        from aipaint.plugin.kit.controlnets import pop_transformer_controlnets

        extra = dict(extra)
        runs = pop_transformer_controlnets(extra)
        if extra:
            raise UnsupportedFeature(
                f"sd3 model {self.name!r} cannot take the UNet inputs {', '.join(sorted(extra))} that an adapter or "
                "feature added: SD 3's MMDiT has no UNet blocks"
            )
        timestep = t.expand(latents.shape[0]) if t.dim() else t.repeat(latents.shape[0])
        kwargs: dict[str, Any] = {"pooled_projections": cond.extras["pooled_projections"]}
        if runs:
            kwargs["block_controlnet_hidden_states"] = self._controlnet_samples(runs, latents, timestep, cond)
        return self.unet_call(latents, timestep, cond.embeds, **kwargs)

    def _torch_unet(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.unet(
            hidden_states=latents, timestep=t, encoder_hidden_states=embeds,
            pooled_projections=kwargs["pooled_projections"],
            block_controlnet_hidden_states=kwargs.get("block_controlnet_hidden_states"), return_dict=False,
        )[0]

    # --- ControlNet (diffusers' SD3ControlNetModel) ----------------------------------------------
    def controlnet_problems(self, controlnet: Any) -> list[str]:
        """Why ``controlnet`` cannot steer this MMDiT (empty when it can)."""
        if type(controlnet).__name__ != "SD3ControlNetModel":
            return [f"it is a {type(controlnet).__name__}, not an SD 3 ControlNet (SD3ControlNetModel)"]
        cn, tr = controlnet.config, self.unet.config
        problems = []
        for key in ("in_channels", "patch_size", "pooled_projection_dim"):
            if getattr(cn, key) != getattr(tr, key):
                problems.append(f"{key} {getattr(cn, key)} vs the MMDiT's {getattr(tr, key)}")
        inner, tr_inner = cn.num_attention_heads * cn.attention_head_dim, tr.num_attention_heads * tr.attention_head_dim
        if inner != tr_inner:
            problems.append(f"width {inner} vs the MMDiT's {tr_inner}")
        if cn.joint_attention_dim is not None and cn.joint_attention_dim != tr.joint_attention_dim:
            problems.append(f"text width {cn.joint_attention_dim} vs {tr.joint_attention_dim}")
        if getattr(cn, "extra_conditioning_channels", 0):
            problems.append("it takes extra conditioning channels (an inpainting ControlNet), which aipaint does not pass")
        if cn.num_layers > tr.num_layers:
            problems.append(f"{cn.num_layers} blocks vs the MMDiT's {tr.num_layers}")
        return problems

    def controlnet_condition(self, controlnet: Any, images: torch.Tensor) -> torch.Tensor:
        """Control images in [0, 1] → VAE latents ``(latents - shift) * scale``, as diffusers'
        ``StableDiffusion3ControlNetPipeline`` (InstantX's ControlNets, with zero pooled projections,
        skip the shift); aipaint takes the posterior's mean where diffusers samples it."""
        if getattr(controlnet.config, "use_pos_embed", True) is False and getattr(controlnet, "pos_embed", None) is None:
            # SD 3.5's own ControlNets share the MMDiT's patch embedding.
            controlnet.pos_embed = controlnet._get_pos_embed_from_transformer(self.unet).to(self.device, controlnet.dtype)
        latents = self.encode(images)
        if controlnet.config.force_zeros_for_pooled_projection:
            latents = latents + self.shift_factor * self.scaling_factor
        return latents

    def _controlnet_samples(self, runs: Any, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> list[Any]:
        from aipaint.plugin.kit.controlnets import add_samples, condition_rows

        if self.unet_call != self._torch_unet:
            raise UnsupportedFeature(f"SD 3 ControlNets need the torch runtime; model {self.name!r} runs its MMDiT elsewhere")
        total = None
        rows = latents.shape[0]
        pooled = cond.extras["pooled_projections"]
        for controlnet, condition, scale, _control_type in runs:  # SD 3 has no union ControlNets
            config = controlnet.config
            samples = controlnet(
                hidden_states=latents.to(controlnet.dtype),
                controlnet_cond=condition_rows(condition, rows),
                conditioning_scale=scale,
                encoder_hidden_states=cond.embeds if config.joint_attention_dim is not None else None,
                pooled_projections=torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection else pooled,
                timestep=timestep,
                return_dict=False,
            )[0]
            total = add_samples(total, samples)
        return total

    # The VAE may run in float32 (force_upcast) under a half-precision transformer: its input and
    # output are cast here (decode, with the VAE's shift, is the base model's).
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.to(self.device, self.vae.dtype) * 2 - 1
        return ((self.vae_encode_call(x) - self.shift_factor) * self.scaling_factor).to(self.dtype)

    # The VAE may stay in float32 (force_upcast) while the rest runs in half precision.
    def _torch_vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    def modules(self) -> dict[str, torch.nn.Module]:
        parts = {
            "transformer": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2, "text_encoder_3": self.text_encoder_3,
        }
        return {name: module for name, module in parts.items() if module is not None}
