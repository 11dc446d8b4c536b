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
from aipaint.errors import ModelLoadError
from aipaint.families import LoadOptions, ModelFamily, ModelSource
from aipaint.model import Conditioning, LatentDiffusionModel

if TYPE_CHECKING:
    import torch

PIPELINE_CLASSES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
BASE_TEXT_KEY = "conditioner.embedders.1.model.positional_embedding"  # OpenCLIP bigG as the second embedder
REFINER_TEXT_KEY = "conditioner.embedders.0.model.positional_embedding"  # OpenCLIP bigG alone
AESTHETIC_SCORE = 6.0  # diffusers' and A1111's defaults for the refiner
NEGATIVE_AESTHETIC_SCORE = 2.5


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


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
        import torch

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
        import torch

        if negative and text == "" and self.force_zeros_for_empty_prompt:
            cond = Conditioning(torch.zeros_like(cond.embeds), {k: torch.zeros_like(v) for k, v in cond.extras.items()})
        size = [float(request.height), float(request.width)]
        crop = [float(request.extra.get("crop_top", 0)), float(request.extra.get("crop_left", 0))]
        if self.requires_aesthetics_score:
            if negative:
                score = float(request.extra.get("negative_aesthetic_score", NEGATIVE_AESTHETIC_SCORE))
            else:
                score = float(request.extra.get("aesthetic_score", AESTHETIC_SCORE))
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


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    aliases = ("sdxl-base", "sdxl-refiner", "stable-diffusion-xl", "sd-xl")
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
        from aipaint.model import ModelDefaults

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
    from aipaint.zoo import zoo_root

    return zoo_root() / "configs" / name


@hookimpl
def register_models(register: Callable[[ModelFamily], None]) -> None:
    register(StableDiffusionXL())
