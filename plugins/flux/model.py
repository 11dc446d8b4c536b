"""The loaded FLUX.1 model: the core's latent model with a flow-matching transformer.

Imported only when a model is loaded (it imports torch), so plugin registration stays light.

The core loop works on unpacked latents ``(B, 16, H/8, W/8)``; :meth:`FluxModel.predict` packs
them into 2×2 patches (the transformer's tokens), builds the image and text position ids,
and unpacks the velocity it returns, as diffusers' ``FluxPipeline`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from aipaint_plugins.flux.options import DISTILLED_CFG_SCALE, INFOTEXT_KEY, FluxOptions

from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.models.latent import Conditioning, LatentDiffusionModel


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``mu`` (diffusers' ``calculate_shift``, same arithmetic)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, H/2 · W/2, 4C)``: one token per 2×2 patch (diffusers' ``_pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` × ``width``."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


# InstantX's FLUX.1-dev-Controlnet-Union (and Shakker-Labs' Union-Pro) control types, by the
# index its model card gives them; aliases: sd-webui-controlnet's names and the long forms.
UNION_CONTROL_TYPES: dict[str, int] = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}
UNION_ALIASES: dict[str, str] = {
    "hard edge": "canny", "openpose": "pose", "grey": "gray", "low quality": "lq", "low_quality": "lq",
}


def union_control_index(value: Any, num_mode: int, label: str) -> tuple[int, str]:
    """A union ControlNet's control type (a name of :data:`UNION_CONTROL_TYPES`, an alias, or an
    index below ``num_mode``, also as text) → ``(index, name)``; the name is the index's when it
    has none."""
    names = ", ".join(UNION_CONTROL_TYPES)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < num_mode:
            raise InvalidParameter(label, value, f"must be a control type index from 0 to {num_mode - 1} "
                                                 f"(this union ControlNet has {num_mode} modes) or one of {names}")
        index = value
    else:
        key = str(value).strip().lower()
        key = UNION_ALIASES.get(key, key)
        if key not in UNION_CONTROL_TYPES:
            raise InvalidParameter(label, value, f"must be one of {names} (InstantX's FLUX union control types) "
                                                 f"or an index from 0 to {num_mode - 1}")
        index = UNION_CONTROL_TYPES[key]
        if index >= num_mode:
            raise InvalidParameter(label, value, f"is mode {index}; this union ControlNet has {num_mode} modes")
    name = next((n for n, i in UNION_CONTROL_TYPES.items() if i == index), str(index))
    return index, name


def image_ids(rows: int, cols: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """``(rows · cols, 3)`` position ids of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


class FluxModel(LatentDiffusionModel):
    """FLUX.1 dev or schnell: a rectified-flow transformer over 16-channel latents, conditioned on
    T5-XXL's token embeddings and CLIP-L's pooled embedding.

    ``transformer`` is the denoiser. It is also ``unet``, the name the core's runtimes use for
    the denoising network (bf16 precision, ``torch.compile``); adapters written for a UNet
    (UNet ControlNets, DeepCache, ToMe, IP-Adapter, PAG) are refused, not run on it. diffusers'
    ``FluxControlNetModel`` runs inside :meth:`predict` on the same packed tokens (see
    :class:`aipaint.plugin.kit.controlnets.TransformerControlNetRuns`).
    ``text_encoder``/``tokenizer`` are CLIP ViT-L (pooled output only), ``text_encoder_2``/
    ``tokenizer_2`` T5-XXL (``max_sequence_length`` tokens: 512 for dev, 256 for schnell).
    """

    # Adapter units: FLUX ControlNets; the UNet-only adapters refuse the transformer themselves.
    # No refiner hand-off.
    capabilities = frozenset({"txt2img", "img2img", "inpaint", "outpaint", "adapters"})

    def __init__(
        self,
        *,
        transformer: torch.nn.Module,
        text_encoder_2: torch.nn.Module,
        tokenizer_2: Any,
        max_sequence_length: int = 512,
        **kwargs: Any,
    ) -> None:
        super().__init__(unet=transformer, **kwargs)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.max_sequence_length = int(max_sequence_length)
        self._t5 = None

    # --- facts ----------------------------------------------------------------------------
    @property
    def transformer(self) -> torch.nn.Module:
        return self.unet

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes the distilled guidance as an input (dev: yes; schnell: no)."""
        return bool(getattr(self.unet.config, "guidance_embeds", False))

    @property
    def variant(self) -> str:
        return "dev" if self.guidance_embeds else "schnell"

    @property
    def unet_in_channels(self) -> int:
        # The transformer reads packed 2×2 patches: 4 × the latent channels for a plain model, so
        # inpainting uses latent blending (FLUX.1 Fill's extra channels are refused at load).
        return int(self.unet.config.in_channels) // 4

    def sampling_config(self, width: int, height: int) -> dict[str, Any]:
        """The scheduler config with FLUX's sigmas (``linspace(1, 1/steps, steps)`` before the shift,
        as diffusers' FLUX pipelines space them) and, with dynamic shifting (dev), the ``mu`` of
        the image's token count, computed as ``FluxPipeline`` does."""
        grid = 2 * self.vae_scale_factor
        if width % grid or height % grid:
            raise InvalidParameter("size", f"{width}x{height}", f"must be a multiple of {grid} for FLUX (2×2 latent patches)")
        config = {**self.scheduler_config, "linear_sigmas": True}
        if config.get("use_dynamic_shifting"):
            seq_len = (height // grid) * (width // grid)
            config["mu"] = calculate_shift(
                seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        return config

    # --- text -----------------------------------------------------------------------------
    def t5_encoder(self) -> Any:
        if self._t5 is None:
            from aipaint.plugin.kit.t5 import T5PromptEncoder

            self._t5 = T5PromptEncoder(self.tokenizer_2, self.text_encoder_2, max_length=self.max_sequence_length)
        return self._t5

    def encode_texts(self, texts: list[str], clip_skip: int = 1, normalization: str = "a1111") -> list[Conditioning]:
        """T5's token embeddings (emphasis applied) as ``embeds``, CLIP-L's pooled output of the
        prompt's first 75 tokens as ``pooled_projections``. Plain prompts encode exactly as
        diffusers' ``FluxPipeline.encode_prompt`` encodes them."""
        if clip_skip != 1:
            raise UnsupportedFeature(f"FLUX model {self.name!r} reads only CLIP's pooled output: clip_skip does not apply; leave it at 1")
        clip = self.prompt_encoder(1, normalization)
        t5 = self.t5_encoder()
        t5.normalization = normalization
        out = []
        with torch.inference_mode():
            for text in texts:
                _, pooled = clip.encode_with_pooled(text)  # pooled: the first chunk's, as diffusers' 77 tokens
                embeds = t5.encode(text)
                out.append(Conditioning(embeds.to(self.device, self.dtype), {"pooled_projections": pooled.to(self.device, self.dtype)}))
        return out

    def distilled_guidance(self, request: Any) -> float | None:
        """The distilled guidance this request runs with (None for schnell, which has no input for it)."""
        value = request.option(FluxOptions).distilled_cfg_scale
        if not self.guidance_embeds:
            if value is not None:
                raise UnsupportedFeature(
                    f"FLUX.1 schnell model {self.name!r} has no distilled guidance input (flux.distilled_cfg_scale "
                    f"is {value}); leave it unset"
                )
            return None
        return DISTILLED_CFG_SCALE if value is None else float(value)

    def request_conditioning(self, cond: Conditioning, *, text: str, negative: bool, request: Any) -> Conditioning:
        guidance = self.distilled_guidance(request)
        if guidance is None:
            return cond
        value = torch.full((cond.embeds.shape[0],), guidance, device=self.device, dtype=torch.float32)
        return Conditioning(cond.embeds, {**cond.extras, "guidance": value})

    def job_contributors(self, request: Any, *, prompt: Any, generators: list[torch.Generator]) -> tuple[list[Any], dict[str, str]]:
        guidance = self.distilled_guidance(request)
        if guidance is None:
            return [], {}
        from aipaint.infotext import format_number

        return [], {INFOTEXT_KEY: format_number(guidance)}

    # --- networks -------------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, **extra: Any) -> torch.Tensor:
        from aipaint.plugin.kit.controlnets import pop_transformer_controlnets

        extra = dict(extra)
        runs = pop_transformer_controlnets(extra)
        if extra:
            raise UnsupportedFeature(
                f"FLUX model {self.name!r}: a loop contributor passed UNet inputs ({', '.join(sorted(extra))}) "
                "that the FLUX transformer does not take"
            )
        b, _, h, w = latents.shape
        packed = pack_latents(latents).to(self.dtype)  # the loop's latents are float32
        timestep = (t.expand(b) if t.dim() else t.reshape(1).expand(b)).to(packed.dtype) / 1000
        kwargs: dict[str, Any] = {
            "pooled_projections": cond.extras["pooled_projections"],
            "txt_ids": torch.zeros(cond.embeds.shape[1], 3, device=latents.device, dtype=packed.dtype),
            "img_ids": image_ids(h // 2, w // 2, latents.device, packed.dtype),
        }
        if self.guidance_embeds:
            kwargs["guidance"] = cond.extras["guidance"]
        if runs:
            kwargs.update(self._controlnet_samples(runs, packed, timestep, cond, kwargs))
        out = self.unet_call(packed, timestep, cond.embeds, **kwargs)
        return unpack_latents(out, h, w)

    # --- ControlNet (diffusers' FluxControlNetModel) ------------------------------------------
    def controlnet_problems(self, controlnet: Any) -> list[str]:
        """Why ``controlnet`` cannot steer this transformer (empty when it can)."""
        if type(controlnet).__name__ != "FluxControlNetModel":
            return [f"it is a {type(controlnet).__name__}, not a FLUX ControlNet (FluxControlNetModel)"]
        cn, tr = controlnet.config, self.unet.config
        problems = []
        for key in ("in_channels", "joint_attention_dim", "pooled_projection_dim"):
            if getattr(cn, key) != getattr(tr, key):
                problems.append(f"{key} {getattr(cn, key)} vs the transformer's {getattr(tr, key)}")
        inner, tr_inner = cn.num_attention_heads * cn.attention_head_dim, tr.num_attention_heads * tr.attention_head_dim
        if inner != tr_inner:
            problems.append(f"width {inner} vs the transformer's {tr_inner}")
        if tuple(cn.axes_dims_rope) != tuple(tr.axes_dims_rope):
            problems.append(f"rotary axes {tuple(cn.axes_dims_rope)} vs {tuple(tr.axes_dims_rope)}")
        if cn.guidance_embeds and not self.guidance_embeds:
            problems.append("it takes FLUX.1 dev's distilled guidance, which this schnell model has not")
        if controlnet.input_hint_block is not None:
            # XLabs' layout: its input block reads the pixels, 8x smaller, in patch_size² patches.
            hint, tokens = 8 * int(cn.patch_size), 2 * int(self.vae_scale_factor)
            if hint != tokens:
                problems.append(f"its input block makes one token of {hint}x{hint} pixels vs the transformer's {tokens}x{tokens}")
        return problems

    def controlnet_control_type(self, controlnet: Any, value: Any, label: str) -> tuple[int, str] | None:
        """A unit's ``union_control_type`` for ``controlnet``: ``(index, name)`` for a union
        ControlNet (``num_mode`` in its config; the type is required), None for a ControlNet of
        one type (which refuses a type)."""
        num_mode = controlnet.config.num_mode
        if num_mode is None:
            if value is None:
                return None
            raise InvalidParameter(label, value, "applies to union ControlNets only (num_mode in their config); this "
                                                 "FLUX ControlNet has one control type: leave it unset")
        if value is None:
            raise InvalidParameter(label, None, "is required for a union ControlNet (num_mode in its config): one of "
                                                f"{', '.join(UNION_CONTROL_TYPES)} or an index from 0 to {num_mode - 1}")
        return union_control_index(value, int(num_mode), label)

    def controlnet_condition(self, controlnet: Any, images: torch.Tensor) -> torch.Tensor:
        """Control images in [0, 1] → what the ControlNet reads, as diffusers' ``FluxControlNetPipeline``
        makes it: VAE latents ``(latents - shift) * scale`` packed into tokens (InstantX's layout), or
        the image in [-1, 1] for ControlNets with their own input block (XLabs' layout). aipaint takes
        the VAE posterior's mean where diffusers samples it."""
        if controlnet.input_hint_block is not None:
            return images.to(self.device, self.dtype) * 2 - 1
        return pack_latents(self.encode(images)).to(self.dtype)

    def _controlnet_samples(self, runs: Any, packed: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                            kwargs: dict[str, Any]) -> dict[str, Any]:
        from aipaint.plugin.kit.controlnets import add_samples, condition_rows

        if self.unet_call != self._torch_unet:
            raise UnsupportedFeature(f"FLUX ControlNets need the torch runtime; model {self.name!r} runs its transformer elsewhere")
        repeats = {run[0].input_hint_block is not None for run in runs}
        if len(repeats) > 1:
            raise UnsupportedFeature("FLUX ControlNets with and without an input block (XLabs' and InstantX's layouts) cannot be combined")
        blocks = singles = None
        rows = packed.shape[0]
        for controlnet, condition, scale, control_type in runs:
            mode = None
            if control_type is not None:  # a union ControlNet: one mode per row, as FluxControlNetPipeline expands it
                mode = torch.full((rows, 1), control_type, device=packed.device, dtype=torch.long)
            block, single = controlnet(
                hidden_states=packed.to(controlnet.dtype),
                controlnet_cond=condition_rows(condition, rows),
                controlnet_mode=mode,
                conditioning_scale=scale,
                timestep=timestep,
                guidance=kwargs.get("guidance") if controlnet.config.guidance_embeds else None,
                pooled_projections=kwargs["pooled_projections"],
                encoder_hidden_states=cond.embeds,
                txt_ids=kwargs["txt_ids"],
                img_ids=kwargs["img_ids"],
                return_dict=False,
            )
            blocks, singles = add_samples(blocks, block), add_samples(singles, single)
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles,
                "controlnet_blocks_repeat": repeats.pop()}

    def _torch_unet(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.unet(hidden_states=latents, timestep=t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]

    # The FLUX VAE's config asks for float32 (force_upcast): it stays float32 under float16.
    def _torch_vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    def _torch_vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images.to(self.vae.dtype), return_dict=False)[0].mode()

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
